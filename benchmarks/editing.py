"""Editing benchmark: the acceptance tables of issue 3, speed and memory per method, and the
time to compute key statistics.

    .venv/bin/python benchmarks/editing.py                       # everything (hours on 2 CPU cores)
    .venv/bin/python benchmarks/editing.py --suites quality --methods rome --n 20
    .venv/bin/python benchmarks/editing.py --suites timing --methods rome memit --device cuda \
        --random-model gpt-j-6b                                  # GPT-J-6B-sized random weights, on a GPU

Suites (run in this order, each piece saved as soon as it finishes):
- stats: key statistics computed from scratch (a temporary cache) for the layers each of the
  methods uses; the time includes sampling the corpus when the corpus is "model";
- quality: the evaluation harness (edit_serve.evaluation) on the first N records of each data
  set: MEMIT edits all N as one batch, every other method one record at a time;
- sequential: N ROME, T-Patcher, CaliNET and SERAC edits one after another, and N MEMIT and
  AlphaEdit edits in patches of 10, scored at the end;
- timing: seconds per edit and peak memory, the median of --runs runs, statistics cached (one
  untimed warm-up edit first); single-edit methods time the first --timing-n records, MEMIT one
  batch of the first --timing-batch records.
Each entry is merged by key into benchmarks/results/editing.json (the full result, per-record
rows included, goes to benchmarks/results/editing/<key>.json), then editing.md and editing.png
are rendered again from all entries, so the benchmark can run piecewise. `--variant NAME` files
the entries of a non-default --config under "<method>[NAME]"; `--resume` skips every cell
already recorded with the same command settings. Within a cell every finished patch is
recorded under editing/progress/<key>/ as it goes, so a rerun of an interrupted cell picks up
at the patch where it stopped (the folder is removed once the cell is recorded, except for a
sequential stream: a rerun with a larger --n extends it).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import fcntl
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import DATA  # noqa: E402
from editors import list_editors  # noqa: E402
from editors.base import get_editor, make_config  # noqa: E402
from editors.context import EditContext  # noqa: E402
from edit_serve.evaluation import (  # noqa: E402
    EditMeter, EvalSettings, evaluate, hold_out_paraphrases, read_records, requests_of, write_json,
)
from edit_serve.evaluation.memory import host  # noqa: E402
from edit_serve.models import DTYPES, load_model  # noqa: E402
from edit_serve.profiles import get_profile  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from editing_report import corpus_label, render  # noqa: E402

log = logging.getLogger("bench.editing")
METHODS = ["rome", "memit", "alphaedit", "ft", "ft-lora", "kn", "t-patcher", "calinet"]
BATCHED = {"memit", "alphaedit"}  # methods evaluated with all N records in one patch
SEQUENTIAL = {"rome": 1, "memit": 10, "alphaedit": 10, "t-patcher": 1, "calinet": 1,
              "serac": 1}  # records per patch (sequential suite)
SUITES = ["stats", "quality", "sequential", "timing"]


# --- results file ----------------------------------------------------------------------------


def code_state() -> dict:
    """The commit and the uncommitted editor and server files of the checkout."""
    try:
        git = ["git", "-C", str(ROOT)]
        commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        changed = subprocess.run([*git, "status", "--porcelain", "editors", "edit_serve"], capture_output=True,
                                 text=True, check=True).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):
        return {}
    return {"commit": commit, "uncommitted": sorted(line[3:] for line in changed if line.strip())}


#: the code this process runs: taken when it starts, since a run of hours records its figures
#: after the checkout may have moved on
CODE = code_state()


def machine(device: str) -> dict:
    info = {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
            "torch": torch.__version__, "device": device,
            "load_average": [round(x, 2) for x in os.getloadavg()],  # other work on the machine skews timings
            "host": host(device)}  # sessions draw different machines: a CPU without bfloat16 units is slower
    if device.startswith("cuda"):
        info["gpu"] = info["host"]
    return {**info, **CODE}


@contextlib.contextmanager
def locked(path: Path):
    """An exclusive lock for read-modify-write of `path` by concurrent benchmark processes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    name = "edit-serve-" + str(path.resolve()).replace(os.sep, "_") + ".lock"
    with open(Path(tempfile.gettempdir()) / name, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def record(out: Path, key: str, entry: dict, full: dict | None = None) -> None:
    """Merge one entry into editing.json (and its full result into editing/<key>.json); re-render."""
    entry = {**entry, "recorded_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
             "command": " ".join(sys.argv)}
    if full is not None:
        entry["full_result"] = f"editing/{key.replace('/', '__')}.json"
        write_json(full, out / entry["full_result"])
    summary = out / "editing.json"
    with locked(summary):
        entries = json.loads(summary.read_text()) if summary.is_file() else {}
        entries[key] = entry
        write_json(dict(sorted(entries.items())), summary)
        render(entries, out / "editing.md", out / "editing.png")
    log.info("recorded %s", key)


def machines_line(rows: dict) -> str:
    """The machines a results file's rows were recorded on, one line for its markdown table."""
    machines = {r["machine"]["host"] + f", {r['machine']['torch_threads']} threads" for r in rows.values()}
    return "Machines: " + "; ".join(sorted(machines)) + "."


class Rows:
    """A small benchmark's results file: {"rows": {key: row}}, written as each row finishes; a
    rerun skips a row recorded with the same settings (apply_scaling, null_capacity,
    cancel_latency)."""

    def __init__(self, path: Path, command: str):
        self.path, self.command = path, command
        self.data = json.loads(path.read_text()) if path.exists() else {"rows": {}}

    @classmethod
    def from_cli(cls, p: argparse.ArgumentParser, argv: list[str] | None, script: str, file: str
                 ) -> tuple[argparse.Namespace, "Rows"]:
        """The start such a benchmark shares: --model, --threads and --out added to `p`, the
        arguments parsed, logging and torch's threads set, and its results `file` under --out."""
        p.add_argument("--model", default="smollm2-135m")
        p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's)")
        p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
        args = p.parse_args(argv)
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        if args.threads:
            torch.set_num_threads(args.threads)
        return args, cls(args.out / file,
                         f"benchmarks/{script} " + " ".join(argv if argv is not None else sys.argv[1:]))

    def done(self, key: str, settings: dict) -> bool:
        row = self.data["rows"].get(key)
        return row is not None and all(row.get(k) == v for k, v in settings.items())

    def add(self, key: str, row: dict, settings: dict, device: str = "cpu") -> None:
        self.data["rows"][key] = {**row, **settings, "machine": machine(device),
                                  "recorded_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                  "command": self.command}
        write_json(self.data, self.path)


# --- models ----------------------------------------------------------------------------------


def random_model(profile_name: str, overrides: dict, device: str, dtype: str | None, tokenizer_dir: Path | None = None):
    """A randomly initialized model of the profile's architecture (the config class's defaults,
    e.g. GPT-J-6B for GPTJConfig) with the SmolLM2 tokenizer (from `tokenizer_dir` if given, so
    that a machine without the model package can run it); for timing only."""
    import transformers
    from transformers import AutoTokenizer

    from edit_serve.models import LoadedModel, weights_location

    base = get_profile(profile_name)
    cls = getattr(transformers, base.architecture)
    config = cls.config_class(**overrides)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir or weights_location(get_profile("smollm2-135m")),
                                              local_files_only=True)
    if len(tokenizer) > config.vocab_size:
        raise SystemExit(f"the stand-in tokenizer has {len(tokenizer)} tokens; "
                         f"the random model only {config.vocab_size}")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(0)
    started = time.perf_counter()
    with torch.device(device):
        model = cls._from_config(config, dtype=DTYPES[dtype or base.dtype])
    model.eval().requires_grad_(False)
    log.info("random %s (%.2f B parameters) built in %.0f s", base.architecture,
             sum(p.numel() for p in model.parameters()) / 1e9, time.perf_counter() - started)
    profile = base.with_weights(f"random:{base.architecture}", num_layers=config.num_hidden_layers)
    profile = profile.model_copy(update={"name": f"random-{base.name}"})
    return LoadedModel(model=model, tokenizer=tokenizer, profile=profile, location="random")


# --- suites ----------------------------------------------------------------------------------


def needs_stats(method: str, config: dict) -> object | None:
    """The method's config when it uses key statistics, else None."""
    from editors.stats import StatsSettings

    cfg = make_config(get_editor(method), config)
    return cfg if isinstance(cfg, StatsSettings) and cfg.uses_stats() else None


def prepare_stats(model, lm, method: str, config: dict) -> list[int]:
    """Compute (or find in the cache) the key statistics `method` needs; returns its layers."""
    from editors.common import method_layers
    from editors.stats import precompute_stats
    from editors.trained import TrainedEditConfig, editor_layers

    cfg = needs_stats(method, config)
    if cfg is None:
        return []
    layers = (editor_layers if isinstance(cfg, TrainedEditConfig) else method_layers)(lm.profile, method, cfg.layers)
    precompute_stats(model, lm.tokenizer, lm.profile, layers, corpus=cfg.stats_corpus, n=cfg.stats_samples,
                     length=cfg.stats_length)
    return layers


def run_stats(lm, method: str, config: dict, out: Path, device: str) -> None:
    """Statistics from scratch: an empty temporary cache and a fresh copy of the model (the
    editors keep statistics in memory per model object)."""
    cfg = needs_stats(method, config)
    if cfg is None:
        log.info("%s uses no key statistics", method)
        return
    previous = os.environ.get("EDIT_SERVE_CACHE")
    with tempfile.TemporaryDirectory(prefix="edit-serve-stats-") as tmp:
        os.environ["EDIT_SERVE_CACHE"] = tmp
        try:
            fresh = copy.deepcopy(lm.model)
            started = time.perf_counter()
            layers = prepare_stats(fresh, lm, method, config)
            seconds = time.perf_counter() - started
            del fresh
        finally:
            if previous is None:
                os.environ.pop("EDIT_SERVE_CACHE", None)
            else:
                os.environ["EDIT_SERVE_CACHE"] = previous
    corpus = corpus_label(cfg.stats_corpus).replace("/", "-")  # a hub name may hold a slash
    record(out, f"stats/{lm.profile.name}/{device}/{method}/{corpus}", {
        "suite": "stats", "model": lm.profile.name, "method": method, "layers": layers, "corpus": cfg.stats_corpus,
        "samples": cfg.stats_samples, "length": cfg.stats_length, "seconds": seconds, "machine": machine(device)})


def done(out: Path, key: str, method: str, config: dict, n: int | None = None) -> bool:
    """Whether the cell `key` is already recorded with the same editor settings (the method's
    config as `config` resolves it, so a changed default counts) and, where given, `n` records."""
    summary = out / "editing.json"
    entry = json.loads(summary.read_text()).get(key) if summary.is_file() else None
    if entry is None:
        return False
    resolved = json.loads(json.dumps(dataclasses.asdict(make_config(get_editor(method), config))))
    recorded = entry.get("editor_config") or entry.get("config") or {}
    same = all(recorded.get(k) == v for k, v in resolved.items()) and (n is None or entry.get("n") == n)
    if same:
        log.info("%s is recorded already (--resume): skipped", key)
    return same


def run_quality(lm, method: str, config: dict, data: Path, n: int, out: Path, device: str, fluency: int,
                sequential: bool, label: str | None = None, per_patch: int | None = None, resume: bool = False,
                held_out: tuple[int, bool, bool] = (0, False, False)) -> None:
    """One quality or sequential cell. `held_out` (k, fit, score_taken): generality on the
    paraphrases after each record's first k (or on those k), the edit fitted to those k or not
    (evaluation.hold_out_paraphrases)."""
    label = label or method
    if sequential:
        settings = EvalSettings(mode="sequential", batch_size=per_patch or SEQUENTIAL[method], fluency_tokens=fluency)
    elif method in BATCHED:
        settings = EvalSettings(mode="batch", batch_size=n, fluency_tokens=fluency)
    else:
        settings = EvalSettings(mode="single", fluency_tokens=fluency)
    records = read_records(data, n)
    if held_out[0]:
        records = hold_out_paraphrases(records, *held_out)
    if settings.mode == "batch":
        settings = dataclasses.replace(settings, batch_size=len(records))
    suite = "sequential" if sequential else "quality"
    key = f"{suite}/{data.stem}/{lm.profile.name}/{label}/{settings.mode}-{settings.batch_size}"
    if resume and done(out, key, method, config, len(records)):
        return
    prepare_stats(lm.model, lm, method, config)  # so the first edit does not pay for them
    progress = out / "editing" / "progress" / key.replace("/", "__")  # resumed by a rerun
    result = {"data": data.name, **evaluate(EditContext.from_loaded(lm), method, records, config, settings,
                                            checkpoint=progress)}
    result["method"] = label
    if held_out[0]:
        result["paraphrases_held_out"] = dict(zip(("first", "fitted", "scored_on_those"), held_out))
    entry = {"suite": suite, **{k: v for k, v in result.items() if k != "rows"}, "machine": machine(device)}
    record(out, key, entry, result)
    if not sequential:  # a sequential stream's patches stay, so a longer stream (--n) extends it
        shutil.rmtree(progress, ignore_errors=True)


def run_timing(lm, method: str, config: dict, data: Path, n_single: int, n_batch: int, runs: int, out: Path,
               device: str, label: str | None = None, resume: bool = False) -> None:
    key = f"timing/{lm.profile.name}/{device}/{label or method}"
    if resume and done(out, key, method, config):
        return
    ctx = EditContext.from_loaded(lm)
    records = read_records(data, n_batch if method in BATCHED else n_single)
    groups = [records] if method in BATCHED else [[r] for r in records]
    log.info("%s: statistics and a warm-up edit (not timed)", method)
    prepare_stats(lm.model, lm, method, config)
    ctx.compute(method, requests_of(records[:1]), config)
    per_run = []
    for run in range(runs):
        meter = EditMeter(next(lm.model.parameters()).device)
        for group in groups:
            requests = requests_of(group)
            with meter.measure(len(requests)):
                ctx.compute(method, requests, config)
        per_run.append(meter.summary())
        log.info("%s timing run %d/%d: %.2f s per edit, peak %.0f MiB", method, run + 1, runs,
                 meter.seconds_per_edit, meter.peak_bytes / 2**20)
    record(out, key, {
        "suite": "timing", "model": lm.profile.name, "method": label or method, "data": data.name,
        "records_per_run": len(records), "edits_per_patch": len(groups[0]), "runs": runs,
        "seconds_per_edit": statistics.median(r["seconds_per_edit"] for r in per_run),
        "peak_memory_bytes": statistics.median(r["peak_memory_bytes"] for r in per_run),
        "baseline_memory_bytes": per_run[0]["baseline_memory_bytes"],
        "peak_memory_kind": per_run[0]["peak_memory_kind"],
        "per_run": per_run, "config": config, "machine": machine(device),
        "parameters": sum(p.numel() for p in lm.model.parameters()),
    })


# --- command line ----------------------------------------------------------------------------


def parse_configs(items: list[str]) -> dict[str, dict]:
    configs: dict[str, dict] = {}
    for item in items:
        method, _, text = item.partition("=")
        try:
            configs[method] = json.loads(text)
        except json.JSONDecodeError as e:
            raise SystemExit(f"--config {item!r}: not valid JSON ({e.msg})") from None
    return configs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--suites", nargs="+", choices=SUITES, default=SUITES)
    p.add_argument("--methods", nargs="+", default=METHODS, help="(default: %(default)s)")
    p.add_argument("--datasets", nargs="+", default=["counterfact", "zsre"],
                   help="data sets (files <name>.jsonl in the shared data folder) for the quality suite")
    p.add_argument("--sequential-datasets", nargs="+", default=["counterfact"],
                   help="data sets for the sequential suite")
    p.add_argument("--n", type=int, default=100, help="records per quality/sequential run (default: %(default)s)")
    p.add_argument("--runs", type=int, default=3, help="timing runs per method; the median is reported")
    p.add_argument("--timing-n", type=int, default=10, help="records per timing run of single-edit methods")
    p.add_argument("--timing-batch", type=int, default=100, help="records in the one MEMIT batch of a timing run")
    p.add_argument("--fluency-tokens", type=int, default=100, help="greedy tokens per edit prompt for fluency")
    p.add_argument("--config", action="append", default=[], metavar="METHOD=JSON",
                   help='method settings, e.g. rome=\'{"v_steps": 25}\' (repeatable)')
    p.add_argument("--stats-corpus", help="key-statistics corpus for methods that use statistics (default: theirs)")
    p.add_argument("--stats-samples", type=int, help="key-statistics sample count (default: the methods')")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="model dtype (default: the profile's)")
    p.add_argument("--random-model", metavar="PROFILE",
                   help="time a randomly initialized model of this profile's architecture at its config class's "
                        "default size (gpt-j-6b: GPTJConfig(), 6B parameters); stats and timing suites only")
    p.add_argument("--random-config", default="{}", metavar="JSON", help="overrides for the random model's config")
    p.add_argument("--tokenizer", type=Path, metavar="DIR",
                   help="with --random-model: a folder holding SmolLM2's tokenizer files (default: the converted "
                        "model's; benchmarks/gpu_timing.sh carries them to a machine without the model package)")
    p.add_argument("--variant", help="file the entries under '<method>[VARIANT]' (for a non-default --config)")
    p.add_argument("--sequential-per-patch", type=int, help="records per patch in the sequential suite "
                   "(default: rome 1, memit and alphaedit 10)")
    split = p.add_mutually_exclusive_group()
    split.add_argument("--rephrasings", type=int, default=0, metavar="K",
                       help="fit each edit to its record's first K paraphrases too (EditRequest.rephrasings) and "
                            "score generality on the others (use with --variant)")
    split.add_argument("--hold-out", type=int, default=0, metavar="K",
                       help="score generality on the paraphrases after each record's first K, fitting none: "
                            "--rephrasings K's baseline (use with --variant)")
    p.add_argument("--score-fitted", action="store_true",
                   help="with --rephrasings or --hold-out K: score generality on those K paraphrases instead")
    p.add_argument("--resume", action="store_true", help="skip cells already recorded with the same settings")
    p.add_argument("--threads", type=int,
                   help="torch CPU threads (default: torch's; 1 can be faster on a busy machine)")
    p.add_argument("--data-dir", type=Path, default=DATA)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)

    unknown = sorted(set(args.methods) - set(list_editors()))
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; registered: {list_editors()}")
    configs = parse_configs(args.config)
    for method in args.methods:
        config = configs.setdefault(method, {})
        if needs_stats(method, config) is not None:
            if args.stats_corpus:
                config.setdefault("stats_corpus", args.stats_corpus)
            if args.stats_samples:
                config.setdefault("stats_samples", args.stats_samples)
        make_config(get_editor(method), config)  # refuse bad settings before loading anything
    if args.random_model:
        if set(args.suites) - {"stats", "timing"}:
            raise SystemExit("--random-model measures speed only: use --suites stats timing")
        lm = random_model(args.random_model, json.loads(args.random_config), args.device, args.dtype, args.tokenizer)
    else:
        lm = load_model(get_profile(args.model), dtype=args.dtype, device=args.device)

    for suite in [s for s in SUITES if s in args.suites]:
        for method in args.methods:
            config = configs[method]
            label = f"{method}[{args.variant}]" if args.variant else method
            if suite == "stats":
                run_stats(lm, method, config, args.out, args.device)
            elif suite == "timing":
                run_timing(lm, method, config, args.data_dir / "counterfact.jsonl", args.timing_n, args.timing_batch,
                           args.runs, args.out, args.device, label, args.resume)
            elif suite == "sequential" and method not in SEQUENTIAL:
                log.warning("the sequential suite does not run %s (it runs %s)", method, ", ".join(SEQUENTIAL))
                continue
            else:
                names = args.sequential_datasets if suite == "sequential" else args.datasets
                for name in names:
                    run_quality(lm, method, config, args.data_dir / f"{name}.jsonl", args.n, args.out, args.device,
                                args.fluency_tokens, sequential=suite == "sequential", label=label,
                                per_patch=args.sequential_per_patch, resume=args.resume,
                                held_out=(args.rephrasings or args.hold_out, bool(args.rephrasings),
                                          args.score_fitted))


if __name__ == "__main__":
    main()
