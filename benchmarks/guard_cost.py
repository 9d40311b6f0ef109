"""What a guarded edit costs as edits pile up: the dry-run measurement a guard makes before
each apply, on top of N live SERAC edits.

    .venv/bin/python benchmarks/guard_cost.py [--sizes 100 300 1000] [--runs 3] [--variant NAME]

The edit worker's path, in process: an editor's model copy (SmolLM2, hf) carries N memory
patches (SERAC, one per record of counterfact_batch.jsonl, each computed on top of the ones
before); then `--runs` new edits in a row are each measured as a guarded apply measures them
(`edit_serve.dry_run.measure` with the worker's memo, on the default probe pool) and applied.
The first measurement of a size finds no memo (the cost of a server's first guarded edit);
the later ones find the state before them measured by the edit before. Each cell (size,
variant) is written to benchmarks/results/guard-cost.json as soon as it finishes and skipped on
a rerun; guard-cost.md is the table.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import DATA  # noqa: E402
from editors.context import EditContext  # noqa: E402
from edit_serve.dry_run import Measured, default_probe_prompts, figures, measure  # noqa: E402
from edit_serve.evaluation import read_records, write_json  # noqa: E402
from edit_serve.evaluation.data import requests_of  # noqa: E402
from edit_serve.models import load_model  # noqa: E402
from edit_serve.profiles import get_profile  # noqa: E402

log = logging.getLogger("bench.guard_cost")


def grow(ctx: EditContext, records, upto: int, method: str) -> None:
    """Apply edits of `records` one after another until `upto` patches are live."""
    for record in tqdm(records[len(ctx.stack.ids):upto], desc=f"{method} edits to {upto}", unit="edit"):
        ctx.stack.apply(ctx.compute(method, requests_of([record])))


def guarded_stream(ctx: EditContext, records, runs: int, method: str) -> dict:
    """`runs` new edits, each measured as a guarded apply measures it, then applied."""
    memo, probes, rows = Measured(ctx.stack), default_probe_prompts(), []
    for record in tqdm(records[len(ctx.stack.ids):len(ctx.stack.ids) + runs], desc="guarded edits", unit="edit"):
        patch = ctx.compute(method, requests_of([record]))
        started = time.perf_counter()
        report = measure(ctx.model, ctx.tokenizer, ctx.stack, patch, probes, memo=memo)
        seconds = time.perf_counter() - started
        measured = figures(report)
        rows.append({"seconds": round(seconds, 3), "retention_before": measured["retention_before"],
                     "retention_after": measured["retention_after"], "locality_after": measured["locality_after"],
                     "edits_measured": measured["edits"]})
        log.info("guarded measurement on %d live edits: %.1f s (retention %s -> %s)", len(ctx.stack.ids), seconds,
                 measured["retention_before"], measured["retention_after"])
        ctx.stack.apply(patch)
    return {"first_seconds": rows[0]["seconds"],
            "later_seconds_median": statistics.median(r["seconds"] for r in rows[1:]) if runs > 1 else None,
            "runs": rows}


def markdown(results: dict) -> str:
    lines = ["# Guarded edits as edits pile up (benchmarks/guard_cost.py)", "",
             "Seconds of the dry-run measurement a guarded apply makes before each edit, on top of N live",
             "edits (the edit worker's path, in process: `edit_serve.dry_run.measure` with its memo, default",
             "probe pool). The first finds no memo; the later ones (median) find the state before them",
             "measured by the edit before.", "",
             "| method | variant | live edits | first (s) | later, median (s) | retention after | torch threads | "
             "when |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for key in sorted(results["cells"], key=lambda k: (results["cells"][k]["variant"], results["cells"][k]["live"])):
        c = results["cells"][key]
        later = "-" if c["later_seconds_median"] is None else f"{c['later_seconds_median']:.2f}"
        lines.append(f"| {c['method']} | {c['variant']} | {c['live']:,} | {c['first_seconds']:.2f} | {later} | "
                     f"{c['runs'][-1]['retention_after']:.3f} | {c['threads']} | {c['when']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 300, 1000])
    parser.add_argument("--runs", type=int, default=3, help="guarded edits in a row at each size")
    parser.add_argument("--method", default="serac")
    parser.add_argument("--variant", default="default", help="a label for the code or settings measured")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    path = args.out / "guard-cost.json"
    results = json.loads(path.read_text()) if path.exists() else {"cells": {}}
    sizes = sorted(s for s in args.sizes if f"{args.method}/{args.variant}/{s}" not in results["cells"])
    if not sizes:
        log.info("every cell is recorded in %s", path)
        return
    records = read_records(args.data / "counterfact_batch.jsonl", max(sizes) + args.runs)
    ctx = EditContext.from_loaded(load_model(get_profile(args.model), dtype="float32"))
    for size in sizes:
        grow(ctx, records, size, args.method)
        for patch_id in ctx.stack.ids[size:]:  # the guarded edits of the size before
            ctx.stack.revert(patch_id)
        cell = guarded_stream(ctx, records, args.runs, args.method)
        results["cells"][f"{args.method}/{args.variant}/{size}"] = {
            "method": args.method, "variant": args.variant, "live": size, **cell, "threads": args.threads,
            "when": datetime.now(timezone.utc).isoformat(timespec="minutes")}
        write_json(results, path)
        (args.out / "guard-cost.md").write_text(markdown(results))


if __name__ == "__main__":
    main()
