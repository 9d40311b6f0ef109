"""benchmarks/null_capacity.py: the occupancy and cross-talk figures on keys of known rank and placement."""

from __future__ import annotations

import pytest
import torch

from benchmarks.null_capacity import crosstalk, occupancy


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


def test_crosstalk_is_what_the_other_edits_push_into_a_prompt():
    g = torch.Generator().manual_seed(1)
    basis, _ = torch.linalg.qr(torch.randn(32, 32, generator=g, dtype=torch.float64))
    keys = 10 * basis[:, :4].T  # four orthogonal edit keys (4, 32)
    proj = torch.eye(32, dtype=torch.float64)  # everything is null space
    apart = 10 * basis[:, 10][None]  # a prompt whose key no edit touches
    shared = keys[2][None]  # a prompt of edit 0 whose key is edit 2's
    got = crosstalk(keys, proj, 1e-6, [torch.cat([apart, shared])], [0])
    assert got["fit"] == pytest.approx(1.0, abs=1e-4)
    assert got["cross_talk"] == pytest.approx(1.0, abs=1e-3)  # edit 2's whole residual, at the shared position
    assert crosstalk(keys, proj, 1e-6, [apart], [0])["cross_talk"] == pytest.approx(0.0, abs=1e-4)
    alone = crosstalk(keys, proj, 1e-6, [torch.cat([apart, shared])], [2])
    assert alone["cross_talk"] == pytest.approx(0.0, abs=1e-4)  # its own edit is left out
    damped = crosstalk(keys, proj, 100.0, [shared], [0])  # a ridge as big as |k|^2 halves both
    assert damped["fit"] == pytest.approx(0.5, abs=1e-3) and damped["cross_talk"] == pytest.approx(0.5, abs=1e-3)
    outside = crosstalk(keys, basis[:, 4:] @ basis[:, 4:].T, 1e-6, [shared], [0])  # no null room for the keys
    assert outside["fit"] == pytest.approx(0.0, abs=1e-4) and outside["cross_talk"] == pytest.approx(0.0, abs=1e-4)
