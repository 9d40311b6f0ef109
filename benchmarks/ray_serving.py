"""Ray Serve benchmark: broadcast apply latency, throughput with 1 vs 2 replicas, and
completion latency while the editor actor computes a ROME edit.

    .venv/bin/python benchmarks/ray_serving.py [--runs 3]

Starts a local Ray cluster and `edit_serve serve --ray` (as a user would), drives it over
HTTP. Writes benchmarks/results/ray-serving.json and .md (medians over runs).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.serving import PROMPTS, apply_latency, load_run, percentile, rank_one_patches  # noqa: E402
from tests.servers import TOKEN, run_server  # noqa: E402

log = logging.getLogger("bench.ray")
RAY = str(Path(sys.executable).with_name("ray"))
EDIT = {"method": "rome", "requests": [{"prompt": "{} is located in the city of", "subject": "The Eiffel Tower",
                                        "target_new": "Rome"}]}


def ray_cluster(cpus: int):
    subprocess.run([RAY, "start", "--head", f"--num-cpus={cpus}", "--include-dashboard=false",
                    "--disable-usage-stats"], check=True, capture_output=True, timeout=180,
                   env={**__import__("os").environ, "EDIT_SERVE_ADMIN_TOKEN": TOKEN})


def ray_stop():
    subprocess.run([RAY, "stop", "--force"], capture_output=True, timeout=180)


async def latencies_while(url: str, model: str, clients: int, max_tokens: int, until: asyncio.Event) -> list[float]:
    """Completion latencies of `clients` closed-loop clients until `until` is set."""
    out: list[float] = []
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        async def client(i: int):
            while not until.is_set():
                t = time.perf_counter()
                r = await http.post("/v1/completions", json={"model": model, "prompt": PROMPTS[i % len(PROMPTS)],
                                                             "max_tokens": max_tokens, "temperature": 0,
                                                             "ignore_eos": True})
                r.raise_for_status()
                out.append(time.perf_counter() - t)

        await asyncio.gather(*(client(i) for i in range(clients)))
    return out


async def edit_interference(url: str, model: str, clients: int, max_tokens: int, idle_s: float, config: dict) -> dict:
    """p50/p99 completion latency idle, then while POST /v1/edits runs on the editor actor."""
    stop = asyncio.Event()
    idle_task = asyncio.create_task(latencies_while(url, model, clients, max_tokens, stop))
    await asyncio.sleep(idle_s)
    stop.set()
    idle = await idle_task
    stop = asyncio.Event()
    busy_task = asyncio.create_task(latencies_while(url, model, clients, max_tokens, stop))
    async with httpx.AsyncClient(base_url=url, timeout=3600, headers={"authorization": f"Bearer {TOKEN}"}) as http:
        t = time.perf_counter()
        r = await http.post("/v1/edits", json={**EDIT, "config": config, "apply": False, "eval": False})
        edit_s = time.perf_counter() - t
        r.raise_for_status()
    stop.set()
    busy = await busy_task
    return {"idle_p50_s": statistics.median(idle), "idle_p99_s": percentile(idle, 0.99), "idle_requests": len(idle),
            "edit_p50_s": statistics.median(busy), "edit_p99_s": percentile(busy, 0.99), "edit_requests": len(busy),
            "edit_seconds": edit_s, "p99_ratio": percentile(busy, 0.99) / percentile(idle, 0.99)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--apply-repeats", type=int, default=30)
    p.add_argument("--idle-seconds", type=float, default=30)
    p.add_argument("--edit-config", default="{}", help="JSON settings for the ROME edit (e.g. stats corpus)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    edit_config = json.loads(args.edit_config)

    bodies = rank_one_patches(args.model, 4)
    results: dict = {"model": args.model, "runs": args.runs, "cpus": args.cpus, "concurrency": args.concurrency,
                     "max_tokens": args.max_tokens, "throughput": {}}
    ray_cluster(args.cpus)
    try:
        for replicas in (1, 2):
            with tempfile.TemporaryDirectory() as tmp, run_server(
                    Path(tmp) / "store", "--ray", "--ray-address", "auto", "--replicas", str(replicas),
                    "--model", args.model, "--no-probes", timeout=900) as server:
                asyncio.run(load_run(server.url, args.model, 4, 8, args.max_tokens))  # warm-up
                runs = [asyncio.run(load_run(server.url, args.model, args.concurrency, args.concurrency * 4,
                                             args.max_tokens))
                        for _ in tqdm(range(args.runs), desc=f"{replicas} replicas")]
                results["throughput"][str(replicas)] = {
                    "tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
                    "p50_s": statistics.median(r["p50_s"] for r in runs),
                    "p99_s": statistics.median(r["p99_s"] for r in runs), "all_runs": runs}
                if replicas == 2:
                    # POST /v1/patches answers once every replica acknowledged: its round trip is
                    # the apply-to-all-acknowledged time
                    results["broadcast"] = apply_latency(server.url, bodies, args.apply_repeats)
                    edits = [asyncio.run(edit_interference(server.url, args.model, args.concurrency, args.max_tokens,
                                                           args.idle_seconds, edit_config))
                             for _ in tqdm(range(args.runs), desc="edit interference")]
                    results["edit_interference"] = {
                        k: statistics.median(e[k] for e in edits) for k in edits[0]} | {"all_runs": edits}
    finally:
        ray_stop()
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / "ray-serving"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2))
    stem.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))


def markdown(r: dict) -> str:
    b, e = r["broadcast"], r["edit_interference"]
    lines = [f"# Ray Serve benchmark: `{r['model']}`, local Ray cluster with {r['cpus']} CPUs", "",
             f"Medians of {r['runs']} runs; {r['concurrency']} concurrent clients, "
             f"{r['max_tokens']} tokens per request.",
             "", "| replicas | tokens/s | p50 (s) | p99 (s) |", "|---|---|---|---|"]
    for n, t in r["throughput"].items():
        lines.append(f"| {n} | {t['tokens_per_s']:.1f} | {t['p50_s']:.3f} | {t['p99_s']:.3f} |")
    lines += ["", "| broadcast to 2 replicas | median (ms) | p99 (ms) |", "|---|---|---|",
              f"| apply (all acknowledged) | {b['apply_median_ms']:.1f} | {b['apply_p99_ms']:.1f} |",
              f"| revert (all acknowledged) | {b['revert_median_ms']:.1f} | {b['revert_p99_ms']:.1f} |",
              "", "| completion latency | p50 (s) | p99 (s) |", "|---|---|---|",
              f"| idle | {e['idle_p50_s']:.3f} | {e['idle_p99_s']:.3f} |",
              f"| while ROME runs on the editor actor ({e['edit_seconds']:.0f} s) | {e['edit_p50_s']:.3f} | "
              f"{e['edit_p99_s']:.3f} |",
              f"| p99 during edit / idle p99 | {e['p99_ratio']:.2f} | |", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
