"""editors.keys: the subject-token values are what each full row computes, alone."""

from __future__ import annotations

import pytest
import torch

from editors import EditRequest
from editors.keys import CONTEXT_TEMPLATES, Replay, contextual, edit_keys, fitted, subject_values
from editors.lm import target_batch
from editors.nethook import Trace
from tests.conftest import decoder_only

REQUESTS = [
    EditRequest("The mother tongue of {} is", "Danielle Darrieux", "French", "English"),
    EditRequest("{}, which is located in", "Autonomous University of Madrid", "Spain", "Sweden"),
    EditRequest("{} is a professional", "Toko Yasuda", "guitar", "piano"),
]


def _alone(lm, module: str, request: EditRequest, templates) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, in), (t, out): each template's full row run by itself."""
    ins, outs = [], []
    for text, span in contextual(request, templates):
        batch = target_batch(lm.model, lm.tokenizer, [(text, None)], [span])
        with torch.no_grad(), Trace(lm.model, module, retain_input=True, stop=True) as tr:
            lm.model(**batch.inputs, use_cache=False)
        ins.append(tr.input[0, batch.lookup[0]].float())
        outs.append(tr.output[0, batch.lookup[0]].float())
    return torch.stack(ins), torch.stack(outs)


@decoder_only  # the subject-token keys: rome, memit and alphaedit
def test_subject_values_equal_each_full_row_alone(tiny):
    """Rows cut after the subject (decoder-only) and batched by length give each row's own
    values: the templates' mean and the first template's."""
    module = tiny.profile.mlp_out(1)
    found = subject_values(tiny.model, tiny.tokenizer, module, REQUESTS, CONTEXT_TEMPLATES, batch_rows=7)
    for i, request in enumerate(REQUESTS):
        ins, outs = _alone(tiny, module, request, CONTEXT_TEMPLATES)
        torch.testing.assert_close(found.key[i], ins.mean(0), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(found.out[i], outs.mean(0), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(found.first_key[i], ins[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(found.first_out[i], outs[0], rtol=1e-4, atol=1e-5)
    keys = edit_keys(tiny.model, tiny.tokenizer, module, REQUESTS)
    torch.testing.assert_close(keys["prompt"], found.first_key)
    torch.testing.assert_close(keys["templates"], found.key)


@decoder_only  # the subject-token keys: rome, memit and alphaedit
def test_a_replay_runs_the_blocks_below_once_and_changes_nothing(tiny, monkeypatch):
    """MEMIT's passes at each of its layers: with a Replay the blocks below the first layer run
    in the first pass only, and every pass finds what it finds without one."""
    first, second = tiny.profile.mlp_out(1), tiny.profile.mlp_out(2)
    plain = [subject_values(tiny.model, tiny.tokenizer, m, REQUESTS, CONTEXT_TEMPLATES, batch_rows=7)
             for m in (first, second)]
    lowest = tiny.model.get_submodule(tiny.profile.layer(0))
    runs = []
    forward = type(lowest).forward

    def counted(self, *args, **kwargs):  # on the class: a hook on the block would turn the replay off
        runs.append(self is lowest)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(type(lowest), "forward", counted)
    replay = Replay(tiny.model, first)
    found = subject_values(tiny.model, tiny.tokenizer, first, REQUESTS, CONTEXT_TEMPLATES, batch_rows=7, replay=replay)
    batches = sum(runs)
    assert batches == -(-len(REQUESTS) * len(CONTEXT_TEMPLATES) // 7)
    again = subject_values(tiny.model, tiny.tokenizer, second, REQUESTS, CONTEXT_TEMPLATES, batch_rows=7, replay=replay)
    assert sum(runs) == batches  # the second pass did not run the lowest block
    for got, want in zip((found, again), plain):
        torch.testing.assert_close(got.key, want.key)
        torch.testing.assert_close(got.first_out, want.first_out)


def test_the_fitted_prompts_are_the_templated_prompt_then_each_rephrasing():
    request = EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English",
                          rephrasings=("Danielle Darrieux spoke", "Born in Bordeaux, {} grew up speaking"))
    rows = fitted(request, CONTEXT_TEMPLATES[:2])
    assert rows[:2] == contextual(request, CONTEXT_TEMPLATES[:2])
    assert [text for text, _ in rows[2:]] == ["Danielle Darrieux spoke",
                                              "Born in Bordeaux, Danielle Darrieux grew up speaking"]
    for text, (start, end) in rows:
        assert text[start:end] == "Danielle Darrieux"
    plain = EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English")
    assert fitted(plain, CONTEXT_TEMPLATES) == contextual(plain, CONTEXT_TEMPLATES)
