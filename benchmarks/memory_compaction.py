"""Memory compaction benchmark: a server's SERAC edits merged into one memory patch.

    .venv/bin/python benchmarks/memory_compaction.py [--edits 1000] [--runs 3]

On a real server (`edit_serve serve`, hf engine, no probes, a patch store in a temporary
folder), with the memory patches of benchmarks/serac_serving.py (one edit each of
counterfact_batch.jsonl, records 1000+, cached there):
1. apply all of them (POST /v1/patches), and record the greedy answers to `--prompts` of the
   edits' prompts and two unedited ones;
2. restart on the same store, `--runs` times: seconds until the server answers (every patch
   replayed from the log);
3. `compact --memory` as a dry run (the editor's first measurement of every live edit), then
   for real (remembered): seconds and the tolerance check's figures; the answers again;
4. restart `--runs` times with the one merged patch: seconds until ready, and the answers;
5. one edit dropped from the merged patch (`edit_serve drop`): seconds; the other answers.
Each finished step is written to `--out` (JSON and markdown) at once. A run takes minutes,
not hours, so a rerun starts over.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.serac_serving import make_patches, records  # noqa: E402
from benchmarks.serving import apply_files  # noqa: E402
from tests.servers import run_server  # noqa: E402

log = logging.getLogger("bench.memory_compaction")
OUT = ROOT / "benchmarks" / "results" / "memory-compaction.json"
GENERIC = ["The capital of France is", "Water boils at a temperature of"]


def answers(server, prompts: list[str]) -> list[str]:
    return [server.complete(p, max_tokens=4)[0] for p in prompts]


def restarts(store: Path, runs: int, prompts: list[str], expected: list[str]) -> dict:
    """Seconds until a server on `store` answers, `runs` times; whether its answers are `expected`."""
    seconds, same = [], []
    for _ in range(runs):
        started = time.perf_counter()
        with run_server(store, "--no-probes", timeout=1800) as server:
            seconds.append(time.perf_counter() - started)
            same.append(answers(server, prompts) == expected)
            patches = len(server.admin().get("/v1/patches").json()["patches"])
    return {"ready_seconds": seconds, "median_seconds": statistics.median(seconds), "patches": patches,
            "same_answers": all(same)}


def compaction(server, dry_run: bool) -> dict:
    started = time.perf_counter()
    r = server.admin().post("/v1/patches/compact", params={"kind": "memory", "dry_run": str(dry_run).lower()},
                            timeout=3600)
    r.raise_for_status()
    body = r.json()
    return {"seconds": time.perf_counter() - started, "report": {k: v for k, v in body["report"].items()
                                                                 if k not in ("changed", "lost")},
            "id": body["id"], "rows": body["memory"]["rows"]}


def _s(seconds: float) -> str:
    return f"{seconds:.1f}" if seconds >= 10 else f"{seconds:.2f}"


def markdown(r: dict) -> str:
    lines = ["# Memory compaction: SERAC edits merged into one memory patch", "",
             f"`benchmarks/memory_compaction.py --edits {r['edits']} --runs {r['runs']}`, hf engine, SmolLM2-135M on "
             f"{r['cpus']} CPUs, `--no-probes`; {r['edits']} memory patches of one counterfact_batch edit each; "
             f"answers to {r['prompts']} prompts ({r['prompts'] - len(GENERIC)} edited, {len(GENERIC)} not), greedy, "
             f"4 tokens. Recorded {r['recorded']}; load average at the end {r['load_average']}.", "",
             "| step | seconds | patches after | the same answers |", "| --- | ---: | ---: | --- |"]
    rows = []  # (what, seconds, patches after, the same answers or None)
    if "apply" in r:
        rows.append((f"apply {r['edits']} patches one by one (POST /v1/patches)", r["apply"]["seconds"], r["edits"],
                     None))
    if "restart_separate" in r:
        m = r["restart_separate"]
        rows.append(("restart, every patch replayed (median)", m["median_seconds"], m["patches"], m["same_answers"]))
    for key, what in (("dry_run", "`compact --memory --dry-run` (the first measurement)"),
                      ("compact", "`compact --memory`")):
        if key in r:
            c, rep = r[key], r[key]["report"]
            rows.append((f"{what}: retention {rep['retention_before']:.3f} -> {rep['retention_after']:.3f}, "
                         f"locality {rep['locality_before']:.3f} -> {rep['locality_after']:.3f}", c["seconds"],
                         1 if key == "compact" else r["edits"], c.get("same_answers")))
    if "restart_merged" in r:
        m = r["restart_merged"]
        rows.append(("restart, the merged patch replayed (median)", m["median_seconds"], m["patches"],
                     m["same_answers"]))
    if "drop" in r:
        d = r["drop"]
        rows.append((f"`edit_serve drop` of one edit ({d['rows']} rows left; the other prompts' answers)",
                     d["seconds"], 1, d["same_answers"]))
    for what, seconds, patches, same in rows:
        lines.append(f"| {what} | {_s(seconds)} | {patches} | {'-' if same is None else 'yes' if same else 'NO'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--edits", type=int, default=1000)
    p.add_argument("--runs", type=int, default=3, help="restarts measured with each patch set")
    p.add_argument("--prompts", type=int, default=40, help="edited prompts whose answers are compared")
    p.add_argument("--out", type=Path, default=OUT, help="the JSON file (the markdown goes beside it)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    rows = records(args.edits)
    paths = make_patches(rows)
    step = max(1, args.edits // args.prompts)
    prompts = [r["prompt"].format(r["subject"]) for r in rows[::step]][:args.prompts] + GENERIC
    result = {"edits": args.edits, "runs": args.runs, "prompts": len(prompts), "cpus": os.cpu_count(),
              "command": " ".join(sys.argv)}

    def save() -> None:
        result.update(recorded=datetime.now(timezone.utc).isoformat(timespec="minutes"),
                      load_average=[round(x, 2) for x in os.getloadavg()])
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(markdown(result))

    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        with run_server(store, "--no-probes") as server:
            started = time.perf_counter()
            apply_files(server.admin(), paths)
            result["apply"] = {"seconds": time.perf_counter() - started}
            expected = answers(server, prompts)
            result["answers"] = expected
            save()
        result["restart_separate"] = restarts(store, args.runs, prompts, expected)
        save()
        with run_server(store, "--no-probes", timeout=1800) as server:
            for key, dry in (("dry_run", True), ("compact", False)):
                result[key] = compaction(server, dry)
                log.info("%s: %.1f s", key, result[key]["seconds"])
                save()
            result["compact"]["same_answers"] = answers(server, prompts) == expected
            save()
        result["restart_merged"] = restarts(store, args.runs, prompts, expected)
        save()
        with run_server(store, "--no-probes") as server:
            admin = server.admin()
            (merged,) = [p["id"] for p in admin.get("/v1/patches").json()["patches"]]
            started = time.perf_counter()
            r = admin.post(f"/v1/patches/{merged}/drop", json={"requests": [0]})  # the first edit, prompts[0]'s
            r.raise_for_status()
            result["drop"] = {"seconds": time.perf_counter() - started, "rows": r.json()["rows"],
                              "same_answers": answers(server, prompts[1:]) == expected[1:]}
            save()
    print(markdown(result))


if __name__ == "__main__":
    main()
