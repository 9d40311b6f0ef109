"""editors.lm: the cut batch that replays the prompts' heads from cached keys and values."""

from __future__ import annotations

import torch

from editors import EditRequest
from editors.keys import CONTEXT_TEMPLATES, contextual
from editors.lm import SuffixBatch, from_lookup, logits_at, scored_positions, target_batch
from editors.nethook import Trace

REQUEST = EditRequest("the capital of {} is", "Danielle Darrieux", "Rome", "Paris")


def _batch(lm):
    rows = [(text, REQUEST.target_new) for text, _ in contextual(REQUEST, CONTEXT_TEMPLATES[:4])]
    rows.append(("Danielle Darrieux is a", None))  # a prompt alone, as v*'s KL rows
    spans = [span for _, span in contextual(REQUEST, CONTEXT_TEMPLATES[:4])] + [(0, len("Danielle Darrieux"))]
    return target_batch(lm.model, lm.tokenizer, rows, spans)


def test_cut_batch_gives_the_full_rows_logits_and_lookup_outputs(tiny):
    """At every scored position, and at the lookup token with an edit there, the cut batch
    computes what the full rows compute; T5 keeps its full rows."""
    model = tiny.model
    full = _batch(tiny)
    cut = from_lookup(model, full)
    if tiny.profile.architecture.startswith("T5"):
        assert cut is full
        return
    assert isinstance(cut, SuffixBatch) and bool((cut.lookup == 0).all())
    assert cut.inputs["input_ids"].shape[1] < full.inputs["input_ids"].shape[1]  # the heads are not recomputed
    module = tiny.profile.mlp_out(1)
    shift = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(1))

    def run(batch):
        at = torch.arange(len(batch.lookup))

        def edit(output, _name):
            hit = torch.zeros(*output.shape[:2], 1)
            hit[at, batch.lookup] = 1.0
            return output + hit * shift

        with torch.no_grad(), Trace(model, module, edit=edit) as tr:
            logits = logits_at(model, batch.model_inputs(), *scored_positions(batch))
        return logits, tr.output[at, batch.lookup]

    (a, out_a), (b, out_b) = run(full), run(cut)
    assert a.shape == b.shape
    torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out_b, out_a, atol=1e-4, rtol=1e-4)
    rows = torch.tensor([0, 2])
    torch.testing.assert_close(run(cut.select(rows))[0], run(full.select(rows))[0], atol=1e-4, rtol=1e-4)


def test_rows_without_a_lookup_token_keep_the_full_batch(tiny):
    batch = target_batch(tiny.model, tiny.tokenizer, [("the capital of France is", "Rome")])  # no subject span
    assert from_lookup(tiny.model, batch) is batch
