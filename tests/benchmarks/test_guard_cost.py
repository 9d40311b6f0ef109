"""benchmarks/guard_cost.py on a tiny Llama with SERAC: a stream of guarded edits on top of the
live ones, each measured on every edit live before it, then applied; the table renders."""

from __future__ import annotations

import json

from benchmarks.guard_cost import grow, guarded_stream, markdown
from editors.context import EditContext
from edit_serve.evaluation import read_records
from tests.evaluation.conftest import TINY_ROWS, tiny_llama  # noqa: F401 (fixture)


def test_each_guarded_edit_is_measured_on_the_live_ones_then_applied(tiny_llama, tmp_path):  # noqa: F811
    lm, _ = tiny_llama
    data = tmp_path / "counterfact.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in TINY_ROWS))
    records = read_records(data)
    ctx = EditContext.from_loaded(lm)
    try:
        grow(ctx, records, 1, "serac")
        cell = guarded_stream(ctx, records, 2, "serac")
        assert len(ctx.stack.ids) == 3 and [r["edits_measured"] for r in cell["runs"]] == [1, 2]
        assert all(r["retention_before"] == r["retention_after"] == 1.0 for r in cell["runs"])  # SERAC keeps them
        assert cell["first_seconds"] == cell["runs"][0]["seconds"] and cell["later_seconds_median"] is not None
        table = markdown({"cells": {"serac/x/1": {"method": "serac", "variant": "x", "live": 1, **cell,
                                                  "threads": 1, "when": "now"}}})
        assert "| serac | x | 1 |" in table
    finally:
        ctx.stack.revert_all()
