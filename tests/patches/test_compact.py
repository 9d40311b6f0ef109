"""Compaction: one patch equal to several, swapped in as one change-set (PatchStack.replace)."""

from __future__ import annotations

import pytest
import torch

from patches import BASE_VERSION, Patch, PatchError, PatchStack, from_bytes, to_bytes
from patches.compact import compact
from tests.conftest import load_tiny
from tests.patches.conftest import assert_identical, rank_one, snapshot

DOWN = "model.layers.{}.mlp.down_proj.weight"


@pytest.fixture
def stack(tmp_path_factory) -> PatchStack:
    lm = load_tiny("llama-3-8b", tmp_path_factory.mktemp("llama"))
    return PatchStack(lm.model, base_model=lm.profile.name, architecture=lm.profile.architecture)


def dense(stack: PatchStack, param: str, seed: int) -> Patch:
    w = stack.model.get_parameter(param)
    full = torch.randn(w.shape, generator=torch.Generator().manual_seed(seed)) * 1e-2
    return stack.stamp(Patch(kind="delta", method="ft", base_model="", base_fingerprint="",
                             tensors={f"delta.{param}.full": full}, requests=[{"prompt": "dense", "seed": seed}]))


def compacted(stack: PatchStack, patches: list[Patch]) -> Patch:
    shapes = {name: stack.parameter(name).shape for p in patches for name in p.deltas()}
    return stack.stamp(compact(patches, shapes))


def test_compacted_patch_gives_the_same_weights_and_reverts_exactly(stack):
    base = snapshot(stack.model)
    patches = [rank_one(stack, DOWN.format(1), seed=s, scale=0.1) for s in range(5)]
    patches += [rank_one(stack, DOWN.format(2), seed=9, scale=0.1), dense(stack, DOWN.format(2), seed=3)]
    for p in patches:
        stack.apply(p)
    before = snapshot(stack.model)
    one = from_bytes(to_bytes(compacted(stack, patches)))  # survives a round trip through the file format
    forms = {d.param: (d.form, d.rank) for d in one.deltas().values()}
    assert forms == {DOWN.format(1): ("low_rank", 5), DOWN.format(2): ("dense", None)}
    assert one.requests == [r for p in patches for r in p.requests]
    assert one.config["replaces"] == [p.id for p in patches]

    stack.replace([one.id], [one])
    assert stack.ids == [one.id]
    after = snapshot(stack.model)
    for name in before:
        torch.testing.assert_close(after[name], before[name], rtol=1e-5, atol=1e-6)
    # concatenated factors: the same product the stack computed for the run of rank-one patches
    assert torch.equal(after[DOWN.format(1)], before[DOWN.format(1)])
    stack.revert(one.id)
    assert stack.version == BASE_VERSION
    assert_identical(stack.model, base)


def test_high_total_rank_becomes_dense(stack):
    w = stack.parameter(DOWN.format(0))
    n = min(w.shape)  # rank n * (out + in) is over out * in
    patches = [rank_one(stack, DOWN.format(0), seed=s, scale=0.01) for s in range(n)]
    one = compacted(stack, patches)
    assert [d.form for d in one.deltas().values()] == ["dense"]


def test_replace_is_one_change_and_undoes_exactly(stack):
    patches = [rank_one(stack, DOWN.format(i % 2), seed=i, scale=0.1) for i in range(4)]
    for p in patches:
        stack.apply(p)
    state, ids = snapshot(stack.model), stack.ids
    one = compacted(stack, patches[1:3])
    stack.replace([patches[0].id, one.id, patches[3].id], [one])  # where the first replaced one stood
    assert stack.ids == [patches[0].id, one.id, patches[3].id]
    stack.replace(ids, patches[1:3])  # the undo: the old set, in its old order
    assert stack.ids == ids
    assert_identical(stack.model, state)


def test_replace_refuses_and_changes_nothing(stack):
    patches = [rank_one(stack, DOWN.format(1), seed=s) for s in range(2)]
    for p in patches:
        stack.apply(p)
    state, version = snapshot(stack.model), stack.version
    broken = rank_one(stack, DOWN.format(3), seed=5).replace(base_fingerprint="0" * 32)
    with pytest.raises(PatchError, match="wrong base model"):
        stack.replace([broken.id], [broken])
    with pytest.raises(PatchError, match="neither active nor given"):
        stack.replace(["ab" * 12], [])
    assert stack.version == version
    assert_identical(stack.model, state)


def test_compaction_refuses_what_it_cannot_merge(stack):
    one = rank_one(stack, DOWN.format(1))
    with pytest.raises(PatchError, match="at least two"):
        compact([one], {DOWN.format(1): stack.parameter(DOWN.format(1)).shape})
    other = one.replace(base_model="another-model")
    with pytest.raises(PatchError, match="different models"):
        compact([one, other], {DOWN.format(1): stack.parameter(DOWN.format(1)).shape})


def test_real_rome_patches_compact_to_the_same_weights(smollm, data_dir):
    """Two ROME edits of SmolLM2 (rank one each, on layer 3's MLP output) and their compaction."""
    from editors import compute_patch

    stack = PatchStack(smollm.model, base_model=smollm.profile.name, architecture=smollm.profile.architecture)
    config = {"stats_corpus": str(data_dir / "wikitext2_valid.txt"), "stats_samples": 100}
    requests = [{"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": "Rome"},
                {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "target_new": "English"}]
    base = snapshot(smollm.model)
    patches = [compute_patch("rome", smollm.model, smollm.tokenizer, smollm.profile, [r], config) for r in requests]
    try:
        for p in patches:
            stack.apply(p)
        before = snapshot(smollm.model)
        one = compacted(stack, patches)
        assert [(d.form, d.rank) for d in one.deltas().values()] == [("low_rank", 2)]
        stack.replace([one.id], [one])
        after = snapshot(smollm.model)
        for name in before:
            torch.testing.assert_close(after[name], before[name], rtol=1e-5, atol=1e-6)
    finally:
        stack.revert_all()
    assert_identical(smollm.model, base)
