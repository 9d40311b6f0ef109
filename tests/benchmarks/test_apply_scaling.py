"""benchmarks/apply_scaling.py on a tiny Llama: a row per size with the compacted figures where
there is something to compact, the table written, a rerun skips what is recorded, and the model
is left as it was."""

from __future__ import annotations

import json

import torch

from benchmarks import apply_scaling
from tests.evaluation.conftest import tiny_llama  # noqa: F401 (fixture)


def test_rows_per_size_resume_and_leave_the_model(tiny_llama, tmp_path, monkeypatch):  # noqa: F811
    lm, profile_file = tiny_llama
    monkeypatch.setattr(apply_scaling, "load_model", lambda profile, dtype: lm)
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    argv = ["--model", str(profile_file), "--sizes", "0", "3", "--repeats", "2", "--out", str(tmp_path),
            "--threads", "1"]
    rows = apply_scaling.main(argv)["rows"]
    assert sorted(r["n"] for r in rows.values()) == [0, 3]
    three = next(r for r in rows.values() if r["n"] == 3)
    assert three["apply_ms"] > 0 and three["compacted_apply_ms"] > 0 and len(three["params"]) >= 1
    assert "compacted_apply_ms" not in next(r for r in rows.values() if r["n"] == 0)
    assert all(torch.equal(p, before[n]) for n, p in lm.model.named_parameters())
    table = (tmp_path / "apply-scaling.md").read_text()
    assert "| 3 |" in table and "| 0 |" in table
    recorded = json.loads((tmp_path / "apply-scaling.json").read_text())
    again = apply_scaling.main(argv)
    assert again == recorded  # nothing measured again
