"""Printing and writing evaluation results."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from edit_serve.evaluation.measure import GREEDY_METRICS, METRICS
from patches.format import replace_atomically


def fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def fmt_bytes(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.0f} MiB"


def table(result: Mapping) -> str:
    """A plain-text table of one evaluation: each metric before and after editing, teacher-forced
    and on the free greedy answer ("-" where not measured)."""
    pre = result.get("pre", {})
    mode = result["mode"] + (f" (batch {result['batch_size']})" if result["mode"] != "single" else "")
    lines = [f"{result['method']} on {result['model']}, {mode}, {result['n']} records"
             + (f" of {result['data']}" if result.get("data") else ""),
             f"{'':<12} {'teacher-forced':^19}   {'free greedy answer':^19}",
             f"{'metric':<12} {'unedited':>9} {'edited':>9}   {'unedited':>9} {'edited':>9}"]
    greedy = dict(zip(METRICS, GREEDY_METRICS))
    for m in METRICS:
        g = greedy.get(m)
        free = f"   {fmt(pre.get(g)):>9} {fmt(result.get(g)):>9}" if g else ""
        lines.append(f"{m:<12} {fmt(pre.get(m)):>9} {fmt(result.get(m)):>9}{free}")
    lines.append(f"seconds per edit {fmt(result.get('seconds_per_edit'), 2)} over {result.get('edits')} edits "
                 f"in {result.get('patches')} patches; peak memory {fmt_bytes(result.get('peak_memory_bytes'))} "
                 f"({result.get('peak_memory_kind')}; before editing {fmt_bytes(result.get('baseline_memory_bytes'))})")
    return "\n".join(lines)


def write_json(data, path: str | os.PathLike) -> Path:
    """Write JSON atomically (a half-written result is never left behind)."""
    def write(tmp: str) -> None:
        with open(tmp, "w") as fh:
            json.dump(data, fh, indent=2)
            fh.write("\n")

    return replace_atomically(path, write)
