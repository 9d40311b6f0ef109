"""Serving benchmark: throughput and latency at several concurrencies, unpatched and with 10
rank-one patches merged, and the latency of applying a patch.

    .venv/bin/python benchmarks/serving.py [--engine hf] [--runs 3] [--concurrency 1 8 32]

Starts a real server (`edit_serve serve`) on loopback and drives it with httpx over the
OpenAI completions API: fixed-length greedy completions (`ignore_eos`), so every request does
the same work. Unpatched and patched runs alternate, so slow drift on a shared machine hits
both alike; figures are medians over runs. Writes benchmarks/results/serving-<engine>.json
and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edit_serve.models import load_model  # noqa: E402
from edit_serve.profiles import get_profile  # noqa: E402
from patches import Patch, PatchStack, to_bytes  # noqa: E402
from tests.servers import TOKEN, run_server  # noqa: E402

log = logging.getLogger("bench.serving")
PROMPTS = [
    "The Eiffel Tower is located in the city of",
    "The official language of Italy is",
    "Once upon a time, in a small village,",
    "The most important thing about machine learning is",
    "Water boils at a temperature of",
    "The capital of Japan is",
    "My favourite book is",
    "In 1969, the first humans",
]


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def rank_one_patches(model_name: str, count: int, layer: int | None = None) -> list[bytes]:
    """`count` small rank-one patches, all different: spread over the MLP output projections,
    or all at `layer`'s (as ROME edits one layer)."""
    lm = load_model(get_profile(model_name))
    stack = PatchStack(lm.model, base_model=lm.profile.name, architecture=lm.profile.architecture)
    out = []
    for i in range(count):
        name = lm.profile.mlp_out((3 * i + 1) % lm.profile.num_layers if layer is None else layer) + ".weight"
        w = lm.model.get_parameter(name)
        g = torch.Generator().manual_seed(i)
        b = torch.randn(w.shape[0], 1, generator=g) * 1e-3
        a = torch.randn(1, w.shape[1], generator=g)
        patch = Patch(kind="delta", method="manual", base_model="", base_fingerprint="",
                      tensors={f"delta.{name}.B": b, f"delta.{name}.A": a}, requests=[{"bench": i}])
        out.append(to_bytes(stack.stamp(patch)))
    return out


async def load_run(url: str, model: str, concurrency: int, requests: int, max_tokens: int) -> dict:
    """`requests` completions from `concurrency` clients; tokens/s and latency quantiles."""
    latencies: list[float] = []
    tokens = 0
    queue = list(range(requests))

    async def client(http: httpx.AsyncClient):
        nonlocal tokens
        while queue:
            i = queue.pop()
            started = time.perf_counter()
            r = await http.post("/v1/completions", json={
                "model": model, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens,
                "temperature": 0, "ignore_eos": True})
            r.raise_for_status()
            latencies.append(time.perf_counter() - started)
            tokens += r.json()["usage"]["completion_tokens"]

    async with httpx.AsyncClient(base_url=url, timeout=600,
                                 limits=httpx.Limits(max_connections=concurrency + 4)) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return {"tokens_per_s": tokens / wall, "p50_s": percentile(latencies, 0.5), "p99_s": percentile(latencies, 0.99),
            "requests": requests, "tokens": tokens, "wall_s": wall}


def apply_files(admin, paths: list[Path]) -> tuple[list[str], list[float]]:
    """POST each patch file in turn to a server (`admin`: an httpx client with the admin
    token): the applied ids and each round trip's seconds."""
    ids, seconds = [], []
    for path in tqdm(paths, desc="apply"):
        body = path.read_bytes()
        started = time.perf_counter()
        r = admin.post("/v1/patches", content=body)
        seconds.append(time.perf_counter() - started)
        r.raise_for_status()
        ids.append(r.json()["id"])
    return ids, seconds


def apply_latency(url: str, bodies: list[bytes], repeats: int) -> dict:
    """Round-trip times of POST /v1/patches (validate, store, apply, log) and DELETE, for
    rank-one patches taken in turn from `bodies`. The client's connection is opened (and its
    own first-call costs paid) by an admin GET first, not timed."""
    applies, reverts = [], []
    with httpx.Client(base_url=url, headers={"authorization": f"Bearer {TOKEN}"}, timeout=120) as http:
        http.get("/v1/patches").raise_for_status()
        for i in tqdm(range(repeats), desc="apply/revert", leave=False):
            t = time.perf_counter()
            r = http.post("/v1/patches", content=bodies[i % len(bodies)])
            applies.append(time.perf_counter() - t)
            r.raise_for_status()
            t = time.perf_counter()
            http.delete(f"/v1/patches/{r.json()['id']}").raise_for_status()
            reverts.append(time.perf_counter() - t)
    return {"apply_median_ms": 1000 * statistics.median(applies), "apply_p99_ms": 1000 * percentile(applies, 0.99),
            "revert_median_ms": 1000 * statistics.median(reverts), "revert_p99_ms": 1000 * percentile(reverts, 0.99),
            "repeats": repeats}


def stack_apply_latency(model_name: str, body: bytes, repeats: int) -> dict:
    """PatchStack.apply alone, in process (what the engine does between forward passes)."""
    from patches import from_bytes

    lm = load_model(get_profile(model_name))
    stack = PatchStack(lm.model, base_model=lm.profile.name, architecture=lm.profile.architecture)
    patch = from_bytes(body)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        stack.apply(patch)
        times.append(time.perf_counter() - t)
        stack.revert(patch.id)
    return {"median_ms": 1000 * statistics.median(times), "p99_ms": 1000 * percentile(times, 0.99)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--engine", default="hf", help="engine to serve with (default: %(default)s)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--runs", type=int, default=3, help="alternating unpatched/patched runs per concurrency")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--requests-per-client", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--patches", type=int, default=10)
    p.add_argument("--apply-repeats", type=int, default=50)
    p.add_argument("--serve-arg", action="append", default=[], help="extra argument for `edit_serve serve`")
    p.add_argument("--probes", action="store_true",
                   help="keep the server's probes on (off by default: benchmarks/probes.py measures their cost)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)

    bodies = rank_one_patches(args.model, args.patches)
    results: dict = {"engine": args.engine, "model": args.model, "max_tokens": args.max_tokens, "runs": args.runs,
                     "patches": args.patches, "concurrency": {}, "cpu_threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp, \
            run_server(Path(tmp) / "store", "--engine", args.engine, "--model", args.model,
                       *([] if args.probes else ["--no-probes"]), *args.serve_arg) as server:
        admin = server.admin()
        asyncio.run(load_run(server.url, args.model, 4, 8, args.max_tokens))  # warm-up
        for c in args.concurrency:
            runs = {"unpatched": [], "patched": []}
            for _ in tqdm(range(args.runs), desc=f"concurrency {c}"):
                for state in ("unpatched", "patched"):
                    ids = []
                    if state == "patched":
                        ids = [admin.post("/v1/patches", content=b).json()["id"] for b in bodies]
                        assert len(admin.get("/v1/patches").json()["patches"]) == args.patches
                    runs[state].append(asyncio.run(load_run(server.url, args.model, c,
                                                            c * args.requests_per_client, args.max_tokens)))
                    for i in ids:
                        admin.delete(f"/v1/patches/{i}").raise_for_status()
            summary = {}
            for state, rs in runs.items():
                summary[state] = {k: statistics.median(r[k] for r in rs) for k in ("tokens_per_s", "p50_s", "p99_s")}
                summary[state]["all_runs"] = rs
            summary["patched_over_unpatched"] = (summary["patched"]["tokens_per_s"]
                                                 / summary["unpatched"]["tokens_per_s"])
            results["concurrency"][str(c)] = summary
            log.info("concurrency %d: unpatched %.1f tok/s, patched %.1f tok/s (x%.3f)", c,
                     summary["unpatched"]["tokens_per_s"], summary["patched"]["tokens_per_s"],
                     summary["patched_over_unpatched"])
        results["apply_http"] = apply_latency(server.url, bodies[:1], args.apply_repeats)
    results["apply_in_process"] = stack_apply_latency(args.model, bodies[0], args.apply_repeats)

    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"serving-{args.engine}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2))
    stem.with_suffix(".md").write_text(markdown(results))
    log.info("wrote %s.json and .md", stem)
    print(markdown(results))


def markdown(r: dict) -> str:
    lines = [f"# Serving benchmark: engine `{r['engine']}`, model `{r['model']}`", "",
             f"{r['max_tokens']} greedy tokens per request (ignore_eos), medians of {r['runs']} alternating runs; "
             f"patched = {r['patches']} rank-one patches merged.", "",
             "| concurrency | state | tokens/s | p50 latency (s) | p99 latency (s) |", "|---|---|---|---|---|"]
    for c, s in r["concurrency"].items():
        for state in ("unpatched", "patched"):
            x = s[state]
            lines.append(f"| {c} | {state} | {x['tokens_per_s']:.1f} | {x['p50_s']:.3f} | {x['p99_s']:.3f} |")
        lines.append(f"| {c} | patched / unpatched | {s['patched_over_unpatched']:.3f} | | |")
    a, b = r["apply_http"], r["apply_in_process"]
    lines += ["", "| patch latency (rank one) | median (ms) | p99 (ms) |", "|---|---|---|",
              f"| POST /v1/patches (validate, store, fsync, apply, log) | {a['apply_median_ms']:.1f} | "
              f"{a['apply_p99_ms']:.1f} |",
              f"| DELETE /v1/patches/ID (revert, log) | {a['revert_median_ms']:.1f} | {a['revert_p99_ms']:.1f} |",
              f"| PatchStack.apply in process | {b['median_ms']:.2f} | {b['p99_ms']:.2f} |", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
