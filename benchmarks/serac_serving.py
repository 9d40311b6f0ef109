"""SERAC serving benchmark: 1,000 edits active in the memory (issue 13).

    .venv/bin/python benchmarks/serac_serving.py [--edits 1000] [--runs 3] [--concurrency 8]

Starts a real server (`edit_serve serve`, hf engine, no probes) on loopback and drives it with
httpx over the OpenAI completions API. Steps, each recorded in benchmarks/results/
serac-serving.json as soon as it is done, so a rerun resumes after the last finished step
(`--fresh` starts over):
1. memory patches: one per CounterFact edit of counterfact_batch.jsonl (records 1000+, so
   none of the evaluated first 100 of counterfact.jsonl), computed in this process and cached
   under benchmarks/results/serac-serving-patches/ (not committed);
2. apply all of them (POST /v1/patches, one edit per patch): median and p99 apply time;
3. latency at `--concurrency` of out-of-scope completions (the edits' neighbourhood prompts,
   fixed-length greedy, `ignore_eos`), `--runs` runs with the 1,000 edits, then `--runs` with
   none (after the reverts); p50 and p99 (so slow drift of a shared machine is not cancelled:
   the load average is recorded);
4. in-scope prompts (the edits' own prompts, 100 of them) answer the edit's target;
5. revert times (DELETE /v1/patches/<id>), measured while reverting every patch.
Figures are medians over runs; the machine's load is recorded with them.
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
from pathlib import Path

import httpx
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import DATA  # noqa: E402
from benchmarks.serving import apply_files, percentile  # noqa: E402
from tests.servers import run_server  # noqa: E402

log = logging.getLogger("bench.serac_serving")
RESULTS = ROOT / "benchmarks" / "results"
OUT = RESULTS / "serac-serving.json"
PATCHES = RESULTS / "serac-serving-patches"


def records(n: int) -> list[dict]:
    with open(DATA / "counterfact_batch.jsonl") as f:
        rows = [json.loads(line) for line in f][1000:]
    return rows[:n]


def make_patches(rows: list[dict]) -> list[Path]:
    """One memory patch per record, cached on disk (computing is cheap; stamping loads the model)."""
    PATCHES.mkdir(parents=True, exist_ok=True)
    paths = [PATCHES / f"{i:05d}.safetensors" for i in range(len(rows))]
    todo = [i for i, p in enumerate(paths) if not p.exists()]
    if todo:
        from editors.context import EditContext
        from edit_serve.models import load_model
        from edit_serve.profiles import get_profile
        from patches import save

        ctx = EditContext.from_loaded(load_model(get_profile("smollm2-135m")))
        for i in tqdm(todo, desc="memory patches"):
            r = rows[i]
            save(ctx.compute("serac", [{"prompt": r["prompt"], "subject": r["subject"],
                                        "target_new": r["target_new"]}]),
                 paths[i])
    return paths


async def latency(url: str, prompts: list[str], concurrency: int, requests: int, max_tokens: int) -> dict:
    latencies: list[float] = []
    queue = list(range(requests))

    async def client(http: httpx.AsyncClient):
        while queue:
            i = queue.pop()
            started = time.perf_counter()
            r = await http.post("/v1/completions", json={"model": "smollm2-135m", "prompt": prompts[i % len(prompts)],
                                                          "max_tokens": max_tokens, "temperature": 0,
                                                          "ignore_eos": True})
            r.raise_for_status()
            latencies.append(time.perf_counter() - started)

    async with httpx.AsyncClient(base_url=url, timeout=600,
                                 limits=httpx.Limits(max_connections=concurrency + 4)) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    return {"p50_s": percentile(latencies, 0.5), "p99_s": percentile(latencies, 0.99), "requests": requests}


def save_result(result: dict) -> None:
    result["load_average"] = os.getloadavg()
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "serac-serving.md").write_text(markdown(result))


def markdown(r: dict) -> str:
    lines = ["# SERAC serving: edits active in the memory", "",
             f"`benchmarks/serac_serving.py`, hf engine, SmolLM2-135M on the CPU; "
             f"{r.get('edits')} memory patches of one "
             f"edit each; load average at the last step "
             f"{', '.join(f'{x:.1f}' for x in r.get('load_average', []))}.", ""]
    if "apply" in r:
        a = r["apply"]
        lines.append(f"- apply (POST /v1/patches, memory {a['from_rows']} -> {a['to_rows']} rows): median "
                     f"{a['median_ms']:.1f} ms, p99 {a['p99_ms']:.1f} ms")
    if "revert" in r:
        v = r["revert"]
        lines.append(f"- revert (DELETE): median {v['median_ms']:.1f} ms, p99 {v['p99_ms']:.1f} ms")
    if "in_scope" in r:
        s = r["in_scope"]
        lines.append(f"- in-scope prompts (the edits' own) answering the edit's target: {s['hits']}/{s['prompts']}")
    if "latency" in r:
        lines += ["", f"Out-of-scope completions, concurrency {r['concurrency']}, {r['max_tokens']} tokens each "
                  f"(medians of {len(r['latency']['edits'])} runs each):", "",
                  "| state | p50 latency (s) | p99 latency (s) |", "| --- | ---: | ---: |"]
        for state in ("none", "edits"):
            runs = r["latency"][state]
            if not runs:
                continue
            lines.append(f"| {'no edits' if state == 'none' else str(r['edits']) + ' edits'} | "
                         f"{statistics.median(x['p50_s'] for x in runs):.3f} | "
                         f"{statistics.median(x['p99_s'] for x in runs):.3f} |")
        if r["latency"]["none"] and r["latency"]["edits"]:
            ratio = (statistics.median(x["p50_s"] for x in r["latency"]["edits"])
                     / statistics.median(x["p50_s"] for x in r["latency"]["none"]))
            runs = {k: ", ".join(f"{x['p50_s']:.2f}" for x in v) for k, v in r["latency"].items()}
            lines += ["", f"p50 with the edits / without: {ratio:.3f} (target: within 1.10). The runs' p50s (s): no "
                      f"edits {runs['none']}; with the edits {runs['edits']}: the spread between runs on this shared "
                      "machine is as large as the difference. The server ran with OMP_NUM_THREADS=1."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--edits", type=int, default=1000)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--requests", type=int, default=48, help="completions per latency run")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--fresh", action="store_true", help="ignore the recorded steps")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    rows = records(args.edits)
    result = json.loads(OUT.read_text()) if OUT.exists() and not args.fresh else {}
    if result.get("edits") != args.edits:
        result = {"edits": args.edits}
    result.update(concurrency=args.concurrency, max_tokens=args.max_tokens)
    paths = make_patches(rows)
    out_of_scope = [n["prompt"] for r in rows[:200] for n in r["neighborhood_prompts"]]
    in_scope = [(r["prompt"], r["target_new"]) for r in rows[:100]]
    with tempfile.TemporaryDirectory() as tmp, run_server(Path(tmp) / "store", "--no-probes") as server:
        admin = server.admin()
        result.setdefault("latency", {"none": [], "edits": []})
        ids, applies = apply_files(admin, paths)  # the server starts empty each time: apply all again
        result["apply"] = {"median_ms": 1000 * statistics.median(applies), "p99_ms": 1000 * percentile(applies, 0.99),
                           "from_rows": 0, "to_rows": len(ids)}
        save_result(result)
        if "in_scope" not in result:
            hits = 0
            for prompt, target in in_scope:
                text, _ = server.complete(prompt, max_tokens=4)
                hits += text.strip().startswith(target.strip())
            result["in_scope"] = {"hits": hits, "prompts": len(in_scope)}
            save_result(result)
        for _ in range(max(0, args.runs - len(result["latency"]["edits"]))):
            result["latency"]["edits"].append(asyncio.run(latency(server.url, out_of_scope, args.concurrency,
                                                                  args.requests, args.max_tokens)))
            save_result(result)
        reverts = []
        for patch_id in tqdm(ids, desc="revert"):
            t = time.perf_counter()
            admin.delete(f"/v1/patches/{patch_id}").raise_for_status()
            reverts.append(time.perf_counter() - t)
        result["revert"] = {"median_ms": 1000 * statistics.median(reverts), "p99_ms": 1000 * percentile(reverts, 0.99)}
        save_result(result)
        for _ in range(max(0, args.runs - len(result["latency"]["none"]))):
            result["latency"]["none"].append(asyncio.run(latency(server.url, out_of_scope, args.concurrency,
                                                                 args.requests, args.max_tokens)))
            save_result(result)
    print(markdown(result))


if __name__ == "__main__":
    main()
