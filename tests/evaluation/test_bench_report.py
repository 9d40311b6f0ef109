"""benchmarks/editing_report.py: tables, acceptance lines and the chart from result entries."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from editing_report import _bar_label, markdown, render  # noqa: E402

MACHINE = {"cpus": 2, "torch_threads": 1, "device": "cpu"}


def quality(method, mode, reliability, locality, batch=1):
    return {"suite": "quality", "data": "counterfact.jsonl", "model": "smollm2-135m", "method": method, "mode": mode,
            "batch_size": batch, "n": 100, "reliability": reliability, "generality": 0.7, "locality": locality,
            "portability": 0.3, "fluency": 5.0, "pre": {"reliability": 0.0, "generality": 0.1, "portability": 0.1,
                                                         "fluency": 5.1},
            "seconds_per_edit": 12.0, "peak_memory_bytes": 2**30, "recorded_at": "2026-01-01T00:00:00",
            "machine": MACHINE}


def timing(method, seconds, model="smollm2-135m", device="cpu"):
    return {"suite": "timing", "model": model, "method": method, "data": "counterfact.jsonl", "records_per_run": 5,
            "runs": 3, "seconds_per_edit": seconds,
            "per_run": [{"seconds_per_edit": s} for s in (seconds, seconds, 9.0)],
            "peak_memory_bytes": 2**30, "baseline_memory_bytes": 2**29, "parameters": 1.35e8,
            "recorded_at": "2026-01-01T00:00:00", "machine": {**MACHINE, "device": device}}


def test_markdown_tables_and_acceptance_lines():
    entries = {
        "quality/counterfact/smollm2-135m/rome/single-1": quality("rome", "single", 1.0, 0.95),
        "quality/counterfact/smollm2-135m/memit/batch-100": quality("memit", "batch", 0.5, 0.97, batch=100),
        "timing/smollm2-135m/cpu/rome": timing("rome", 12.5),
        "timing/random-gpt-j-6b/cuda/rome": timing("rome", 3.0, model="random-gpt-j-6b", device="cuda"),
        "quality/zsre/smollm2-135m/rome/single-1": {**quality("rome", "single", 0.8, 0.5), "data": "zsre.jsonl"},
    }
    text = markdown(entries)
    assert "zsre.jsonl, 100 records" not in text  # the quality bars are on CounterFact only
    assert "| smollm2-135m | rome | single | 100 | 0.00 → 0.800 |" in text
    assert "| smollm2-135m | rome | single | 100 | 0.00 → 1.000 | 0.10 → 0.700 | 0.950 |" in text
    assert "batch, 100 per patch" in text
    assert "quality rome (smollm2-135m, counterfact.jsonl, 100 records): reliability 1.000 >= 0.95: met; " \
           "locality 0.950 >= 0.9: met" in text
    assert "reliability 0.500 >= 0.9: MISSED" in text
    assert "timing rome (smollm2-135m, counterfact.jsonl, 5 records per run): " \
           "seconds_per_edit 12.500 <= 20.0: met" in text
    assert "timing rome (random-gpt-j-6b, counterfact.jsonl, 5 records per run): " \
           "seconds_per_edit 3.000 <= 2.0: MISSED" in text
    assert "12.50, 12.50, 9.00" in text


def test_render_writes_markdown_and_a_png(tmp_path):
    pytest.importorskip("matplotlib", reason="the chart needs the bench extra (pip install -e '.[bench]')")
    entries = {"quality/counterfact/smollm2-135m/rome/single-1": quality("rome", "single", 1.0, 0.95),
               "timing/smollm2-135m/cpu/rome": timing("rome", 12.5)}
    render(entries, tmp_path / "e.md", tmp_path / "e.png")
    assert (tmp_path / "e.md").read_text() == markdown(entries)
    assert (tmp_path / "e.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bar_labels_say_how_records_were_grouped():
    assert _bar_label(quality("rome", "single", 0.97, 0.95)) == "rome\nN=100"
    assert _bar_label(quality("memit", "batch", 0.96, 0.86, batch=100)) == "memit\nbatch/100\nN=100"
    stream = {**quality("alphaedit", "sequential", 0.8, 0.5, batch=10), "n": 1000}
    assert _bar_label(stream) == "alphaedit\nseq/10\nN=1000"


def test_the_chart_leaves_variants_to_the_tables(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib", reason="the chart needs the bench extra (pip install -e '.[bench]')")
    import editing_report

    drawn = []
    monkeypatch.setattr(editing_report, "_bar_label", lambda e: drawn.append(e["method"]) or e["method"])
    entries = {"quality/a": quality("rome", "single", 0.97, 0.95),
               "quality/b": quality("rome[bf16]", "single", 0.97, 0.95)}
    editing_report.chart(entries, tmp_path / "e.png")
    assert drawn == ["rome"]
