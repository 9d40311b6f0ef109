"""vllm vs hf on the same serving workload: both engines serve at once (`edit_serve serve` on
loopback, one process each) and the same load (benchmarks/serving.py's `load_run`: greedy,
fixed-length completions over the OpenAI API) goes to one and then the other, run after run.
Alternating keeps slow drift on a shared machine from favouring either engine; figures are
medians over runs. Also the apply/revert latency of a rank-one patch over HTTP on each.

    .venv/bin/python benchmarks/serving_vllm.py [--runs 3] [--concurrency 1 8 32] [--dtype bfloat16]
    .venv/bin/python benchmarks/serving_vllm.py --parts apply --apply-repeats 100   # the patch latency alone

Writes benchmarks/results/serving-vllm-vs-hf.json and .md (a run of one part keeps the other's
recorded figures). Targets: vllm >= 1.5x hf throughput at concurrency 32 (issue 6); a rank-one
apply over HTTP on vllm at most 20 ms p99 (issue 12).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import statistics
import sys
import tempfile
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.serving import apply_latency, load_run, rank_one_patches  # noqa: E402
from edit_serve.profiles import get_profile  # noqa: E402
from tests.servers import run_server  # noqa: E402

ENGINES = ("hf", "vllm")
TARGET = 1.5
APPLY_P99_MS = 20.0
log = logging.getLogger("bench.serving_vllm")


def measure(urls: dict[str, str], args: argparse.Namespace) -> dict:
    out: dict = {}
    for c in args.concurrency:
        runs: dict[str, list[dict]] = {e: [] for e in ENGINES}
        for i in tqdm(range(args.runs), desc=f"concurrency {c}"):
            for engine in (ENGINES if i % 2 == 0 else ENGINES[::-1]):
                runs[engine].append(asyncio.run(load_run(urls[engine], args.model, c, c * args.requests_per_client,
                                                         args.max_tokens)))
        row = {e: {k: statistics.median(r[k] for r in rs) for k in ("tokens_per_s", "p50_s", "p99_s")}
                  | {"all_runs": rs}
               for e, rs in runs.items()}
        row["vllm_over_hf"] = row["vllm"]["tokens_per_s"] / row["hf"]["tokens_per_s"]
        log.info("concurrency %d: hf %.1f tok/s, vllm %.1f tok/s (x%.2f)", c, row["hf"]["tokens_per_s"],
                 row["vllm"]["tokens_per_s"], row["vllm_over_hf"])
        out[str(c)] = row
    return out


def markdown(r: dict) -> str:
    s = r["settings"]
    lines = ["# Serving: vllm vs hf", "",
             f"Model `{s['model']}`, dtype {s['dtype']}, {s['max_tokens']} greedy tokens per request (ignore_eos), "
             f"{s['requests_per_client']} requests per client; both servers up at once, runs alternating between them; "
             f"medians of {s['runs']} runs.", "",
             "| concurrency | hf tokens/s | vllm tokens/s | vllm / hf | hf p50 / p99 (s) | vllm p50 / p99 (s) |",
             "|---|---|---|---|---|---|"]
    for c, row in r["concurrency"].items():
        h, v = row["hf"], row["vllm"]
        lines.append(f"| {c} | {h['tokens_per_s']:.1f} | {v['tokens_per_s']:.1f} | {row['vllm_over_hf']:.2f} "
                     f"| {h['p50_s']:.2f} / {h['p99_s']:.2f} | {v['p50_s']:.2f} / {v['p99_s']:.2f} |")
    a = r["apply_http"]
    layer = r.get("apply_layer")
    each = (f"each a different patch at layer {layer} (the profile's ROME layer), the first the server's first; "
            "hf runs its verify pass on every new patch set, vllm has none" if layer is not None
            else "the same patch each time")
    lines += ["", f"Rank-one patch over HTTP, {a['vllm']['repeats']} applies and reverts per engine, {each} "
              f"(1-minute load average {r.get('apply_load_average', ['not recorded'])[0]}):", "",
              "| rank-one patch over HTTP | hf median / p99 (ms) | vllm median / p99 (ms) |", "|---|---|---|"]
    for op in ("apply", "revert"):
        h, v = a["hf"], a["vllm"]
        lines.append(f"| {op} | {h[f'{op}_median_ms']:.1f} / {h[f'{op}_p99_ms']:.1f} "
                     f"| {v[f'{op}_median_ms']:.1f} / {v[f'{op}_p99_ms']:.1f} |")
    t = r["target"]
    lines += ["", f"Target vllm >= {t['needed']}x hf at concurrency {t['concurrency']}: measured "
              f"{t['vllm_over_hf']:.2f}x ({'met' if t['met'] else 'not met'}).",
              f"Target vllm apply p99 <= {APPLY_P99_MS:g} ms: measured {a['vllm']['apply_p99_ms']:.1f} ms "
              f"({'met' if a['vllm']['apply_p99_ms'] <= APPLY_P99_MS else 'not met'}).", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--runs", type=int, default=3, help="runs per engine and concurrency, alternating")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--apply-repeats", type=int, default=10)
    p.add_argument("--parts", nargs="+", choices=["throughput", "apply"], default=["throughput", "apply"])
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)

    layer = get_profile(args.model).default_layers("rome")[0]
    bodies = rank_one_patches(args.model, args.apply_repeats, layer=layer)  # each apply a new patch, as edits come
    serve = ("--model", args.model, "--dtype", args.dtype, "--no-probes")
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        servers = {e: stack.enter_context(run_server(Path(tmp) / e / "store", "--engine", e, *serve, timeout=600))
                   for e in ENGINES}
        urls = {e: s.url for e, s in servers.items()}
        for url in urls.values():
            asyncio.run(load_run(url, args.model, 4, 8, args.max_tokens))  # warm-up
        results = {"concurrency": measure(urls, args)} if "throughput" in args.parts else {}
        if "apply" in args.parts:
            results["apply_http"] = {e: apply_latency(urls[e], bodies, args.apply_repeats) for e in ENGINES}
            results["apply_load_average"] = [round(x, 2) for x in os.getloadavg()]
            results["apply_layer"] = layer
    recorded = args.out / "serving-vllm-vs-hf.json"
    if recorded.is_file():  # the part not run keeps its recorded figures
        results = {**json.loads(recorded.read_text()), **results}
    top = str(max(int(c) for c in results["concurrency"]))
    ratio = results["concurrency"][top]["vllm_over_hf"]
    results["target"] = {"concurrency": int(top), "vllm_over_hf": ratio, "needed": TARGET, "met": ratio >= TARGET}
    if "throughput" in args.parts:
        results["settings"] = {k: getattr(args, k) for k in ("model", "runs", "requests_per_client", "max_tokens",
                                                             "dtype")}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serving-vllm-vs-hf.json").write_text(json.dumps(results, indent=2))
    text = markdown(results)
    (args.out / "serving-vllm-vs-hf.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
