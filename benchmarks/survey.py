"""The seed survey's tables, reproduced on the served model with one command (issue 17).

    .venv/bin/python benchmarks/survey.py                              # every registered method, N = 100
    .venv/bin/python benchmarks/survey.py --methods rome ft --n 10     # a slice
    .venv/bin/python benchmarks/survey.py --report-only                # re-render the report from the cells

The seed ("Editing Large Language Models: Problems, Methods, and Opportunities", Yao et al. 2023)
compares editing methods under one protocol. This runs that protocol on the served model (default
smollm2-135m) for every method in the registry (`editors.list_editors()`: a method registered
later is picked up without touching this script). The work is cut into cells, each written to
benchmarks/results/survey/cells/<key>.json as soon as it finishes; a rerun skips every cell whose
file holds the same settings, and an interrupted cell resumes at its last finished patch (the
harness checkpoint, kept under benchmarks/results/survey/progress/, so that a half-done cell can
be committed and resumed on another machine).

- table2__<data>__<method>: single edits of the first N records of CounterFact and zsRE:
  reliability, generality, locality (Table 2) and portability (Table 3), each teacher-forced (the
  survey's way) and on the free greedy answer, with the unedited model's figures;
- mquake__mquake__<method>: the first N MQuAKE-CF cases, each case's 1-3 edits in one patch;
  portability is the multi-hop question (Table 3);
- time__counterfact__<method>: wall time for 10 edits (Table 4) and the peak memory while editing
  (Fig. 5): the first 10 CounterFact records (fewer when N < 10, then scaled to 10), each edit
  computed from the unedited model, statistics and checkpoints cached, after one untimed warm-up
  edit;
- train__counterfact__<method>: time and peak memory while training (Fig. 5), for the trained
  methods (editors.trained), only with --train: `--train-steps` steps of `editors.training`
  on counterfact_batch.jsonl (the evaluated records left out), checkpoint to a temporary file;
- batch__<data>__<method>__<K>: K records per patch over the first max(N, K) records (Fig. 6);
  K = 1 is the table2 cell;
- sequential__<data>__<method>__<K>: the first K records edited one after another, scored at the
  end (Fig. 7); the streams of one method share a checkpoint, so K = 100 extends K = 10.

Fig. 6 and 7 run on the first Table 2 data set chosen (CounterFact), at the default sizes up to N;
sizes named with --batch-sizes / --sequential-sizes run as named. CounterFact's development file
has 829 records, so the 1,000-edit points run on --curves counterfact_batch (all of CounterFact,
one locality prompt and no true paraphrases per record: its generality is not CounterFact's):

    .venv/bin/python benchmarks/survey.py --methods rome memit alphaedit --parts batch sequential \
        --curves counterfact_batch --batch-sizes 1000 --sequential-sizes 1000

A method that cannot run a cell (rome on T5, a trained method without its checkpoint, a method
that edits one fact per patch in a multi-edit cell) gets a cell with its one-line reason, which the
report shows in place of figures (--redo-not-applicable retries them). Statistics are computed
once per model and corpus and cached (editors.stats); trained checkpoints are the editors' to find
through the edit context. Then survey.md, fig5-memory.png, fig6-batch.png and fig7-sequential.png
are rendered from every cell in the folder (benchmarks/survey_report.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import DATA  # noqa: E402
from benchmarks.editing import machine, needs_stats, parse_configs, prepare_stats  # noqa: E402
from benchmarks.survey_report import load_cells, render  # noqa: E402
from editors import EditError, get_editor, list_editors  # noqa: E402
from editors.base import make_config  # noqa: E402
from editors.context import EditContext, release_free_memory  # noqa: E402
from editors.trained import NETS, editor_digest, editor_file  # noqa: E402
from edit_serve.evaluation import EditMeter, EvalSettings, evaluate, read_records, requests_of, write_json  # noqa: E402

log = logging.getLogger("bench.survey")
OUT = ROOT / "benchmarks" / "results" / "survey"
TABLE_DATASETS = ("counterfact", "zsre")  # Table 2 and 3; the first one chosen also carries Fig. 6 and 7
CURVE_DATASETS = (*TABLE_DATASETS, "counterfact_batch")  # --curves: counterfact_batch for streams over 829 edits
DEFAULT_SIZES = (1, 10, 100)  # Fig. 6 and 7 when no sizes are named (those up to N)
MULTI_HOP = "mquake"
PARTS = ("table2", "mquake", "time", "batch", "sequential", "train")
TIMING_EDITS = 10  # the survey's Table 4: wall time for 10 edits


@dataclass(frozen=True)
class Cell:
    part: str
    method: str
    data: str
    size: int | None = None  # batch: records per patch; sequential: edits in the stream

    @property
    def key(self) -> str:
        return "__".join([self.part, self.data, self.method] + ([str(self.size)] if self.size is not None else []))


def plan(methods: list[str], datasets: list[str], parts: list[str], batch_sizes: list[int],
         sequential_sizes: list[int], train: bool, curves: str | None = None) -> list[Cell]:
    """Every cell of the survey for the selection, cheapest tables first (Table 2 for every
    method before the curves), so a partial run fills whole tables. The curves (Fig. 6 and 7)
    run on `curves`, else on the first Table 2 data set chosen."""
    tables = [d for d in TABLE_DATASETS if d in datasets]
    curves = curves or (tables[0] if tables else None)
    cells: list[Cell] = []
    for part in PARTS:
        if part not in parts:
            continue
        for method in methods:
            if part == "table2":
                cells += [Cell(part, method, d) for d in tables]
            elif part == "mquake" and MULTI_HOP in datasets:
                cells.append(Cell(part, method, MULTI_HOP))
            elif part == "time":
                cells.append(Cell(part, method, "counterfact"))
            elif part == "train" and train and trainable(method):
                cells.append(Cell(part, method, "counterfact"))
            elif part == "batch" and curves:
                cells += [Cell(part, method, curves, k) for k in batch_sizes if k > 1]
            elif part == "sequential" and curves:
                cells += [Cell(part, method, curves, k) for k in sequential_sizes]
    return cells


def trainable(method: str) -> bool:
    """Whether `method` has an editor network to train (Fig. 5 measures its training)."""
    return method in NETS


# --- one cell ------------------------------------------------------------------------------


def identity(cell: Cell, profile: str, n: int, config: dict, args, editor: str | None = None) -> dict:
    """What a cell's figures depend on (`editor`: the trained editor's digest, for the cells
    that edit with one); a recorded cell with another identity is redone."""
    if "stats_corpus" in config:  # by content, not by path: a checkout elsewhere keeps its cells
        from editors.corpus import CorpusSpec

        config = {**config, "stats_corpus": CorpusSpec(config["stats_corpus"]).ident()}
    ident = {"model": profile, "part": cell.part, "method": cell.method, "data": cell.data, "size": cell.size,
             "config": config, "greedy": not args.no_greedy, "fluency_tokens": args.fluency_tokens}
    if cell.part in ("table2", "mquake", "batch"):
        ident["n"] = cell_records(cell, n)
    if cell.part == "train":
        ident["train_steps"] = args.train_steps
    if editor is not None:
        ident["editor"] = editor
    if cell.part in ("time", "train"):
        ident["edits"] = min(TIMING_EDITS, n)
        ident["meter"] = "rss-after-malloc-trim"  # earlier cells measured against the process's high-water mark
    return json.loads(json.dumps(ident, sort_keys=True, default=str))


def cell_records(cell: Cell, n: int) -> int:
    """How many of its data set's first records a cell edits: a sequential stream's K, a batch
    cell's max(N, K) (one batch where K is larger), else N."""
    if cell.part == "sequential":
        return cell.size
    return max(n, cell.size) if cell.part == "batch" else n


def progress_folder(out: Path, profile: str, cell: Cell) -> Path:
    """The harness checkpoint of a cell, one per sequential stream: under the results folder, so
    that a cell longer than a working session can be committed half done and resumed on another
    machine (a sequential stream's also lets a longer stream extend it)."""
    name = cell.key if cell.part != "sequential" else f"sequential__{cell.data}__{cell.method}"
    return out / "progress" / profile / name


def run_cell(lm, ctx: EditContext, cell: Cell, config: dict, n: int, args) -> dict:
    """The cell's result (the harness result dict, or time and memory figures)."""
    data = args.data_dir / f"{cell.data}.jsonl"
    settings = EvalSettings(fluency_tokens=args.fluency_tokens, greedy=not args.no_greedy, progress=False)
    if cell.part in ("table2", "mquake", "batch", "sequential"):
        records = read_records(data, cell_records(cell, n))
        if cell.part == "batch":
            settings = dataclasses.replace(settings, mode="batch", batch_size=cell.size)
        elif cell.part == "sequential":
            settings = dataclasses.replace(settings, mode="sequential", batch_size=1)
        prepare_stats(lm.model, lm, cell.method, config)  # so the first edit does not pay for them
        return {"data": data.name, **evaluate(ctx, cell.method, records, config, settings,
                                              checkpoint=progress_folder(args.out, lm.profile.name, cell))}
    if cell.part == "time":
        return run_timing(lm, ctx, cell.method, config, read_records(data, min(TIMING_EDITS, n)))
    if cell.part == "train":
        return run_training(ctx, cell.method, data, n, args)
    raise ValueError(f"unknown part {cell.part!r}")


def run_training(ctx: EditContext, method: str, data: Path, n: int, args) -> dict:
    """Time and peak memory of `args.train_steps` training steps of `method`'s editor network,
    on the training split (counterfact_batch.jsonl without the first `n` records of `data`)."""
    import tempfile

    from edit_serve.evaluation import training_examples
    from editors.training import train_editor

    examples = training_examples(read_records(args.data_dir / "counterfact_batch.jsonl"), read_records(data, n))
    release_free_memory(collect=True)
    meter = EditMeter(next(ctx.model.parameters()).device)
    with tempfile.TemporaryDirectory() as tmp, meter.measure(0):
        _, state = train_editor(ctx, method, examples, Path(tmp) / "editor.safetensors",
                                settings={"steps": args.train_steps, "val_size": 0}, progress=False, cache=False)
    return {"training_seconds": meter.seconds[-1], "steps": state.step, "examples": len(examples),
            "seconds_per_step": meter.seconds[-1] / max(state.step, 1), "peak_memory_bytes": meter.peak_bytes,
            "baseline_memory_bytes": meter.baseline_bytes, "peak_memory_kind": meter.kind}


def run_timing(lm, ctx: EditContext, method: str, config: dict, records) -> dict:
    """Table 4 and Fig. 5: each record edited from the unedited model (computing the patch is
    timed; applying is not), after an untimed warm-up edit."""
    prepare_stats(lm.model, lm, method, config)
    ctx.compute(method, requests_of(records[:1]), config)  # warm-up: caches, lazy imports
    trimmed = release_free_memory(collect=True)
    meter = EditMeter(next(lm.model.parameters()).device)
    for record in records:
        requests = list(record.requests)
        with meter.measure(len(requests)):
            ctx.compute(method, requests, config)
    total = sum(meter.seconds)
    return {"data": "counterfact.jsonl", "edits_timed": meter.edits, "seconds_total": total,
            "seconds_for_10_edits": total * TIMING_EDITS / meter.edits, "seconds_per_edit": meter.seconds_per_edit,
            "seconds_each": meter.seconds, **{k: v for k, v in meter.summary().items() if "memory" in k},
            "heap_trimmed": trimmed, "torch_threads": torch.get_num_threads()}


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."


# --- the run -------------------------------------------------------------------------------


def recorded(path: Path, ident: dict, redo_not_applicable: bool) -> bool:
    """Whether `path` holds a finished cell (figures, or a reason why the method cannot run it)
    with the same identity."""
    entry = read_cell(path)
    if entry.get("identity") != ident:
        return False
    return entry.get("status") == "done" or (entry.get("status") == "not_applicable" and not redo_not_applicable)


def read_cell(path: Path) -> dict:
    """The cell recorded at `path`, {} where there is none (or it cannot be read)."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--methods", nargs="+", help="methods to run (default: every registered one)")
    p.add_argument("--datasets", nargs="+", default=[*TABLE_DATASETS, MULTI_HOP],
                   choices=[*TABLE_DATASETS, MULTI_HOP], help="(default: %(default)s)")
    p.add_argument("--n", type=int, default=100, help="records per data set (default: %(default)s)")
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS, help="(default: all)")
    p.add_argument("--batch-sizes", type=int, nargs="+",
                   help=f"Fig. 6: records per patch (default: {', '.join(map(str, DEFAULT_SIZES))}, those up to N)")
    p.add_argument("--sequential-sizes", type=int, nargs="+",
                   help=f"Fig. 7: edits per stream (default: {', '.join(map(str, DEFAULT_SIZES))}, those up to N)")
    p.add_argument("--curves", choices=CURVE_DATASETS,
                   help="data set of Fig. 6 and 7 (default: the first Table 2 data set chosen)")
    p.add_argument("--train", action="store_true", help="time the training of the trained methods (Fig. 5)")
    p.add_argument("--train-steps", type=int, default=50, help="training steps timed per method (default: %(default)s)")
    p.add_argument("--config", action="append", default=[], metavar="METHOD=JSON",
                   help='method settings, e.g. rome=\'{"v_steps": 25}\' (repeatable)')
    p.add_argument("--stats-corpus", default=str(DATA / "wikitext2_valid.txt"),
                   help="key-statistics corpus of the methods that use statistics (default: WikiText-2 validation, "
                        "as benchmarks/editing.py measured)")
    p.add_argument("--fluency-tokens", type=int, default=0,
                   help="greedy tokens per edit prompt for fluency (default: off)")
    p.add_argument("--no-greedy", action="store_true", help="teacher-forced metrics only")
    p.add_argument("--redo-not-applicable", action="store_true", help="retry cells recorded as not applicable")
    p.add_argument("--report-only", action="store_true", help="render the report from the recorded cells")
    p.add_argument("--model", default="smollm2-135m", help="profile name or .toml path (default: %(default)s)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", help="model dtype (default: the profile's)")
    p.add_argument("--threads", type=int, help="torch CPU threads (1 is faster on a busy 2-core machine)")
    p.add_argument("--data-dir", type=Path, default=DATA)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.n < 1:
        p.error("--n must be at least 1")
    for name in ("batch_sizes", "sequential_sizes"):
        sizes = getattr(args, name)
        if sizes is not None and min(sizes) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
        setattr(args, name, sizes or [k for k in DEFAULT_SIZES if k <= args.n])
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run the selected cells and render the report; returns {"ran", "skipped", "failed",
    "not_applicable": [cell keys]}."""
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    registered = list_editors()
    methods = args.methods or registered
    unknown = sorted(set(methods) - set(registered))
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; registered: {registered}")
    configs = parse_configs(args.config)
    for method in methods:
        config = configs.setdefault(method, {})
        if needs_stats(method, config) is not None and args.stats_corpus:
            config.setdefault("stats_corpus", args.stats_corpus)
        make_config(get_editor(method), config)  # refuse bad settings before loading anything
    cells_dir = args.out / "cells"
    outcome: dict[str, list[str]] = {"ran": [], "skipped": [], "failed": [], "not_applicable": []}
    if not args.report_only:
        run_cells(args, methods, configs, cells_dir, outcome)
    render(load_cells(cells_dir), registered, args.out)
    log.info("report: %s", args.out / "survey.md")
    return outcome


def check_records(cells: list[Cell], args) -> None:
    """Refuse, before any work, a curve size larger than its data file (CounterFact's has 829)."""
    need: dict[str, int] = {}
    for c in cells:
        if c.part in ("batch", "sequential"):
            need[c.data] = max(need.get(c.data, 0), cell_records(c, args.n))
    for data, k in need.items():
        path = args.data_dir / f"{data}.jsonl"
        with open(path, encoding="utf-8") as f:
            have = sum(1 for line in f if line.strip())
        if have < k:
            raise SystemExit(f"{path} has {have} records; Fig. 6/7 at size {k} need {k} "
                             f"(--curves counterfact_batch holds all of CounterFact)")


def run_cells(args, methods: list[str], configs: dict, cells_dir: Path, outcome: dict) -> None:
    from edit_serve.models import load_model
    from edit_serve.profiles import get_profile

    profile = get_profile(args.model)
    cells = plan(methods, args.datasets, args.parts, args.batch_sizes, args.sequential_sizes, args.train, args.curves)
    check_records(cells, args)
    lm = ctx = None
    digests = {}  # the trained editors' checkpoints, whose content is part of their cells' identity
    edits_with_editor = sorted({c.method for c in cells if c.part != "train" and trainable(c.method)})
    if edits_with_editor:  # the cached checkpoint is found by the model's fingerprint
        lm = load_model(profile, dtype=args.dtype, device=args.device)
        ctx = EditContext.from_loaded(lm)
        digests = {m: editor_digest(m, configs[m].get("editor"), ctx.fingerprint) for m in edits_with_editor}
    todo = []
    for cell in cells:
        editor = digests.get(cell.method) if cell.part != "train" else None
        ident = identity(cell, profile.name, args.n, configs[cell.method], args, editor)
        if recorded(cells_dir / f"{cell.key}.json", ident, args.redo_not_applicable):
            outcome["skipped"].append(cell.key)
        else:
            todo.append((cell, ident))
    log.info("%d cells: %d recorded already, %d to run", len(cells), len(outcome["skipped"]), len(todo))
    bar = tqdm(total=len(cells), initial=len(outcome["skipped"]), desc="survey", unit="cell")
    try:
        for cell, ident in todo:
            if lm is None:
                lm = load_model(profile, dtype=args.dtype, device=args.device)
                ctx = EditContext.from_loaded(lm)
            bar.set_postfix_str(cell.key)
            started = time.perf_counter()
            entry = {"key": cell.key, **dataclasses.asdict(cell), "identity": ident}
            try:
                if cell.method in digests and digests[cell.method] is None and cell.part != "train":
                    editor_file(cell.method, configs[cell.method].get("editor"), ctx.fingerprint, profile.name)
                entry.update(status="done", result=run_cell(lm, ctx, cell, configs[cell.method], args.n, args))
            except (EditError, NotImplementedError) as e:
                log.warning("%s: %s cannot run it: %s", cell.key, cell.method, one_line(e))
                entry.update(status="not_applicable", reason=one_line(e))
            except Exception as e:  # noqa: BLE001 - one broken cell must not stop the survey
                log.exception("%s failed", cell.key)
                entry.update(status="failed", reason=f"{type(e).__name__}: {one_line(e)}")
            entry.update(cell_seconds=time.perf_counter() - started, machine=machine(args.device),
                         recorded_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                         command=" ".join(["benchmarks/survey.py", *args.argv]))
            path = cells_dir / f"{cell.key}.json"
            # a cell done before, not done now: e.g. without the editor it used
            if entry["status"] != "done" and read_cell(path).get("status") == "done":
                log.warning("%s: kept its recorded figures (this run could not redo them)", cell.key)
            else:
                write_json(entry, path)
            outcome["ran" if entry["status"] == "done" else entry["status"]].append(cell.key)
            bar.update(1)
    finally:
        bar.close()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result = main()
    sys.exit(1 if result["failed"] else 0)
