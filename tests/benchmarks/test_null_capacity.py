"""benchmarks/null_capacity.py: the occupancy figures on keys of known rank and placement."""

from __future__ import annotations

import pytest
import torch

from benchmarks.null_capacity import occupancy


def test_occupancy_counts_the_directions_keys_take_inside_the_null_space():
    g = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(64, 64, generator=g))
    null, rest = basis[:, :40], basis[:, 40:]
    proj = null @ null.T  # a 40-dimensional null space
    inside = torch.randn(30, 5, generator=g) @ null[:, :5].T  # 30 keys in 5 of its directions
    occ = occupancy(inside, proj)
    assert occ["rank99"] <= 5 and occ["energy_in_null"] == pytest.approx(1.0)
    outside = torch.randn(30, 24, generator=g) @ rest.T
    assert occupancy(outside + 1e-3 * inside, proj)["energy_in_null"] < 1e-4
    spread = occupancy(torch.randn(200, 64, generator=g), proj)
    assert 30 <= spread["rank99"] <= 40 and spread["rank90"] < spread["rank99"]
    assert spread["energy_in_null"] == pytest.approx(40 / 64, abs=0.1)
