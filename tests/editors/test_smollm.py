"""Edits on the real SmolLM2-135M: ROME rewrites CounterFact record 0 (Danielle Darrieux's
mother tongue: French -> English) and leaves other facts alone; MEMIT writes a small batch.
Statistics come from a small slice of WikiText (cached after the first run)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from editors import EditRequest, compute_patch
from editors.keys import CONTEXT_TEMPLATES, subject_io
from editors.lm import logits_at, scored_positions, target_batch, target_nll
from editors.rome import ROMEConfig
from editors.vstar import compute_vstar
from patches import PatchStack

DARRIEUX = EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English", "French")
# unrelated prompts and the unedited model's greedy answers
OTHERS = {
    "The mother tongue of Jacques Chirac is": " French",
    "Michel Rocard is a native speaker of": " the French language",
    "The Eiffel Tower is located in the city of": " Paris",
    "The official language of Italy is": " Italian",
    "The capital of Germany is": " Berlin",
    "The mother tongue of Pablo Picasso is": " Spanish",
}


@pytest.fixture(scope="module")
def stats(data_dir):
    return {"stats_corpus": str(data_dir / "wikitext2_valid.txt"), "stats_samples": 200, "stats_length": 64}


@pytest.fixture(scope="module")
def rome_patch(smollm, stats):
    return compute_patch("rome", smollm.model, smollm.tokenizer, smollm.profile, [DARRIEUX], stats)


@torch.no_grad()
def greedy(lm, prompt: str, tokens: int = 4) -> str:
    ids = lm.tokenizer(prompt, return_tensors="pt")
    out = lm.model.generate(**ids, max_new_tokens=tokens, do_sample=False, pad_token_id=lm.tokenizer.pad_token_id)
    return lm.tokenizer.decode(out[0, ids.input_ids.shape[1]:])


def test_rome_rewrites_darrieux_and_keeps_other_facts(smollm, rome_patch):
    assert greedy(smollm, DARRIEUX.text).startswith(" French")
    for prompt, answer in OTHERS.items():
        assert greedy(smollm, prompt).startswith(answer), prompt
    before = {n: p.detach().clone() for n, p in smollm.model.named_parameters()}

    patch = rome_patch  # computed by the fixture, on this same model
    assert all(torch.equal(p, before[n]) for n, p in smollm.model.named_parameters())
    (delta,) = patch.deltas().values()
    assert delta.param == smollm.profile.mlp_out(smollm.profile.default_layers("rome")[0]) + ".weight"
    assert delta.rank == 1

    stack = PatchStack(smollm.model, base_model=smollm.profile.name, architecture=smollm.profile.architecture)
    stack.apply(patch)
    try:
        assert greedy(smollm, DARRIEUX.text).startswith(" English")
        assert greedy(smollm, "Danielle Darrieux's mother tongue is").startswith(" English")  # a paraphrase
        for prompt, answer in OTHERS.items():
            assert greedy(smollm, prompt).startswith(answer), prompt
    finally:
        stack.revert(patch.id)
    assert all(torch.equal(p, before[n]) for n, p in smollm.model.named_parameters())
    assert greedy(smollm, DARRIEUX.text).startswith(" French")


def test_rome_maps_the_key_to_v_star(smollm, stats, rome_patch):
    """The rank-one update sends the subject's key (bare prompt) exactly to v*."""
    cfg = ROMEConfig(**stats)
    module = smollm.profile.mlp_out(smollm.profile.default_layers("rome")[0])
    vstar = compute_vstar(smollm.model, smollm.tokenizer, module, [DARRIEUX], CONTEXT_TEMPLATES, cfg.vstar())
    stack = PatchStack(smollm.model)
    stack.apply(rome_patch)
    try:
        _, out = subject_io(smollm.model, smollm.tokenizer, module, [DARRIEUX])
    finally:
        stack.revert(rome_patch.id)
    assert torch.allclose(out, vstar.target, atol=1e-3 * float(vstar.target.norm()))


def test_memit_writes_a_batch(smollm, stats, data_dir):
    import json

    records = [json.loads(line) for line in (data_dir / "counterfact.jsonl").open()][:4]
    requests = [EditRequest.from_dict(r) for r in records]
    layers = smollm.profile.default_layers("memit")
    patch = compute_patch("memit", smollm.model, smollm.tokenizer, smollm.profile, requests, stats)
    assert sorted(patch.deltas()) == sorted(smollm.profile.mlp_out(x) + ".weight" for x in layers)
    assert all(d.rank == len(requests) for d in patch.deltas().values())
    stack = PatchStack(smollm.model)
    stack.apply(patch)
    try:
        answers = [greedy(smollm, r.text, 3) for r in requests]
    finally:
        stack.revert(patch.id)
    hits = sum(a.strip().startswith(r.target_new.split()[0]) for a, r in zip(answers, requests))
    assert hits >= 3, list(zip(answers, [r.target_new for r in requests]))


@torch.no_grad()
def target_logprob(lm, prompt: str, target: str) -> float:
    """log p(target | prompt), teacher-forced, per target token (the editors' own scoring)."""
    batch = target_batch(lm.model, lm.tokenizer, [(prompt, target)])
    return -float(target_nll(logits_at(lm.model, batch.inputs, *scored_positions(batch)), batch)[0])


def test_rome_fitted_to_a_rephrasing_answers_it_too(smollm, stats, rome_patch):
    """An edit carries to another wording only as far as the model does on its own; one fitted
    to that wording as well (EditRequest.rephrasings) answers it, and still answers its prompt."""
    rephrasing = "{} grew up speaking"
    fitted = compute_patch("rome", smollm.model, smollm.tokenizer, smollm.profile,
                           [dataclasses.replace(DARRIEUX, rephrasings=(rephrasing,))], stats)
    assert fitted.requests[0]["rephrasings"] == [rephrasing]
    stack = PatchStack(smollm.model, base_model=smollm.profile.name, architecture=smollm.profile.architecture)
    figures = {}
    for name, patch in (("prompt alone", rome_patch), ("fitted", fitted)):
        stack.apply(patch)
        try:
            figures[name] = [target_logprob(smollm, text, "English")
                             for text in (DARRIEUX.text, rephrasing.format(DARRIEUX.subject))]
        finally:
            stack.revert(patch.id)
    (prompt_alone, carried), (prompt_fitted, answered) = figures["prompt alone"], figures["fitted"]
    assert answered > math.log(0.8) and answered > carried + 0.5, figures  # measured: -0.05 against -1.53
    assert prompt_fitted > math.log(0.9), figures


def test_null_space_rrome_edits_on_top_and_keeps_the_first(smollm, stats):
    """rome with same_key and null_space, computed on top of an active edit through one
    context: the second edit takes, the first still holds, other facts stay."""
    from editors.context import EditContext

    lifelong = {**stats, "same_key": True, "prompt_key_weight": 0.5, "null_space": True}
    second = EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris")
    before = {n: p.detach().clone() for n, p in smollm.model.named_parameters()}
    ctx = EditContext.from_loaded(smollm)
    first = ctx.compute("rome", [DARRIEUX], lifelong)
    ctx.stack.apply(first)
    try:
        patch = ctx.compute("rome", [second], lifelong)
        assert patch.base_fingerprint == first.base_fingerprint
        ctx.stack.apply(patch)
        assert greedy(smollm, second.text).startswith(" Rome")
        assert greedy(smollm, DARRIEUX.text).startswith(" English")
        kept = {p: a for p, a in OTHERS.items() if "Eiffel" not in p}
        assert sum(greedy(smollm, p).startswith(a) for p, a in kept.items()) >= len(kept) - 1
    finally:
        ctx.stack.revert_all()
    assert all(torch.equal(p, before[n]) for n, p in smollm.model.named_parameters())


def test_a_stream_of_edits_does_not_grow_the_process(smollm, stats, data_dir):
    """AlphaEdit edits one after another, each applied: the process's resident memory stays at
    what is live. Without handing freed heap memory back after each edit, glibc kept ~45 MB per
    edit mapped, and a 1,000-edit stream was killed at 24 GB."""
    import psutil

    from editors.context import EditContext
    from edit_serve.evaluation import read_records, requests_of

    records = read_records(data_dir / "counterfact_batch.jsonl", 12)
    config = {**stats, "v_steps": 5}
    process = psutil.Process()
    ctx = EditContext.from_loaded(smollm)
    resident = []
    try:
        for record in records:
            ctx.stack.apply(ctx.compute("alphaedit", requests_of([record]), config))
            resident.append(process.memory_info().rss)
    finally:
        ctx.stack.revert_all()
    grown = (resident[-1] - resident[2]) / 2**20  # after the first edits have filled the caches
    assert grown < 60, [round(r / 2**20) for r in resident]
