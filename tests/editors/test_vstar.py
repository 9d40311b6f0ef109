"""v*'s steps after the first skip the blocks below the edit: the same v* as running them."""

from __future__ import annotations

import contextlib

import pytest
import torch

from editors import nethook, precision, vstar
from editors.keys import CONTEXT_TEMPLATES
from editors.nethook import block_of
from editors.vstar import VStarConfig, compute_vstar
from tests.conftest import decoder_only
from tests.editors.test_editors import REQUESTS

STEPS = 6


def _vstar(lm, module):
    cfg = VStarConfig(steps=STEPS, lr=0.5, chunk=2, dtype="float32", stop_loss=0.0)
    return compute_vstar(lm.model, lm.tokenizer, module, REQUESTS[:2], CONTEXT_TEMPLATES[:3], cfg)


@decoder_only  # v* is decoder-only
@pytest.mark.parametrize("where", ["mlp_out", "layer"])  # ROME's module; MEMIT's (a whole block)
def test_skipping_the_blocks_below_changes_nothing(tiny, where, monkeypatch):
    module = getattr(tiny.profile, where)(2)
    blocks, index = block_of(tiny.model, module)
    assert index == 2
    lowest, edited = (tiny.model.get_submodule(f"{blocks}.{i}") for i in (0, 2))
    runs = []
    plain = type(lowest).forward

    def counted(self, *args, **kwargs):  # on the class: a hook on the block would turn the skipping off
        runs.append(self)
        return plain(self, *args, **kwargs)

    def count(block):
        return sum(r is block for r in runs)

    monkeypatch.setattr(type(lowest), "forward", counted)
    with monkeypatch.context() as m:
        m.setattr(nethook.BlocksBelow, "replay", lambda self: contextlib.nullcontext())
        _vstar(tiny, module)  # the first call per model also checks the cached prompt heads
        runs.clear()
        full, full_runs, full_edited = _vstar(tiny, module), count(lowest), count(edited)
    runs.clear()
    skipped = _vstar(tiny, module)
    passes = STEPS - 1  # the last step's pass would only measure, so it does not run
    assert full_runs - count(lowest) == passes - 1  # skipped: the lowest block ran at the first pass only
    # the edited block is replayed too where the edit is at its output (MEMIT), not where it is inside
    assert full_edited - count(edited) == (passes - 1 if where == "layer" else 0)
    assert torch.equal(skipped.init, full.init)
    assert torch.allclose(skipped.target, full.target, atol=1e-5, rtol=1e-5)


def test_a_hook_on_a_block_below_turns_the_skipping_off(smollm):
    module = smollm.profile.mlp_out(3)
    handle = smollm.model.get_submodule(smollm.profile.layer(1)).register_forward_hook(lambda m, a, out: out)
    try:
        assert nethook.BlocksBelow(smollm.model, module).blocks == []
    finally:
        handle.remove()
    assert len(nethook.BlocksBelow(smollm.model, module).blocks) == 3


def test_one_step_leaves_v_star_at_the_modules_output(smollm):
    module = smollm.profile.mlp_out(3)
    cfg = VStarConfig(steps=1, chunk=2, dtype="float32")
    found = compute_vstar(smollm.model, smollm.tokenizer, module, REQUESTS[:2], CONTEXT_TEMPLATES[:3], cfg)
    assert torch.equal(found.target, found.init) and found.steps.tolist() == [1, 1]


def test_a_kept_v_star_part_is_keyed_on_the_precision_it_ran_at(smollm):
    """`auto` means bfloat16 on one CPU and float32 on another: a part made under it is kept
    under the dtype it resolved to, so a machine that resolves otherwise makes its own."""
    module = smollm.profile.mlp_out(3)
    keys = {}

    def memo(kind, key, make):
        keys[dtype] = key
        return make()

    for dtype in ("auto", "float32", "bfloat16"):
        cfg = VStarConfig(steps=1, chunk=2, dtype=dtype)
        compute_vstar(smollm.model, smollm.tokenizer, module, REQUESTS[:2], CONTEXT_TEMPLATES[:3], cfg, memo=memo)
    resolved = precision.resolved_name("auto", "cpu")
    other = ({"float32", "bfloat16"} - {resolved}).pop()
    assert keys["auto"] == keys[resolved] != keys[other]
