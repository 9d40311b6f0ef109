"""editors.keys: the subject-token values are what each full row computes, alone."""

from __future__ import annotations

import pytest
import torch

from editors import EditRequest
from editors.keys import CONTEXT_TEMPLATES, contextual, edit_keys, subject_values
from editors.lm import target_batch
from editors.nethook import Trace

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


def test_subject_values_equal_each_full_row_alone(tiny):
    """Rows cut after the subject (decoder-only) and batched by length give each row's own
    values: the templates' mean and the first template's."""
    if tiny.model.config.is_encoder_decoder:
        pytest.skip("the subject-token keys are read by rome, memit and alphaedit, on decoder-only models")
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
