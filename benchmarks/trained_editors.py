"""Training benchmark of the trained editors (MEND, KE): train an editor for the model (resumable)
and write its training curves (validation edit success and locality per step, training loss)
as JSON and PNG under benchmarks/results/.

    .venv/bin/python benchmarks/trained_editors.py --method mend                  # about an hour on 2 CPU cores
    .venv/bin/python benchmarks/trained_editors.py --method mend --resume         # continue an interrupted run
    .venv/bin/python benchmarks/trained_editors.py --method ke --max-minutes 60
    .venv/bin/python benchmarks/trained_editors.py --method mend --part speed     # seconds per edit, peak memory
    .venv/bin/python benchmarks/trained_editors.py --part report                  # trained-editors.md from the JSON
                                                                                  # and the survey's mend and ke cells

Training data: counterfact_batch.jsonl and zsre.jsonl of the shared data folder, leaving out
every record that shares an id or subject with the first 100 records of counterfact.jsonl and
zsre.jsonl (the evaluation records). The checkpoint goes to --checkpoint (default: under
$EDIT_SERVE_CACHE/benchmarks/) with its resume state beside it, and is installed in the model's
editor cache, so `edit_serve eval --method mend ...` then uses it. The wall time and the machine's
load average (before and after) are recorded, since the CPU may be shared.

`--part speed` times single edits with the cached (or --checkpoint) editor: --runs runs over the
first --speed-n records of counterfact.jsonl, one untimed warm-up edit first; it writes the
median seconds per edit and the peak memory (edit_serve.evaluation.EditMeter: the process's
peak resident memory on a CPU) to benchmarks/results/<method>-speed.json; with --config (the
edit's settings there, e.g. '{"fit_scale": true}') and --variant, to <method>[VARIANT]-speed.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import DATA  # noqa: E402
import torch  # noqa: E402

from edit_serve.evaluation import read_records, training_examples  # noqa: E402
from edit_serve.models import cache_dir, load_model  # noqa: E402
from edit_serve.profiles import get_profile  # noqa: E402
from editors.context import EditContext  # noqa: E402
from editors.training import train_editor  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    val, train = result["val_curve"], result["train_curve"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot([p["step"] for p in val], [p["edit_success"] for p in val], "o-", label="edit success")
    left.plot([p["step"] for p in val], [p["locality"] for p in val], "s-", label="locality")
    left.set(xlabel="step", ylabel="validation (single edits)", ylim=(0, 1.02),
             title=f"{result['method']} on {result['model']}: {len(result['val_records'])} held-out edits")
    left.legend()
    steps = [p["step"] for p in train]
    right.plot(steps, [p["edit_loss"] for p in train], label="edit NLL (post-edit)")
    right.plot(steps, [p["loc_loss"] for p in train], label="locality KL")
    right.plot(steps, [p["pre_nll"] for p in train], label="target NLL before the edit", alpha=0.5)
    right.set(xlabel="step", ylabel="training batch mean", yscale="log", title="training losses")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _label(args) -> str:
    """<method>, or <method>[<variant>] for another recipe or setting: how its result files are named."""
    return f"{args.method}[{args.variant}]" if args.variant else args.method


def speed(args, lm, ctx) -> None:
    import statistics

    from edit_serve.evaluation import EditMeter, requests_of

    config = {**json.loads(args.config), **({"editor": str(args.checkpoint)} if args.checkpoint else {})}
    records = read_records(DATA / "counterfact.jsonl", args.speed_n)
    ctx.compute(args.method, requests_of(records[:1]), config)  # warm-up: loads the editor
    runs = []
    for run in range(args.runs):
        meter = EditMeter(next(lm.model.parameters()).device)
        for record in records:
            with meter.measure(1):
                ctx.compute(args.method, requests_of([record]), config)
        runs.append(meter.summary())
        logging.info("run %d: %.3f s per edit", run + 1, meter.seconds_per_edit)
    result = {"method": args.method, "model": args.model, "config": config, "edits_per_run": len(records),
              "runs": args.runs,
              "seconds_per_edit_median": statistics.median(r["seconds_per_edit"] for r in runs),
              "peak_memory_bytes": max(r["peak_memory_bytes"] for r in runs), "per_run": runs,
              "load_average": os.getloadavg(), "torch_threads": torch.get_num_threads(),
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "cpus": os.cpu_count(),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    out = RESULTS / f"{_label(args)}-speed.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}: {result['seconds_per_edit_median']:.3f} s per edit (median of {args.runs} runs), "
          f"peak memory {result['peak_memory_bytes'] / 2**20:.0f} MiB")


def _load_summary(loads) -> str:
    if not loads:
        return "not recorded by this run (sampled by hand: 2.6-7.8)"
    return f"{sum(loads) / len(loads):.2f}, {min(loads):.2f}-{max(loads):.2f}"


SURVEY_CELLS = RESULTS / "survey" / "cells"
#: the survey's cells that hold a default editor's figures: (part, data, size) -> the mode shown
SURVEY_ROWS = {("table2", "counterfact", None): "single", ("table2", "zsre", None): "single",
               ("batch", "counterfact", 10): "batch 10", ("batch", "counterfact", 100): "batch 100",
               ("sequential", "counterfact", 10): "sequential 10",
               ("sequential", "counterfact", 100): "sequential 100"}


def quality_rows() -> list[tuple[str, str, str, dict, str]]:
    """(method, data, mode, figures, source) per edit-quality row: the default editors' from the
    survey's cells (benchmarks/survey.py runs them with the cached editor; one record of each
    figure), then the variants' (another recipe: `edit_serve eval` JSON under
    results/trained-editors/<method>[<variant>]-<data>-<mode>.json)."""
    rows = []
    for method in ("mend", "ke"):
        for (part, data, size), mode in SURVEY_ROWS.items():
            path = SURVEY_CELLS / f"{'__'.join([part, data, method] + ([str(size)] if size else []))}.json"
            cell = json.loads(path.read_text()) if path.is_file() else {}
            if cell.get("status") == "done":
                rows.append((method, data, mode, cell["result"], f"survey/cells/{path.name}"))
    for path in sorted((RESULTS / "trained-editors").glob("*.json")):
        r = json.loads(path.read_text())
        mode = r["mode"] + (f" {r['batch_size']}" if r["mode"] != "single" else "")
        if r["mode"] == "sequential":
            mode = f"sequential {r['n']}"
        rows.append((path.stem.rsplit("-", 2)[0], Path(r["data"]).stem, mode, r, f"trained-editors/{path.name}"))
    return rows


def report() -> None:
    """benchmarks/results/trained-editors.md from the training and speed JSON, the survey's
    cells of the default editors and the variants' `edit_serve eval` JSON (`quality_rows`). A
    variant's files (another recipe than the defaults) are named <method>[<variant>]-..."""
    lines = ["# Trained editors (MEND, KE) on smollm2-135m, CPU", "",
             "Written by `benchmarks/trained_editors.py --part report` from the JSON beside it; the exact "
             "commands and the machine's load are in the issue note and in each JSON.", "",
             "## Training", "", "| method | layers | steps | minutes | final validation edit success | locality | "
             "1-minute load during training (mean, min-max) |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for path in sorted(RESULTS.glob("*-training.json")):  # <method>[<variant>]-training.json
        t = json.loads(path.read_text())
        last = t["val_curve"][-1] if t["val_curve"] else {}
        layers = ", ".join(map(str, t.get("layers") or [])) or "-"
        lines.append(f"| {path.stem.removesuffix('-training')} | {layers} | {t['steps']} | "
                     f"{t['training_seconds'] / 60:.1f} | "
                     f"{last.get('edit_success', float('nan')):.3f} | {last.get('locality', float('nan')):.3f} | "
                     f"{_load_summary(t.get('load1_during_training'))} |")
    lines += ["", "## Edit quality (first 100 records; token-level top-1, locality against the unedited model)", "",
              "The default editors' rows are the survey's cells (`benchmarks/survey.py`, the cached editor); "
              "a variant's are `edit_serve eval` runs with its checkpoint.", "",
              "| method | data | mode | n | reliability | generality | locality | portability | "
              "s per edit | peak MiB | source |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for method, data, mode, r, source in quality_rows():
        lines.append(f"| {method} | {data} | {mode} | {r['n']} | {fmt(r['reliability'])} | "
                     f"{fmt(r['generality'])} | {fmt(r['locality'])} | {fmt(r['portability'])} | "
                     f"{r['seconds_per_edit']:.3f} | {r['peak_memory_bytes'] / 2**20:.0f} | {source} |")
    lines += ["", "## Speed (single edits, median of runs)", ""]
    for path in sorted(RESULTS.glob("*-speed.json")):  # <method>[<variant>]-speed.json
        method, s = path.name.removesuffix("-speed.json"), json.loads(path.read_text())
        lines.append(f"- {method}: {s['seconds_per_edit_median']:.3f} s per edit (median of {s['runs']} runs of "
                     f"{s['edits_per_run']} edits), peak memory {s['peak_memory_bytes'] / 2**20:.0f} MiB "
                     f"(process RSS, model included); load average {s['load_average'][0]:.1f} on {s['cpus']} CPUs, "
                     f"OMP_NUM_THREADS={s['omp_num_threads']}")
    out = RESULTS / "trained-editors.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", default="mend", choices=["mend", "ke"])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--checkpoint", type=Path, help="where the checkpoint goes (default: under the cache)")
    p.add_argument("--config", default="{}", help="train: network and training settings; speed: the edit's (JSON)")
    p.add_argument("--layers", type=int, nargs="+", metavar="L",
                   help="layers to edit (default: the profile's; other layers make a variant: give --variant)")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--max-minutes", type=float, default=55.0)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--exclude-first", type=int, default=100, help="evaluation records left out of training")
    p.add_argument("--part", choices=["train", "speed", "report"], default="train")
    p.add_argument("--runs", type=int, default=3, help="speed: timed runs")
    p.add_argument("--speed-n", type=int, default=10, help="speed: single edits per run")
    p.add_argument("--variant", help="file the curve as <method>[VARIANT]-training.json, the speed as "
                                     "<method>[VARIANT]-speed.json (a --config or checkpoint other than the defaults)")
    args = p.parse_args()
    if args.layers and not args.variant:
        p.error("--layers other than the profile's make a variant: name it with --variant")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.part == "report":
        return report()
    if args.part == "speed":
        lm = load_model(get_profile(args.model))
        return speed(args, lm, EditContext.from_loaded(lm))

    checkpoint = args.checkpoint or cache_dir() / "benchmarks" / f"{args.method}-{args.model}.safetensors"
    held = read_records(DATA / "counterfact.jsonl", args.exclude_first) + read_records(DATA / "zsre.jsonl",
                                                                                        args.exclude_first)
    examples = [e for f in ("counterfact_batch.jsonl", "zsre.jsonl")
                for e in training_examples(read_records(DATA / f), held)]
    lm = load_model(get_profile(args.model))
    ctx = EditContext.from_loaded(lm)
    load_before, started = os.getloadavg(), time.perf_counter()
    settings = {**json.loads(args.config), "steps": args.steps, "max_minutes": args.max_minutes}
    # a variant is an experiment: only the default recipe's editor goes to the model's editor cache,
    # where edits (and survey.py) pick it up as the model's editor
    path, state = train_editor(ctx, args.method, examples, checkpoint, layers=args.layers, settings=settings,
                               resume=args.resume, cache=not args.variant)
    from editors.trained import read_editor_info

    info = read_editor_info(path)
    result = {
        "method": args.method, "model": args.model, "fingerprint": ctx.fingerprint, "checkpoint": str(path),
        "layers": info.layers, "network": info.config, "train": info.extra.get("train"), "net": info.extra.get("net"),
        "examples": len(examples), "excluded_eval_records": len(held),
        "val_records": [e.request.subject for e in _val(examples, info.extra["train"])],
        "steps": state.step, "training_seconds": round(state.seconds, 1),
        "this_invocation_seconds": round(time.perf_counter() - started, 1),
        "load_average_before": load_before, "load_average_after": os.getloadavg(),  # of this invocation
        "load1_during_training": [p["load1"] for p in state.train_curve if p.get("load1") is not None],
        "torch_threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "cpus": os.cpu_count(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "val_curve": state.val_curve, "train_curve": state.train_curve,
    }
    out = RESULTS / f"{_label(args)}-training.json"
    out.write_text(json.dumps(result, indent=1))
    plot(result, out.with_suffix(".png"))
    last = state.val_curve[-1] if state.val_curve else {}
    print(f"wrote {out} and {out.with_suffix('.png')}: {state.step} steps, {state.seconds / 60:.1f} min; "
          f"last validation {last}")


def _val(examples, train_cfg):
    import random

    pool = list(examples)
    random.Random(train_cfg["seed"]).shuffle(pool)
    return pool[:train_cfg["val_size"]]


if __name__ == "__main__":
    main()
