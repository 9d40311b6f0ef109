"""vllm vs hf on the same serving workload: runs `benchmarks/serving.py` once per engine with
the same arguments, then writes the comparison (throughput ratio per concurrency, p50/p99
latency, patch apply latency) to benchmarks/results/serving-vllm-vs-hf.json and .md.

    .venv/bin/python benchmarks/serving_vllm.py [--runs 3] [--concurrency 1 8 32] [--dtype bfloat16]

Target (issue 6): vllm >= 1.5x hf throughput at concurrency 32. Extra arguments after `--`
go to serving.py for both engines. vLLM starts its engine in worker processes with spawn,
which serving.py's server subprocess already isolates.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TARGET = 1.5
log = logging.getLogger("bench.serving_vllm")


def run_engine(engine: str, args: argparse.Namespace, extra: list[str]) -> dict:
    serve_args = ["--serve-arg=--dtype", f"--serve-arg={args.dtype}", "--serve-arg=--no-probes"]
    cmd = [sys.executable, str(ROOT / "benchmarks" / "serving.py"), "--engine", engine, "--runs", str(args.runs),
           "--concurrency", *map(str, args.concurrency), "--out", str(args.out), *serve_args, *extra]
    log.info("running %s", " ".join(cmd))
    subprocess.run(cmd, check=True, cwd=ROOT)
    return json.loads((args.out / f"serving-{engine}.json").read_text())


def compare(hf: dict, vllm: dict) -> dict:
    rows = {}
    for c, v in vllm["concurrency"].items():
        h = hf["concurrency"][c]
        rows[c] = {state: {"hf": h[state], "vllm": v[state],
                           "vllm_over_hf": v[state]["tokens_per_s"] / h[state]["tokens_per_s"]}
                   for state in ("unpatched", "patched")}
    top = max(vllm["concurrency"], key=int)
    ratio = rows[top]["unpatched"]["vllm_over_hf"]
    return {"concurrency": rows, "apply_http": {"hf": hf["apply_http"], "vllm": vllm["apply_http"]},
            "target": {"concurrency": int(top), "vllm_over_hf": ratio, "needed": TARGET, "met": ratio >= TARGET}}


def markdown(r: dict, settings: dict) -> str:
    lines = ["# Serving: vllm vs hf", "",
             f"Same workload on both engines: {settings['max_tokens']} greedy tokens per request (ignore_eos), "
             f"dtype {settings['dtype']}, medians of {settings['runs']} runs (benchmarks/serving.py over HTTP); "
             "patched = 10 rank-one patches applied.", "",
             "| concurrency | state | hf tokens/s | vllm tokens/s | vllm / hf | hf p50 / p99 (s) | vllm p50 / p99 (s) |",
             "|---|---|---|---|---|---|---|"]
    for c, row in r["concurrency"].items():
        for state, x in row.items():
            h, v = x["hf"], x["vllm"]
            lines.append(f"| {c} | {state} | {h['tokens_per_s']:.1f} | {v['tokens_per_s']:.1f} | {x['vllm_over_hf']:.2f} "
                         f"| {h['p50_s']:.2f} / {h['p99_s']:.2f} | {v['p50_s']:.2f} / {v['p99_s']:.2f} |")
    lines += ["", "| patch latency over HTTP (rank one) | hf median / p99 (ms) | vllm median / p99 (ms) |", "|---|---|---|"]
    for op in ("apply", "revert"):
        h, v = r["apply_http"]["hf"], r["apply_http"]["vllm"]
        lines.append(f"| {op} | {h[f'{op}_median_ms']:.1f} / {h[f'{op}_p99_ms']:.1f} "
                     f"| {v[f'{op}_median_ms']:.1f} / {v[f'{op}_p99_ms']:.1f} |")
    t = r["target"]
    lines += ["", f"Target: vllm >= {t['needed']}x hf at concurrency {t['concurrency']}: "
              f"measured {t['vllm_over_hf']:.2f}x, {'met' if t['met'] else 'NOT met'}.", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--out", type=Path, default=RESULTS)
    args, extra = p.parse_known_args()
    extra = [a for a in extra if a != "--"]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    results = {engine: run_engine(engine, args, extra) for engine in ("hf", "vllm")}
    comparison = compare(results["hf"], results["vllm"])
    settings = {"runs": args.runs, "dtype": args.dtype, "max_tokens": results["vllm"]["max_tokens"]}
    out = {**comparison, "settings": settings}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serving-vllm-vs-hf.json").write_text(json.dumps(out, indent=2))
    text = markdown(comparison, settings)
    (args.out / "serving-vllm-vs-hf.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
