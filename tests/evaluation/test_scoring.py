"""The batched scorer on every tiny architecture."""

from __future__ import annotations

import torch

from edit_serve.dry_run import Measured
from edit_serve.evaluation import Scorer
from patches import PatchStack
from tests.patches.conftest import rank_one


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


def test_teacher_forced_top1_answers_greedy_where_it_is_the_target(tiny_llama, monkeypatch):
    """A pair whose top-1 tokens are its target, all of them, is remembered as its prompt's
    greedy continuation for as many tokens, on the same weights (a patch with its `eval` added
    being the same weights); a pair whose target is not what the model predicts is not."""
    llama = tiny_llama[0]
    stack = PatchStack(llama.model, base_model=llama.profile.name, architecture=llama.profile.architecture)
    prompts = ["the capital of France is", "w1 w2", "Danielle Darrieux mother tongue is"]
    truth = Scorer(llama.model, llama.tokenizer, batch_size=4).greedy(prompts, 5)
    patch = rank_one(stack, "model.layers.1.mlp.down_proj.weight", scale=0.5)
    stack.apply(patch)
    edited = Scorer(llama.model, llama.tokenizer, batch_size=4).greedy(prompts, 5)
    assert edited != truth  # the edit changes a continuation: the check below can tell them apart

    memo = Measured(stack).scores
    scorer = Scorer(llama.model, llama.tokenizer, batch_size=4, memo=memo)
    full = [(scorer.prompt_ids(p), c) for p, c in zip(prompts, edited) if len(c) == 5]
    wrong = (scorer.prompt_ids("w3 w4"), [5, 6, 7, 8, 9])  # not the model's continuation
    assert scorer.top1([wrong])[0].tolist() != wrong[1]
    scorer.top1(full)
    prompts.append("w3 w4")
    stack.replace([patch.id], [patch.replace(eval={"reliability": 1.0})])  # the same weights, another id
    decoded = []
    real = Scorer._greedy
    monkeypatch.setattr(Scorer, "_greedy", lambda self, encoded, *a: decoded.extend(encoded) or real(self, encoded, *a))
    assert scorer.greedy(prompts[:3], 5) == edited
    assert sorted(decoded) == sorted(scorer.prompt_ids(p) for p, c in zip(prompts, edited) if len(c) < 5)
    assert scorer.greedy(["w3 w4"], 5) != [wrong[1]] and decoded[-1] == wrong[0]  # decoded, not remembered
    decoded.clear()
    stack.revert(stack.ids[0])  # other weights: nothing remembered
    assert scorer.greedy(prompts[:3], 5) == truth and len(decoded) == 3


def test_greedy_is_the_top1_token_whatever_the_model_config_asks(tiny_llama, monkeypatch):
    """A model's own generation config (repetition penalty, n-gram bans, a minimum length) does
    not bend the scorer's greedy answers: each token is the teacher-forced top-1 after the ones
    before it, which locality's references rely on."""
    llama = tiny_llama[0]
    config = llama.model.generation_config
    for name, value in {"repetition_penalty": 3.0, "no_repeat_ngram_size": 1, "min_new_tokens": 6, "min_length": 30,
                        "suppress_tokens": [5, 6, 7]}.items():
        monkeypatch.setattr(config, name, value, raising=False)
    scorer = Scorer(llama.model, llama.tokenizer, batch_size=4)
    prompts = ["the capital of France is", "w1 w2", "w1 w1 w1 w1"]
    for prompt, continuation in zip(prompts, scorer.greedy(prompts, 6)):
        pair = (scorer.prompt_ids(prompt), continuation)
        assert continuation and scorer.top1([pair])[0].tolist() == continuation
