"""How soon an edit being computed stops once it is cancelled.

    .venv/bin/python benchmarks/cancel_latency.py [--methods rome memit ft] [--runs 3] [--threads 1]

`DELETE /v1/edits/N` (`edit_serve edits --cancel N`), or the edit's client going away, sets the
stop flag of its computation; the editor model's next forward pass then ends it with
EditCancelled (EditContext.stoppable), and the editor is free for the next edit. For each case
on the real model (a ROME edit, a MEMIT batch of 32 counterfact_batch requests, fine-tuning
that nothing stops early), an edit is computed in a thread; `after` seconds in, inside its main
loop, the flag is set, and the seconds until the thread has ended are taken, --runs times
(median). A first edit of the method, not cancelled, computes what it caches (key statistics)
before. Each case is written to benchmarks/results/cancel-latency.json as it finishes and
skipped on a rerun with the same settings; cancel-latency.md is the table.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import threading
import time
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import DATA  # noqa: E402
from benchmarks.editing import Rows, machines_line  # noqa: E402
from editors import EditCancelled  # noqa: E402
from editors.context import EditContext  # noqa: E402
from edit_serve.evaluation import read_records  # noqa: E402
from edit_serve.evaluation.data import requests_of  # noqa: E402
from edit_serve.models import load_model  # noqa: E402
from edit_serve.profiles import get_profile  # noqa: E402

log = logging.getLogger("bench.cancel_latency")

#: method -> (requests in the edit, its settings, seconds into the computation the stop comes)
CASES = {
    "rome": (1, {}, 1.0),
    "memit": (32, {}, 10.0),
    "ft": (1, {"steps": 100_000, "stop_loss": 0.0}, 3.0),
}


def stop_once(ctx: EditContext, method: str, requests, config: dict, after: float) -> dict:
    """Compute the edit in a thread, set its stop flag `after` seconds in; the seconds from the
    flag to the thread's end, and whether it ended cancelled (not finished before the flag)."""
    stop, ended = threading.Event(), {}

    def run():
        try:
            with ctx.stoppable(stop):
                ctx.compute(method, requests, config)
            ended["how"] = "finished"
        except EditCancelled:
            ended["how"] = "cancelled"
        ended["at"] = time.perf_counter()

    thread = threading.Thread(target=run, name=f"cancel-latency-{method}")
    thread.start()
    time.sleep(after)
    flagged = time.perf_counter()
    stop.set()
    thread.join()
    return {"stop_s": max(0.0, ended["at"] - flagged), "cancelled": ended["how"] == "cancelled"}


def measure(ctx: EditContext, method: str, requests, config: dict, after: float, runs: int) -> dict:
    ctx.compute(method, requests[:1], {**config, "steps": 1} if method == "ft" else config)  # caches filled
    tries = [stop_once(ctx, method, requests, config, after) for _ in range(runs)]
    stopped = [t["stop_s"] for t in tries if t["cancelled"]]
    return {"runs": tries, "stop_s_median": statistics.median(stopped) if stopped else None,
            "stop_s_max": max(stopped, default=None), "finished_first": sum(not t["cancelled"] for t in tries)}


def markdown(results: dict) -> str:
    lines = ["# How soon a cancelled edit stops", "",
             "Written by `benchmarks/cancel_latency.py`. An edit computed on the real model, its stop flag set "
             "(what `DELETE /v1/edits/N` or its client leaving does) the given seconds in; the seconds until "
             "its computation has ended, median and worst of the runs.", "",
             "| model | method | requests | stopped after | stop s (median) | stop s (max) | runs | recorded |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for row in sorted(results["rows"].values(), key=lambda r: (r["model"], r["method"])):
        median, worst = (f"{row[k]:.2f}" if row[k] is not None else "-" for k in ("stop_s_median", "stop_s_max"))
        lines.append(f"| {row['model']} | {row['method']} | {row['requests']} | {row['after']:g} s | {median} | "
                     f"{worst} | {len(row['runs'])} | {row['recorded_at'][:16]} |")
    lines += ["", machines_line(results["rows"]), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", choices=sorted(CASES), default=sorted(CASES))
    p.add_argument("--runs", type=int, default=3)
    args, results = Rows.from_cli(p, argv, "cancel_latency.py", "cancel-latency.json")
    lm = load_model(get_profile(args.model), dtype="float32")
    ctx = EditContext.from_loaded(lm)
    records = read_records(DATA / "counterfact_batch.jsonl")
    for method in tqdm(args.methods, desc="cancel latency", unit="method"):
        n, config, after = CASES[method]
        key = f"{args.model}/{method}"
        settings = {"model": args.model, "method": method, "requests": n, "config": config, "after": after,
                    "runs_asked": args.runs}
        if results.done(key, settings):
            continue
        row = measure(ctx, method, requests_of(records[:n]), config, after, args.runs)
        results.add(key, row, settings)
        log.info("%s: stopped %.2f s (median) after the flag", method, row["stop_s_median"] or float("nan"))
    (args.out / "cancel-latency.md").write_text(markdown(results.data))
    return results.data


if __name__ == "__main__":
    main()
