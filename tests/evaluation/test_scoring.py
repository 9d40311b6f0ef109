"""The batched scorer on every tiny architecture."""

from __future__ import annotations

import torch

from edit_serve.evaluation import Scorer


def test_scorer_on_every_tiny_architecture(tiny):
    """Teacher-forced predictions are the same alone and in a padded batch (left padding for
    decoder-only models, encoder/decoder inputs for T5), and greedy generation runs."""
    scorer = Scorer(tiny.model, tiny.tokenizer, batch_size=4)
    pairs = [scorer.pair("the capital of France is", "Paris"),
             scorer.pair("Danielle Darrieux mother tongue is", "French and English"),
             scorer.pair("w1", "w2 w3 w4 w5 w6")]
    batched = scorer.top1(pairs)
    assert [len(p) for p in batched] == [1, 3, 5]
    for pair, got in zip(pairs, batched):
        assert torch.equal(scorer.top1([pair])[0], got)
    out = scorer.greedy(["the capital of France is", "w1 w2"], 3)
    assert len(out) == 2 and all(len(ids) <= 3 for ids in out)
