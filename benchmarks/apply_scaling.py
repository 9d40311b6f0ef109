"""How an apply slows as edits pile up on a live model, and what compaction buys back.

    .venv/bin/python benchmarks/apply_scaling.py [--sizes 0 10 100 300 1000] [--repeats 7]

A PatchStack keeps revert exact by recomposing base + every active delta of a parameter on
each change, so an apply costs more the more patches are active. For each size N: N rank-one
patches (MEMIT's shape: one per edited layer's MLP output weight, the profile's MEMIT layers)
are made active on the real model; then one more patch is applied and reverted --repeats times
(median of each), first on top of the N patches, then on top of the one patch compaction makes
of them. The stack runs without its output check (a forward pass, the same cost at every N),
so the figures are the composition's. Each size is written to apply-scaling.json as it
finishes and skipped on a rerun with the same settings; apply-scaling.md is the table.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.editing import Rows, machines_line  # noqa: E402
from edit_serve.models import load_model  # noqa: E402
from edit_serve.profiles import get_profile  # noqa: E402
from patches import Patch, PatchStack  # noqa: E402
from patches.compact import compact  # noqa: E402

log = logging.getLogger("bench.apply_scaling")


def rank_one(stack: PatchStack, params: list[str], seed: int) -> Patch:
    """A stamped rank-one patch on each of `params`, small enough to keep the model sane."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name in params:
        out, inp = stack.model.get_parameter(name).shape
        tensors[f"delta.{name}.B"] = torch.randn(out, 1, generator=g) * 1e-3
        tensors[f"delta.{name}.A"] = torch.randn(1, inp, generator=g) * 1e-3
    return stack.stamp(Patch(kind="delta", method="memit", base_model="", base_fingerprint="", tensors=tensors,
                             requests=[{"seed": seed}]))


def time_one_more(stack: PatchStack, patch: Patch, repeats: int) -> tuple[float, float]:
    """Median seconds to apply `patch` on top of the stack, and to revert it."""
    applies, reverts = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        stack.apply(patch)
        applies.append(time.perf_counter() - start)
        start = time.perf_counter()
        stack.revert(patch.id)
        reverts.append(time.perf_counter() - start)
    return statistics.median(applies), statistics.median(reverts)


def measure(lm, params: list[str], n: int, repeats: int) -> dict:
    stack = PatchStack(lm.model, base_model=lm.profile.name, architecture=lm.profile.architecture)
    active = [rank_one(stack, params, seed) for seed in range(n)]
    extra = rank_one(stack, params, seed=n)
    stack.replace([p.id for p in active], active)  # one change-set: one composition
    apply_s, revert_s = time_one_more(stack, extra, repeats)
    row = {"n": n, "apply_ms": 1e3 * apply_s, "revert_ms": 1e3 * revert_s}
    if n >= 2:
        shapes = {name: stack.model.get_parameter(name).shape for name in params}
        merged = stack.stamp(compact(active, shapes))
        stack.replace([merged.id], [merged])
        apply_s, revert_s = time_one_more(stack, extra, repeats)
        row.update(compacted_apply_ms=1e3 * apply_s, compacted_revert_ms=1e3 * revert_s)
    stack.revert_all()
    return row


def markdown(results: dict) -> str:
    lines = ["# Apply latency as patches pile up", "",
             "Written by `benchmarks/apply_scaling.py`. One rank-one patch applied (and reverted) on top of N "
             "active rank-one patches on the real model, median of the repeats; the stack's output check "
             "(a forward pass, the same at every N) is off. 'compacted': on top of the one patch compaction "
             "makes of the N.", "",
             "| model | active patches | weights touched | apply ms | revert ms | apply ms, compacted | "
             "revert ms, compacted | recorded |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for row in sorted(results["rows"].values(), key=lambda r: r["n"]):
        compacted = [f"{row[k]:.1f}" if k in row else "-" for k in ("compacted_apply_ms", "compacted_revert_ms")]
        lines.append(f"| {row['model']} | {row['n']:,} | {len(row['params'])} | {row['apply_ms']:.1f} | "
                     f"{row['revert_ms']:.1f} | {compacted[0]} | {compacted[1]} | {row['recorded_at'][:16]} |")
    lines += ["", machines_line(results["rows"]), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[0, 10, 100, 300, 1000])
    p.add_argument("--repeats", type=int, default=7)
    args, results = Rows.from_cli(p, argv, "apply_scaling.py", "apply-scaling.json")
    lm = load_model(get_profile(args.model), dtype="float32")
    params = [lm.profile.mlp_out(layer) + ".weight" for layer in lm.profile.default_layers("memit")]
    for n in tqdm(args.sizes, desc="apply scaling", unit="size"):
        key, settings = f"{args.model}/{n}", {"repeats": args.repeats, "params": params, "model": args.model}
        if results.done(key, settings):
            continue
        row = measure(lm, params, n, args.repeats)
        results.add(key, row, settings)
        log.info("%d active: apply %.1f ms, compacted %s ms", n, row["apply_ms"], row.get("compacted_apply_ms"))
    (args.out / "apply-scaling.md").write_text(markdown(results.data))
    return results.data


if __name__ == "__main__":
    main()
