"""The patch-file fuzzer at length: 100,000 mutations of valid patches of every kind.

    .venv/bin/python benchmarks/fuzz.py [--mutations 100000] [--seed 0] [--chunk 5000]

The fuzzer of `tests/patches/fuzzing.py` (Hypothesis strategies over bytes, the safetensors
header and the content under a valid id) against a tiny random-weight Llama and the PatchStack
of an hf engine.
Every mutation must raise nothing but PatchError, leave the weights bit-identical when
refused, and, when accepted, give a forward pass with finite logits and revert bit-exactly.
Runs in chunks (Hypothesis seeded per chunk); each finished chunk is written to
benchmarks/results/fuzz.json at once and skipped on a rerun. Violations are recorded with the
mutation's depth and reason, not raised, so one run counts them all. Writes fuzz.json and
fuzz.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from edit_serve.engines.hf import HFEngine  # noqa: E402
from tests.conftest import load_tiny  # noqa: E402
from tests.patches.fuzzing import Fuzzer, Violation  # noqa: E402

log = logging.getLogger("bench.fuzz")
RESULTS = ROOT / "benchmarks" / "results"


def run_chunk(fuzzer: Fuzzer, n: int, chunk_seed: int, bar: tqdm) -> dict:
    depths: Counter = Counter()
    outcomes: Counter = Counter()
    violations: list[dict] = []

    @seed(chunk_seed)
    @settings(max_examples=n, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def one(data):
        depth, mutated = data.draw(fuzzer.mutations())
        depths[depth] += 1
        try:
            outcomes[fuzzer.check(mutated)] += 1
        except Violation as e:
            outcomes["violation"] += 1
            if len(violations) < 50:
                violations.append({"depth": depth, "reason": str(e)[:300], "bytes": len(mutated)})
            fuzzer.stack.revert_all()  # keep fuzzing from a clean model
        bar.update(1)

    one()
    return {"mutations": sum(depths.values()), "depths": dict(depths), "outcomes": dict(outcomes),
            "violations": violations}


def report(results: dict) -> str:
    total: Counter = Counter()
    depths: Counter = Counter()
    for cell in results["chunks"].values():
        total.update(cell["outcomes"])
        depths.update(cell["depths"])
    n = sum(depths.values())
    lines = [
        "# Patch-file fuzzing", "",
        f"{n:,} mutations of valid patches (low-rank, dense, row- and column-sparse deltas; bias and FFN-neuron "
        "side modules) on a tiny Llama, by `benchmarks/fuzz.py` (Hypothesis, seeded per chunk).", "",
        "| depth | mutations |", "| --- | --- |",
        *[f"| {d} | {c:,} |" for d, c in sorted(depths.items())], "",
        "| outcome | count |", "| --- | --- |",
        *[f"| {o} | {c:,} |" for o, c in sorted(total.items())], "",
        f"Exceptions other than PatchError, refused patches that changed a weight, accepted patches that broke the "
        f"forward pass, gave non-finite logits or reverted inexactly: **{total['violation']}**.",
        "", f"Wall time {results['seconds']:.0f} s on {results['machine']}.",
    ]
    examples = [v for cell in results["chunks"].values() for v in cell["violations"]][:10]
    if examples:
        lines += ["", "Violations (first 10):", "", *[f"- {v['depth']}: {v['reason']}" for v in examples]]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mutations", type=int, default=100_000)
    ap.add_argument("--chunk", type=int, default=5_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", type=Path, default=RESULTS / "fuzz.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("patches").setLevel(logging.ERROR)

    results = json.loads(args.output.read_text()) if args.output.exists() else {}
    if results.get("seed") != args.seed or results.get("chunk") != args.chunk:
        results = {"seed": args.seed, "chunk": args.chunk, "chunks": {}, "seconds": 0.0}
    results["machine"] = f"{platform.machine()}, {platform.python_version()}"
    with tempfile.TemporaryDirectory() as tmp:
        lm = load_tiny("llama-3-8b", Path(tmp) / "llama")
        fuzzer = Fuzzer(HFEngine(lm).stack)  # the stack as the hf engine serves it (its worker not started)
        chunks = range(-(-args.mutations // args.chunk))
        done = sum(results["chunks"][str(c)]["mutations"] for c in chunks if str(c) in results["chunks"])
        with tqdm(total=args.mutations, initial=done, desc="mutations", unit="mut", mininterval=10) as bar:
            for c in chunks:
                if str(c) in results["chunks"]:
                    continue  # finished in an earlier run
                n = min(args.chunk, args.mutations - c * args.chunk)
                started = time.perf_counter()
                results["chunks"][str(c)] = run_chunk(fuzzer, n, args.seed * 1_000_003 + c, bar)
                results["seconds"] += time.perf_counter() - started
                args.output.parent.mkdir(parents=True, exist_ok=True)
                args.output.write_text(json.dumps(results, indent=2))
    args.output.with_suffix(".md").write_text(report(results))
    log.info("wrote %s and %s", args.output, args.output.with_suffix(".md"))


if __name__ == "__main__":
    main()
