"""benchmarks/cancel_latency.py on a tiny Llama: fine-tuning that nothing stops early is stopped
by its flag within a pass, every run, and the table renders."""

from __future__ import annotations

import json

from benchmarks.cancel_latency import CASES, markdown, measure
from editors.context import EditContext
from edit_serve.evaluation import read_records
from edit_serve.evaluation.data import requests_of
from tests.evaluation.conftest import TINY_ROWS, tiny_llama  # noqa: F401 (fixture)


def test_an_endless_edit_stops_soon_after_its_flag(tiny_llama, tmp_path):  # noqa: F811
    lm, _ = tiny_llama
    data = tmp_path / "counterfact.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in TINY_ROWS))
    _, config, _ = CASES["ft"]
    row = measure(EditContext.from_loaded(lm), "ft", requests_of(read_records(data)[:1]), config, after=0.3, runs=2)
    assert row["finished_first"] == 0 and all(r["cancelled"] for r in row["runs"])
    assert row["stop_s_max"] < 5  # a pass of the tiny model; it would run for hours unstopped
    table = markdown({"rows": {"tiny/ft": {**row, "model": "tiny", "method": "ft", "requests": 1, "after": 0.3,
                                           "recorded_at": "2026-12-06T18:00", "machine": {"host": "h",
                                                                                        "torch_threads": 1}}}})
    assert "| tiny | ft | 1 | 0.3 s |" in table
