"""Patch format 1: round trip, content ids, and the malformed-input table."""

from __future__ import annotations

import pytest
import torch

from safetensors.torch import save as st_save

from patches import Patch, PatchError, PatchStack, from_bytes, inspect, load, save, to_bytes
from patches.format import PREFIX
from tests.patches.conftest import assert_identical, rank_one, snapshot
from tests.patches.malformed import malformed_cases


@pytest.fixture
def stack(llama):
    return PatchStack(llama.model, base_model=llama.profile.name, architecture=llama.profile.architecture)


def test_round_trip_keeps_everything(stack, tmp_path):
    patch = rank_one(stack, "model.layers.1.mlp.down_proj.weight").replace(eval={"reliability": 1.0})
    path = save(patch, tmp_path / "p.safetensors")
    loaded = load(path)
    assert loaded.id == patch.id
    assert loaded.metadata() == patch.metadata()
    for name, t in patch.tensors.items():
        assert torch.equal(loaded.tensors[name], t)
    summary = inspect(path)
    assert summary["targets"][0]["form"] == "low_rank" and summary["targets"][0]["rank"] == 1
    assert summary["eval"] == {"reliability": 1.0}


def test_id_is_a_content_hash(stack):
    p1 = rank_one(stack, "model.layers.1.mlp.down_proj.weight", seed=1)
    same = rank_one(stack, "model.layers.1.mlp.down_proj.weight", seed=1).replace(created_at="2000-01-01",
                                                                                  eval={"x": 1})
    other = rank_one(stack, "model.layers.1.mlp.down_proj.weight", seed=2)
    assert p1.id != same.id  # one id, one content: the time of creation and eval figures count
    assert p1.edit_key == same.edit_key  # ... but the change they make is the same
    assert p1.id != other.id and p1.edit_key != other.edit_key


def test_files_with_legacy_ids_keep_loading_under_their_id(stack):
    """Files written before the id covered created_at and eval carry the edit key as id."""
    patch = rank_one(stack, "model.layers.1.mlp.down_proj.weight", seed=1).replace(eval={"reliability": 1.0})
    meta = {PREFIX + k: v for k, v in patch.metadata().items()}
    meta[PREFIX + "id"] = patch.edit_key
    legacy = st_save(dict(patch.tensors), metadata=meta)
    loaded = from_bytes(legacy)
    assert loaded.id == patch.edit_key and from_bytes(to_bytes(loaded)).id == patch.edit_key


def test_all_delta_forms_round_trip(stack):
    w = stack.model.get_parameter("model.layers.0.mlp.down_proj.weight")  # (64, 128)
    up = stack.model.get_parameter("model.layers.0.mlp.up_proj.weight")  # (128, 64)
    patch = stack.stamp(Patch(kind="delta", method="manual", base_model="", base_fingerprint="", tensors={
        "delta.model.layers.0.mlp.down_proj.weight.cols": torch.randn(w.shape[0], 3),
        "delta.model.layers.0.mlp.down_proj.weight.index": torch.tensor([0, 5, 9]),
        "delta.model.layers.0.mlp.up_proj.weight.rows": torch.randn(2, up.shape[1]).to(torch.bfloat16),
        "delta.model.layers.0.mlp.up_proj.weight.index": torch.tensor([1, 2], dtype=torch.int32),
        "delta.model.layers.1.mlp.down_proj.weight.full": torch.randn(w.shape) * 1e-3,
    }))
    loaded = from_bytes(to_bytes(patch))
    assert {d.form for d in loaded.deltas().values()} == {"cols", "rows", "dense"}
    stack.check(loaded)


@pytest.mark.parametrize("case", range(32))
def test_malformed_inputs_get_one_line_errors_and_change_nothing(stack, case):
    valid = rank_one(stack, "model.layers.2.mlp.down_proj.weight")
    cases = malformed_cases(stack, valid)
    assert len(cases) == 32
    name, data, expected = cases[case]
    before = snapshot(stack.model)
    with pytest.raises(PatchError) as err:
        patch = from_bytes(data)
        stack.apply(patch)
    message = str(err.value)
    assert expected.lower() in message.lower(), f"{name}: {message}"
    assert "\n" not in message and len(message) < 400, name
    assert_identical(stack.model, before)
    assert stack.active == []


def test_size_limit(stack):
    data = to_bytes(rank_one(stack, "model.layers.2.mlp.down_proj.weight"))
    with pytest.raises(PatchError, match="over the limit"):
        from_bytes(data, max_bytes=len(data) - 1)


def test_missing_file():
    with pytest.raises(PatchError, match="no such patch file"):
        load("/nonexistent/patch.safetensors")


def test_add_all_sums_runs_of_low_rank_deltas_in_one_product_and_keeps_the_order():
    """A run of low-rank deltas is added as one product of their concatenated factors; other
    forms between them are added where they stand. The sum is the one-by-one sum."""
    from patches.format import Delta, add_all

    g = torch.Generator().manual_seed(0)
    out, inp = 12, 20

    def low_rank(r):
        return Delta("w", "low_rank", {"B": torch.randn(out, r, generator=g), "A": torch.randn(r, inp, generator=g)})

    deltas = [low_rank(1), low_rank(2), Delta("w", "dense", {"full": torch.randn(out, inp, generator=g)}),
              low_rank(1),
              Delta("w", "rows", {"rows": torch.randn(2, inp, generator=g), "index": torch.tensor([3, 3])}),
              low_rank(3), low_rank(1), low_rank(1)]
    base = torch.randn(out, inp, generator=g)
    one_by_one = base.clone()
    for d in deltas:
        d.add_to(one_by_one)
    together = base.clone()
    add_all(deltas, together)
    torch.testing.assert_close(together, one_by_one, rtol=1e-6, atol=1e-5)
    again = base.clone()
    add_all(deltas, again)
    assert torch.equal(again, together)  # the same deltas give the same weights, bit for bit
