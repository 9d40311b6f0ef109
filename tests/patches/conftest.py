"""Patches built by hand for the patch-layer tests."""

from __future__ import annotations

import pytest
import torch

from patches import Patch, PatchStack


def rank_one(stack: PatchStack, param: str, scale: float = 1.0, seed: int = 0, method: str = "manual") -> Patch:
    """A valid rank-one patch on `param`, stamped for the stack's model."""
    w = stack.model.get_parameter(param)
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(w.shape[0], 1, generator=g) * scale
    a = torch.randn(1, w.shape[1], generator=g)
    patch = Patch(kind="delta", method=method, base_model="", base_fingerprint="",
                  tensors={f"delta.{param}.B": b, f"delta.{param}.A": a},
                  requests=[{"prompt": "test", "seed": seed}])
    return stack.stamp(patch)


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_identical(model: torch.nn.Module, snap: dict[str, torch.Tensor]) -> None:
    now = model.state_dict()
    assert now.keys() == snap.keys()
    changed = [k for k in snap if not torch.equal(now[k], snap[k])]
    assert not changed, f"weights changed: {changed[:5]}"


@pytest.fixture
def llama(tmp_path_factory):
    """A tiny Llama (float32) with a fresh PatchStack."""
    from tests.conftest import load_tiny

    lm = load_tiny("llama-3-8b", tmp_path_factory.mktemp("llama"))
    return lm
