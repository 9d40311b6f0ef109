"""Fairness under hostile load: does one huge request starve the others?

    .venv/bin/python benchmarks/fairness.py [--runs 3] [--prompt-tokens 1000] [--n 16]

Starts a real server (`edit_serve serve --no-probes`) on loopback. Measures a small greedy
completion alone (median of 5), then, each round: a 4 MB prompt (refused: it cannot fit the
context) and a request for `n` completions of a `prompt-tokens` prompt are sent, and while
the big one runs, /health is polled every 50 ms and the same small completion is sent. The
figures are the medians over rounds of the slowest /health answer and of the small
completion's time under load divided by its time alone. Targets (issue 15): /health under
100 ms, the small completion under 5x its time alone. Writes benchmarks/results/fairness.json
and fairness.md; each finished round is written at once and skipped on a rerun.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.servers import run_server  # noqa: E402

log = logging.getLogger("bench.fairness")
MODEL = "smollm2-135m"
SMALL = {"model": MODEL, "prompt": "The Eiffel Tower is located in the city of", "max_tokens": 16, "temperature": 0}
TARGET_HEALTH_S, TARGET_RATIO = 0.100, 5.0


async def small_completion(client: httpx.AsyncClient) -> float:
    started = time.perf_counter()
    r = await client.post("/v1/completions", json=SMALL)
    r.raise_for_status()
    return time.perf_counter() - started


async def round_under_load(url: str, prompt_tokens: int, n: int) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        huge_text = "word " * 800_000  # 4 MB
        long_prompt = list(range(1000, 1000 + prompt_tokens))  # token ids: exactly prompt_tokens of them
        huge = asyncio.create_task(client.post("/v1/completions", json={"model": MODEL, "prompt": huge_text,
                                                                        "max_tokens": 1}))
        big = asyncio.create_task(client.post("/v1/completions", json={
            "model": MODEL, "prompt": long_prompt, "n": n, "max_tokens": 32, "temperature": 0.8,
            "ignore_eos": True}))
        health: list[float] = []
        stop = asyncio.Event()

        async def poll():
            while not stop.is_set():
                started = time.perf_counter()
                (await client.get("/health")).raise_for_status()
                health.append(time.perf_counter() - started)
                await asyncio.sleep(0.05)

        poller = asyncio.create_task(poll())
        await asyncio.sleep(0.5)  # the big request is in the engine
        small = await small_completion(client)
        big_started = time.perf_counter()
        huge_status = (await huge).status_code
        big_response = await big
        big_response.raise_for_status()
        stop.set()
        await poller
        return {"small_s": small, "health_max_s": max(health), "health_median_s": statistics.median(health),
                "health_polls": len(health), "huge_prompt_status": huge_status,
                "big_done_after_small_s": time.perf_counter() - big_started}


def report(results: dict) -> str:
    rounds = results["rounds"]
    alone = results["small_alone_s"]
    ratios = [r["small_s"] / alone for r in rounds]
    health = [r["health_max_s"] for r in rounds]
    ratio, worst = statistics.median(ratios), statistics.median(health)
    lines = [
        "# Fairness under a huge request", "",
        f"SmolLM2-135M, hf engine, CPU ({results['cpu_count']} cores). A small greedy completion (16 tokens) "
        f"alone: **{alone * 1000:.0f} ms** (median of 5). Each round: a 4 MB prompt (answered "
        f"{rounds[0]['huge_prompt_status']}) and a request for {results['n']} completions of a "
        f"{results['prompt_tokens']}-token prompt, while /health is polled every 50 ms and the small "
        "completion is sent.", "",
        "| round | small completion under load | x alone | slowest /health | median /health |",
        "| --- | --- | --- | --- | --- |",
        *[f"| {i + 1} | {r['small_s'] * 1000:.0f} ms | {r['small_s'] / alone:.2f} | "
          f"{r['health_max_s'] * 1000:.1f} ms | {r['health_median_s'] * 1000:.1f} ms |" for i, r in enumerate(rounds)],
        "",
        f"Median over rounds: the small completion took **{ratio:.2f}x** its time alone (target < {TARGET_RATIO:g}x: "
        f"{'met' if ratio < TARGET_RATIO else 'NOT met'}); the slowest /health answer **{worst * 1000:.1f} ms** "
        f"(target < {TARGET_HEALTH_S * 1000:.0f} ms: {'met' if worst < TARGET_HEALTH_S else 'NOT met'}).",
        "", f"Load average when measured: {results['loadavg']}.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=1000)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "fairness.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    settings = {"prompt_tokens": args.prompt_tokens, "n": args.n}
    results = json.loads(args.output.read_text()) if args.output.exists() else {}
    if {k: results.get(k) for k in settings} != settings:
        results = {**settings, "rounds": []}
    with tempfile.TemporaryDirectory() as tmp, run_server(Path(tmp) / "store", "--no-probes") as server:
        async def alone() -> float:
            async with httpx.AsyncClient(base_url=server.url, timeout=600) as client:
                await small_completion(client)  # warm-up
                return statistics.median([await small_completion(client) for _ in range(5)])

        results["small_alone_s"] = asyncio.run(alone())
        for _ in tqdm(range(len(results["rounds"]), args.runs), desc="rounds"):
            results["rounds"].append(asyncio.run(round_under_load(server.url, args.prompt_tokens, args.n)))
            results.update(cpu_count=os.cpu_count(), machine=platform.machine(),
                           loadavg=" / ".join(f"{x:.2f}" for x in os.getloadavg()))
            args.output.parent.mkdir(parents=True, exist_ok=True)
            args.output.write_text(json.dumps(results, indent=2))
    args.output.with_suffix(".md").write_text(report(results))
    log.info("wrote %s", args.output.with_suffix(".md"))


if __name__ == "__main__":
    main()
