"""Side-module serving benchmark: 100 T-Patcher patches attached to a live server (issue 13).

    .venv/bin/python benchmarks/side_serving.py [--patches DIR] [--runs 3] [--concurrency 8]

The patches are the ones `benchmarks/editing.py --suites sequential --methods t-patcher --n 100`
computed (each on top of the ones before, one CounterFact record each) and keeps in its
progress folder, the default `--patches`; the benchmark does not compute patches itself (that
takes about 25 s each on 2 cores). Starts a real server (`edit_serve serve`, hf engine, no
probes) on loopback and drives it with httpx over the OpenAI completions API:
1. apply every patch in its order (POST /v1/patches): each makes a patch set the server has
   never run, so each apply includes the engine's verify pass (replayed from the attach
   layer, edit_serve.engines.verify);
2. revert and re-apply the last patch `--repeats` times (DELETE, POST): the sets are ones the
   server verified before, so no verify pass;
3. throughput, `--runs` pairs of runs of `--requests` fixed-length greedy completions at
   `--concurrency` (benchmarks/serving.py's `load_run`), one run with every patch attached and
   one with none (all reverted, newest first, then re-applied), in alternating order (ABBA),
   so the drift of a shared machine over the benchmark falls on both sides alike; the
   figure is the median of the pairs' ratios;
4. revert every patch (DELETE, newest first) and check that the server gives the greedy
   answers it gave before step 1.
Figures are medians; the machine's load is recorded. Writes benchmarks/results/side-serving.json
and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.serving import PROMPTS, apply_files, load_run, percentile  # noqa: E402
from tests.servers import run_server  # noqa: E402

log = logging.getLogger("bench.side_serving")
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_PATCHES = RESULTS / "editing" / "progress" / "sequential__counterfact__smollm2-135m__t-patcher__sequential-1"
MODEL = "smollm2-135m"


def timed(call) -> float:
    started = time.perf_counter()
    call().raise_for_status()
    return time.perf_counter() - started


def greedy(server, prompts: list[str]) -> list[str]:
    return [server.complete(p, max_tokens=8)[0] for p in prompts]


def stats(times: list[float]) -> dict:
    return {"median_ms": 1000 * statistics.median(times), "p99_ms": 1000 * percentile(times, 0.99), "n": len(times)}


def throughput(url: str, args) -> dict:
    return asyncio.run(load_run(url, MODEL, args.concurrency, args.requests, args.max_tokens))


def paired_throughput(server, admin, ids: list[str], paths: list[Path], args) -> list[dict]:
    """`args.runs` pairs of throughput runs, with the patches attached and without, in ABBA
    order; the patches are attached on entry and on return."""
    pairs = []
    for i in tqdm(range(args.runs), desc="throughput pairs", leave=False):
        pair = {}
        for attached in ((True, False) if i % 2 == 0 else (False, True)):
            if not attached:
                for patch_id in reversed(ids):
                    admin.delete(f"/v1/patches/{patch_id}").raise_for_status()
            pair["patched" if attached else "unpatched"] = throughput(server.url, args)
            if not attached:
                apply_files(admin, paths)
        pair["ratio"] = pair["patched"]["tokens_per_s"] / pair["unpatched"]["tokens_per_s"]
        pairs.append(pair)
    return pairs


def run(args) -> dict:
    paths = sorted(args.patches.glob("patch-*.safetensors"))[:args.edits]
    if len(paths) < args.edits:
        raise SystemExit(f"{args.patches} holds {len(paths)} patches, not {args.edits}: run "
                         "benchmarks/editing.py --suites sequential --methods t-patcher --n 100 first")
    result = {"patches": len(paths), "concurrency": args.concurrency, "max_tokens": args.max_tokens,
              "requests": args.requests, "load_average_start": [round(x, 2) for x in os.getloadavg()],
              "threads": os.environ.get("OMP_NUM_THREADS")}
    with tempfile.TemporaryDirectory() as tmp, run_server(Path(tmp) / "store", "--model", MODEL,
                                                          "--no-probes") as server:
        admin = server.admin()
        asyncio.run(load_run(server.url, MODEL, 4, 8, args.max_tokens))  # warm-up
        before = greedy(server, PROMPTS[:8])
        ids, applies = apply_files(admin, paths)
        result["apply_new_set"] = stats(applies)
        last = paths[-1].read_bytes()
        reverts, reapplies = [], []
        for _ in tqdm(range(args.repeats), desc="revert/re-apply", leave=False):
            reverts.append(timed(lambda: admin.delete(f"/v1/patches/{ids[-1]}")))
            reapplies.append(timed(lambda: admin.post("/v1/patches", content=last)))
        result["revert"] = stats(reverts)
        result["reapply_verified_set"] = stats(reapplies)
        result["throughput_pairs"] = paired_throughput(server, admin, ids, paths, args)
        all_reverts = [timed(lambda i=i: admin.delete(f"/v1/patches/{i}")) for i in tqdm(ids[::-1], desc="revert")]
        result["revert_all"] = stats(all_reverts)
        result["same_answers_after_revert"] = greedy(server, PROMPTS[:8]) == before
    result["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    result["recorded"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return result


def markdown(r: dict) -> str:
    pairs = r["throughput_pairs"]
    unpatched = statistics.median(x["unpatched"]["tokens_per_s"] for x in pairs)
    patched = statistics.median(x["patched"]["tokens_per_s"] for x in pairs)
    ratios = ", ".join(f"{x['ratio']:.3f}" for x in pairs)
    rows = [
        (f"throughput with {r['patches']} patches against none, median of {len(pairs)} interleaved pairs (ABBA)",
         f"x{statistics.median(x['ratio'] for x in pairs):.3f} (pairs: {ratios}; tokens/s {patched:.1f} with, "
         f"{unpatched:.1f} without, medians)", ">= 0.95x"),
        ("apply of each patch over HTTP, a set never run before (verify pass included)",
         f"{r['apply_new_set']['median_ms']:.1f} / {r['apply_new_set']['p99_ms']:.1f} ms", "under 50 ms"),
        ("revert of the newest patch over HTTP", f"{r['revert']['median_ms']:.1f} / {r['revert']['p99_ms']:.1f} ms",
         "under 50 ms"),
        ("re-apply of it (a set verified before)",
         f"{r['reapply_verified_set']['median_ms']:.1f} / {r['reapply_verified_set']['p99_ms']:.1f} ms", "under 50 ms"),
        ("revert of every patch, newest first",
         f"{r['revert_all']['median_ms']:.1f} / {r['revert_all']['p99_ms']:.1f} ms",
         "under 50 ms"),
        ("greedy answers after reverting all, against before",
         "same" if r["same_answers_after_revert"] else "DIFFERENT",
         "same"),
    ]
    lines = [f"# Side-module serving: {r['patches']} T-Patcher patches on a live server "
             f"(`{MODEL}`, hf engine, CPU)", "",
             f"Concurrency {r['concurrency']}, {r['requests']} completions of {r['max_tokens']} greedy tokens per run; "
             f"latencies median / p99 (ms). Load average {r['load_average_start']} at the start, "
             f"{r['load_average_end']} at the end (a shared 2-core machine; OMP_NUM_THREADS={r['threads']}).", "",
             "| figure | measured | target |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    lines += ["", f"Recorded {r['recorded']}; command: `benchmarks/side_serving.py`.", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--patches", type=Path, default=DEFAULT_PATCHES, help="folder of patch-NNNNN.safetensors files")
    p.add_argument("--edits", type=int, default=100)
    p.add_argument("--runs", type=int, default=6, help="throughput pairs (with and without the patches)")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--requests", type=int, default=32, help="completions per throughput run")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=10, help="revert/re-apply cycles of the newest patch")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    result = run(args)
    (RESULTS / "side-serving.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "side-serving.md").write_text(markdown(result))
    log.info("wrote %s", RESULTS / "side-serving.md")


if __name__ == "__main__":
    main()
