"""The metrics, hand-checkable: pure functions, and the measurements on the real SmolLM2."""

from __future__ import annotations

import math

import pytest
import torch

from edit_serve.evaluation import Scorer, read_records, record_from_dict, reference, score
from edit_serve.evaluation.metrics import agreement, answer_matches, ngram_entropy, same_tokens, token_accuracy
from patches import Patch, PatchStack

# --- pure functions -----------------------------------------------------------------------


def test_ngram_entropy_by_hand():
    # "a b a b": bigrams ab, ba, ab -> H2 = H(2/3, 1/3); trigrams aba, bab -> H3 = 1 bit
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert ngram_entropy("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2)
    assert ngram_entropy("the the the the the") == 0.0  # one repeated n-gram: no entropy
    assert ngram_entropy("word") == 0.0
    varied = "The quick brown fox jumps over the lazy dog near the river bank today."
    assert ngram_entropy(varied) > ngram_entropy("the dog the dog the dog the dog the dog the dog")


def test_token_accuracy_and_agreement():
    assert token_accuracy(torch.tensor([5, 6, 7]), [5, 0, 7]) == pytest.approx(2 / 3)
    assert agreement(torch.tensor([1, 2]), torch.tensor([1, 2])) == 1.0
    with pytest.raises(ValueError):
        token_accuracy(torch.tensor([1]), [1, 2])


def test_answer_matches_a_whole_word_at_the_start():
    assert answer_matches(" Paris, France.", "Paris")
    assert answer_matches("Paris", " Paris ")
    assert answer_matches("  New   York City is", "New York City")  # whitespace normalized
    assert not answer_matches(" Parisian food", "Paris")  # the word goes on
    assert not answer_matches(" the city of Paris", "Paris")  # not at the start
    assert not answer_matches(" paris", "Paris")  # case kept
    assert not answer_matches("", "Paris") and not answer_matches(" Paris", "  ")
    assert same_tokens([1, 2], (1, 2)) == 1.0 and same_tokens([1, 2], [1, 3]) == 0.0 and same_tokens([1], [1, 2]) == 0.0


# --- on the real model ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def scorer(smollm):
    return Scorer(smollm.model, smollm.tokenizer, batch_size=8)


def fact(prompt, subject, target, **extra):
    return record_from_dict({"prompt": prompt, "subject": subject, "target_new": target, **extra})


def test_reliability_of_the_unedited_model_on_known_and_counterfactual_facts(scorer):
    records = [fact("The Eiffel Tower is located in the city of", "The Eiffel Tower", "Paris"),
               fact("The official language of Italy is", "Italy", "Italian"),
               fact("The Eiffel Tower is located in the city of", "The Eiffel Tower", "Rome"),
               fact("The official language of Italy is", "Italy", "Japanese")]
    rows = score(scorer, records, None)
    assert [r["reliability"] for r in rows] == [1.0, 1.0, 0.0, 0.0]
    assert all(r["generality"] is None and r["locality"] is None for r in rows)


def test_portability_takes_the_best_alias(scorer):
    probe = {"prompt": "The Eiffel Tower is located in the city of", "target": "Berlin", "target_aliases": ["Paris"]}
    (row,) = score(scorer, [fact("Italy's capital is", "Italy", "Rome", portability=[probe])], None)
    assert row["portability"] == 1.0
    probe = {"prompt": probe["prompt"], "target": "Berlin"}
    (row,) = score(scorer, [fact("Italy's capital is", "Italy", "Rome", portability=[probe])], None)
    assert row["portability"] == 0.0


def test_batched_predictions_equal_single_ones(scorer):
    """Left padding must not change a prediction: a short probe in a batch of long ones."""
    pairs = [scorer.pair("Paris is", "the capital of France"),
             scorer.pair("Some long context about many things. The official language of Italy is", "Italian"),
             scorer.pair("x", "y z")]
    batched = scorer.top1(pairs)
    for pair, got in zip(pairs, batched):
        assert torch.equal(scorer.top1([pair])[0], got)


def test_locality_of_an_unchanged_model_is_one(scorer, data_dir):
    records = read_records(data_dir / "counterfact.jsonl", n=2)
    refs = reference(scorer, records)
    assert [len(r.pairs) for r in refs] == [10, 10]
    assert [row["locality"] for row in score(scorer, records, refs)] == [1.0, 1.0]


def test_open_locality_probes_use_the_models_own_continuation(scorer):
    record = record_from_dict({"prompt": "Italy's capital is", "subject": "Italy", "target_new": "Rome",
                               "neighborhood_prompts": ["The Eiffel Tower is located in the city of"]})
    (ref,) = reference(scorer, [record], open_tokens=3)
    (prompt, continuation), = ref.pairs
    assert scorer.tokenizer.decode(continuation).startswith(" Paris")
    assert ref.predictions[0].tolist() == continuation  # greedy: teacher forcing reproduces it
    assert score(scorer, [record], [ref])[0]["locality"] == 1.0


def test_a_patch_that_damages_an_mlp_lowers_locality(smollm, scorer, data_dir):
    records = read_records(data_dir / "counterfact.jsonl", n=2)
    refs = reference(scorer, records)
    stack = PatchStack(smollm.model, base_model="smollm2-135m", architecture="LlamaForCausalLM")
    name = "model.layers.2.mlp.down_proj.weight"
    weight = smollm.model.get_parameter(name)
    before = weight.detach().clone()
    noise = torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)) * 0.5  # (out, in)
    patch = stack.stamp(Patch(kind="delta", method="damage", base_model="", base_fingerprint="",
                              tensors={f"delta.{name}.full": noise}))
    stack.apply(patch)
    try:
        damaged = score(scorer, records, refs)
        # the EasyEdit #643 mistake: a reference taken from the edited model hides the damage
        self_reference = score(scorer, records, reference(scorer, records))
    finally:
        stack.revert(patch.id)
    assert all(row["locality"] < 0.8 for row in damaged)
    assert [row["locality"] for row in self_reference] == [1.0, 1.0]
    assert torch.equal(weight, before)


def test_fluency_is_the_entropy_of_greedy_generations(scorer):
    record = fact("The Eiffel Tower is located in the city of", "The Eiffel Tower", "Paris")
    (row,) = score(scorer, [record], None, fluency_tokens=16)
    (text,) = scorer.generate_text([record.requests[0].text], 16)
    assert text.startswith(" Paris")
    assert row["fluency"] == pytest.approx(ngram_entropy(text)) and row["fluency"] > 1.0


# --- the free greedy answer -----------------------------------------------------------------


def test_greedy_scores_the_free_answer_not_the_teacher_forced_tokens(scorer):
    """SmolLM2 continues the prompt with " Paris, France.". "Paris, Texas" is two thirds right
    token by token under teacher forcing (" Paris", ","), but the answer a user reads is not it."""
    prompt = "The Eiffel Tower is located in the city of"
    records = [fact(prompt, "The Eiffel Tower", "Paris"), fact(prompt, "The Eiffel Tower", "Rome"),
               fact(prompt, "The Eiffel Tower", "Paris, Texas")]
    rows = score(scorer, records, None, greedy=True)
    assert [r["reliability_greedy"] for r in rows] == [1.0, 0.0, 0.0]
    assert rows[2]["reliability"] == pytest.approx(2 / 3)
    assert all(r["generality_greedy"] is None and r["locality_greedy"] is None for r in rows)
    assert "reliability_greedy" not in score(scorer, records[:1], None)[0]  # off unless asked for


def test_greedy_portability_takes_an_alias(scorer):
    prompt = "The Eiffel Tower is located in the city of"
    probe = {"prompt": prompt, "target": "Berlin", "target_aliases": ["Paris"]}
    (row,) = score(scorer, [fact("Italy's capital is", "Italy", "Rome", portability=[probe],
                                 paraphrase_prompts=[prompt])], None, greedy=True)
    assert row["portability_greedy"] == 1.0 and row["generality_greedy"] == 0.0  # the paraphrase asks for Rome


def test_greedy_locality_compares_free_continuations_with_the_unedited_model(smollm, scorer, data_dir):
    records = read_records(data_dir / "counterfact.jsonl", n=2)
    refs = reference(scorer, records, greedy=True)
    assert all(len(r.continuations) == len(r.pairs) == 10 for r in refs)
    assert all(b == len(pair[1]) for r in refs for b, pair in zip(r.budgets, r.pairs))
    assert [row["locality_greedy"] for row in score(scorer, records, refs, greedy=True)] == [1.0, 1.0]
    stack = PatchStack(smollm.model, base_model="smollm2-135m", architecture="LlamaForCausalLM")
    name = "model.layers.2.mlp.down_proj.weight"
    noise = torch.randn(smollm.model.get_parameter(name).shape, generator=torch.Generator().manual_seed(0)) * 0.5
    patch = stack.stamp(Patch(kind="delta", method="damage", base_model="", base_fingerprint="",
                              tensors={f"delta.{name}.full": noise}))
    stack.apply(patch)
    try:
        damaged = score(scorer, records, refs, greedy=True)
    finally:
        stack.revert(patch.id)
    assert all(row["locality_greedy"] < 0.8 for row in damaged)
