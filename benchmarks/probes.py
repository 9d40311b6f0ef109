"""What the live probes cost: serving throughput with probes every 10 s against probes off.

    .venv/bin/python benchmarks/probes.py [--runs 3] [--duration 60] [--concurrency 8] [--max-tokens 32]

Starts real servers (`edit_serve serve`) on loopback and drives them with httpx over the
OpenAI completions API: fixed-length greedy completions (`ignore_eos`), so every request does
the same work. Each round starts a fresh server without probes (`--no-probes`) and a fresh
one with `--probe-interval 10`, one after the other (alternating which goes first), warms each
up and measures one window. Figures are medians over rounds; the target is a throughput drop
of at most 5%. Writes benchmarks/results/probes.json and probes.md.
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
import psutil
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.servers import TOKEN, run_server  # noqa: E402

log = logging.getLogger("bench.probes")
MODEL = "smollm2-135m"
PROMPTS = [
    "The Eiffel Tower is located in the city of",
    "Once upon a time, in a small village,",
    "The most important thing about machine learning is",
    "Water boils at a temperature of",
    "My favourite book is",
    "In 1969, the first humans",
    "The recipe for a good cake starts with",
    "The history of the Roman Empire",
]
TARGET_DROP = 0.05
MIN_BATCHES = 4  # a window must hold this many full batches of requests, or batch granularity dominates


def cpu_seconds(server) -> float:
    times = psutil.Process(server.proc.pid).cpu_times()
    return times.user + times.system


async def load_window(server, concurrency: int, duration: float, max_tokens: int) -> dict:
    """`concurrency` clients send completions back to back for `duration` seconds (requests in
    flight at the deadline finish): generated tokens per second over the whole window, and the
    server process' CPU seconds per 1000 tokens (less sensitive to other load on the machine)."""
    tokens, requests, latencies = 0, 0, []
    deadline = time.perf_counter() + duration

    async def client(http: httpx.AsyncClient, i: int):
        nonlocal tokens, requests
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            r = await http.post("/v1/completions", json={
                "model": MODEL, "prompt": PROMPTS[(i + requests) % len(PROMPTS)], "max_tokens": max_tokens,
                "temperature": 0, "ignore_eos": True})
            r.raise_for_status()
            latencies.append(time.perf_counter() - started)
            tokens += r.json()["usage"]["completion_tokens"]
            requests += 1

    started, cpu = time.perf_counter(), cpu_seconds(server)
    async with httpx.AsyncClient(base_url=server.url, timeout=600) as http:
        await asyncio.gather(*(client(http, i) for i in range(concurrency)))
    elapsed, cpu = time.perf_counter() - started, cpu_seconds(server) - cpu
    return {"tokens_per_s": tokens / elapsed, "cpu_s_per_1k_tokens": 1000 * cpu / tokens, "requests": requests,
            "tokens": tokens, "seconds": elapsed, "p50_latency_s": statistics.median(latencies)}


def probe_runs(url: str, since: float) -> dict:
    """The last probe report of a server (how long one probe run took)."""
    with httpx.Client(base_url=url, headers={"authorization": f"Bearer {TOKEN}"}, timeout=60) as admin:
        report = admin.get("/v1/patches").json()["probes"]
    return {"last_run_s": report["seconds"], "prompts": report["prompts"], "fresh": report["at"] >= since} if report \
        else {}


def wait_for_first_probe(url: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not probe_runs(url, 0):
        if time.monotonic() > deadline:
            raise RuntimeError("the probing server never reported a probe run")
        time.sleep(0.5)


def window(args, folder: Path, probes: bool) -> dict:
    """A fresh server (with or without probes), warmed up, then one measured window."""
    flags = ["--probe-interval", str(args.interval)] if probes else ["--no-probes"]
    with run_server(folder / "store", *flags, "--log-level", "warning") as server:
        if probes:
            wait_for_first_probe(server.url)
        asyncio.run(load_window(server, args.concurrency, 5, args.max_tokens))  # warm-up
        since = time.time()
        result = asyncio.run(load_window(server, args.concurrency, args.duration, args.max_tokens))
        if probes:
            result["probes"] = probe_runs(server.url, since)
    return result


def measure(args) -> dict:
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in tqdm(range(args.runs), desc="rounds", unit="round"):
            order = (False, True) if r % 2 == 0 else (True, False)  # alternate which goes first
            results = {probes: window(args, Path(tmp) / f"{r}-{probes}", probes) for probes in order}
            baseline, probed = results[False], results[True]
            drop = 1 - probed["tokens_per_s"] / baseline["tokens_per_s"]
            cpu_increase = probed["cpu_s_per_1k_tokens"] / baseline["cpu_s_per_1k_tokens"] - 1
            rounds.append({"off": baseline, "on": probed, "drop": drop, "cpu_per_token_increase": cpu_increase})
            log.info("round %d: off %.1f tok/s, probes every %gs %.1f tok/s (drop %.1f%%)", r + 1,
                     baseline["tokens_per_s"], args.interval, probed["tokens_per_s"], 100 * drop)
    batch_tokens = args.concurrency * args.max_tokens
    fewest = min(min(x["off"]["tokens"], x["on"]["tokens"]) for x in rounds) / batch_tokens
    off_tps = statistics.median(x["off"]["tokens_per_s"] for x in rounds)
    on_tps = statistics.median(x["on"]["tokens_per_s"] for x in rounds)
    return {
        "benchmark": "probes", "model": MODEL, "engine": "hf", "device": "cpu",
        "settings": {"runs": args.runs, "duration_s": args.duration, "concurrency": args.concurrency,
                     "max_tokens": args.max_tokens, "probe_interval_s": args.interval},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_average_at_end": os.getloadavg()},
        "median_tokens_per_s_off": off_tps, "median_tokens_per_s_probes": on_tps,
        "median_drop": statistics.median(x["drop"] for x in rounds), "drop_of_medians": 1 - on_tps / off_tps,
        "median_cpu_per_token_increase": statistics.median(x["cpu_per_token_increase"] for x in rounds),
        "target_drop": TARGET_DROP, "rounds": rounds,
        "conclusive": fewest >= MIN_BATCHES, "fewest_batches_per_window": fewest,
    }


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [
        "# Probe cost: serving throughput with probes every "
        f"{s['probe_interval_s']:g} s vs probes off",
        "",
        f"`{MODEL}`, hf engine on CPU ({result['machine']['cpus']} cores, shared; load average at the end "
        f"{', '.join(f'{x:.1f}' for x in result['machine']['load_average_at_end'])}). {s['concurrency']} clients, "
        f"greedy completions of {s['max_tokens']} tokens (`ignore_eos`), {s['duration_s']:g} s windows, "
        f"{s['runs']} rounds; medians.",
        "",
        *([] if result["conclusive"] else [
            f"**Inconclusive**: the slowest window held only {result['fewest_batches_per_window']:.1f} batches of "
            f"{s['concurrency']} requests (at least {MIN_BATCHES} are needed), so one request more or less swings "
            "the figure by several percent; rerun with a longer --duration on a quieter machine.", ""]),
        "| | tokens/s |",
        "| --- | --- |",
        f"| probes off | {result['median_tokens_per_s_off']:.1f} |",
        f"| probes every {s['probe_interval_s']:g} s | {result['median_tokens_per_s_probes']:.1f} |",
        f"| drop (median of per-round drops) | {100 * result['median_drop']:.1f}% (target <= "
        f"{100 * result['target_drop']:.0f}%) |",
        f"| drop (of the medians) | {100 * result['drop_of_medians']:.1f}% |",
        f"| server CPU per token, increase (median) | {100 * result['median_cpu_per_token_increase']:.1f}% |",
        "",
        "| round | off tok/s | probes tok/s | drop | off CPU s/1k tok | probes CPU s/1k tok | last probe run (s) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for i, r in enumerate(result["rounds"], 1):
        p = r["on"].get("probes", {})
        lines.append(f"| {i} | {r['off']['tokens_per_s']:.1f} | {r['on']['tokens_per_s']:.1f} | "
                     f"{100 * r['drop']:.1f}% | {r['off']['cpu_s_per_1k_tokens']:.1f} | "
                     f"{r['on']['cpu_s_per_1k_tokens']:.1f} | {p.get('last_run_s', float('nan')):.2f} |")
    lines += ["", "Command: `.venv/bin/python benchmarks/probes.py " +
              f"--runs {s['runs']} --duration {s['duration_s']:g} --concurrency {s['concurrency']} "
              f"--max-tokens {s['max_tokens']}`", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3, help="rounds (default: %(default)s)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds per measured window (default: %(default)s)")
    p.add_argument("--concurrency", type=int, default=8, help="concurrent clients (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens per completion (default: %(default)s)")
    p.add_argument("--interval", type=float, default=10.0, help="probe interval in seconds (default: %(default)s)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="output folder")
    args = p.parse_args()
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = measure(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "probes.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "probes.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
