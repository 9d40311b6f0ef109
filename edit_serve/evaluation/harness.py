"""The evaluation harness: edit a model record by record (or in batches, or sequentially) with
a registered method and score every record the survey's way.

Modes, all on one loaded model that is never reloaded (patches go on and off through the edit
context's `PatchStack`, which reverts exactly; patches already active on it stay, and every
edit is computed on top of them):
- single: each record is edited from the unedited model, scored, and reverted;
- batch: `batch_size` records make one patch, scored together, reverted;
- sequential: patches of `batch_size` records are applied one after another and never
  reverted in between; every record is scored at the end.
Locality always compares with the unedited model's predictions, measured before any edit.
Every metric is reported twice: teacher-forced (the survey's way, `reliability`, ...) and on the
free greedy answer (`reliability_greedy`, ...; measure.py says how), unless settings.greedy is off.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm

from editors.context import EditContext, EditJob, check_rephrasings, prepare
from editors.serac import router_of
from editors.trained import NETS, editor_digest
from edit_serve.evaluation import measure
from edit_serve.evaluation.checkpoint import Checkpoint
from edit_serve.evaluation.data import Record, requests_of
from edit_serve.evaluation.memory import EditMeter, host
from edit_serve.evaluation.metrics import mean
from edit_serve.evaluation.scoring import ScoreMemo, Scorer
from patches import Patch

log = logging.getLogger(__name__)

Mode = Literal["single", "batch", "sequential"]
SCORE_SLICE = 500  # records scored at once after a batch patch (checkpointed slice by slice)


@dataclass(frozen=True)
class EvalSettings:
    """How to run an evaluation (the method's own settings go in the editor config)."""

    mode: Mode = "single"
    batch_size: int = 1  # records per patch in batch and sequential modes
    fluency_tokens: int = 100  # greedy tokens generated per edit prompt for fluency; 0 skips it
    open_probe_tokens: int = 8  # continuation length scored by open locality probes
    score_batch_size: int = 32  # sequences per forward pass when scoring
    greedy: bool = True  # also score each metric on the free greedy answer (<metric>_greedy; measure.py)
    progress: bool = True

    def __post_init__(self):
        if self.mode not in ("single", "batch", "sequential"):
            raise ValueError(f"unknown mode {self.mode!r}; use single, batch or sequential")
        if self.batch_size < 1:
            raise ValueError(f"the batch size must be at least 1, got {self.batch_size}")
        if self.mode == "single" and self.batch_size != 1:
            raise ValueError("single mode edits one record per patch; use mode 'batch' for --batch")
        if self.fluency_tokens < 0 or self.open_probe_tokens < 1 or self.score_batch_size < 1:
            raise ValueError("fluency_tokens >= 0, open_probe_tokens >= 1 and score_batch_size >= 1 are required")


def summarize(rows: Sequence[Mapping]) -> dict[str, float | None]:
    """Mean of each metric (teacher-forced and greedy) over the records that have it."""
    return {m: mean(row.get(m) for row in rows) for m in (*measure.METRICS, *measure.GREEDY_METRICS)}


def _unedited(figures: Mapping) -> dict:
    """The unedited model's figures: locality is 1 by definition there, so it is left out."""
    return {k: v for k, v in figures.items() if k not in ("locality", "locality_greedy")}


def _describe(record: Record) -> list[str]:
    return [f"{r.text} -> {r.target_new}" for r in record.requests]


def as_context(target, args: Sequence) -> tuple[EditContext, Sequence]:
    """(ctx, the remaining arguments) from `ctx, ...` or the older `model, tokenizer, profile, ...`."""
    if isinstance(target, EditContext):
        return target, args
    tokenizer, profile, *rest = args
    return EditContext(target, tokenizer, profile), rest


class _Run:
    """What every evaluation shares: the context, the scorer and the model's reference
    predictions before the evaluation's edits."""

    def __init__(self, ctx: EditContext, job: EditJob, records: Sequence[Record], fluency_tokens: int,
                 open_probe_tokens: int = 8, score_batch_size: int = 32, measure_before: bool = True,
                 greedy: bool = False, checkpoint: Checkpoint | None = None, memo: ScoreMemo | None = None,
                 router=None):
        self.ctx, self.job, self.records, self.fluency_tokens = ctx, job, records, fluency_tokens
        self.greedy = greedy
        self.scorer = Scorer(ctx.model, ctx.tokenizer, score_batch_size, router=router or router_of(ctx),  # as served
                             memo=memo)
        self.applied: list[str] = []  # the patches this run applied, reverted at its end
        self.references = self.before = None
        ids = [r.id for r in records]
        if measure_before and (kept := checkpoint and checkpoint.unedited(ids)):
            log.info("the model before the edits: as measured by the interrupted run")
            self.references, self.before = kept
        elif measure_before:
            log.info("measuring the model before the edits on %d records", len(records))
            self.references = measure.reference(self.scorer, records, open_probe_tokens, greedy)
            self.before = measure.score(self.scorer, records, None, fluency_tokens, greedy)
            if checkpoint is not None:
                checkpoint.keep_unedited(ids, self.references, self.before)
        self.meter = EditMeter(next(ctx.model.parameters()).device)

    def edit(self, indices: Sequence[int]) -> Patch:
        """Compute one patch for the records at `indices` (timed and metered) and apply it."""
        requests = requests_of(self.records[i] for i in indices)
        job = dataclasses.replace(self.job, requests=tuple(requests))  # requests parsed with the records
        with self.meter.measure(len(requests)):
            patch = self.ctx.compute(job)
        self.meter.credit(self.ctx.resumed_seconds)
        self.apply(patch)
        return patch

    def apply(self, patch: Patch) -> None:
        self.ctx.stack.apply(patch)
        self.applied.append(patch.id)

    def revert(self, patch_id: str) -> None:
        self.ctx.stack.revert(patch_id)
        self.applied.remove(patch_id)

    def revert_all(self) -> None:
        for patch_id in reversed(list(self.applied)):
            self.revert(patch_id)

    def score(self, indices: Sequence[int]) -> list[dict]:
        """Score the records at `indices` under the current weights."""
        return measure.score(self.scorer, [self.records[i] for i in indices],
                             [self.references[i] for i in indices], self.fluency_tokens, self.greedy)


def _defaults(options) -> dict:
    """A dataclass's options with their defaults (those that have one)."""
    return {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
            for f in dataclasses.fields(options)
            if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}


def evaluation_job(method: str | EditJob, records: Sequence[Record], editor_config) -> EditJob:
    """The edit job of an evaluation, checked before any work: the method, its config, and
    every record's requests against what the method takes (each patch's job then takes its
    records' requests without checking them again)."""
    job = prepare(method, requests_of(records[:1]), editor_config)
    check_rephrasings(job.spec, requests_of(records))
    return job


def evaluate(target, *args, **kwargs) -> dict:
    """evaluate(ctx, method, records, editor_config=None, settings=EvalSettings(), checkpoint=None)
    (or with `model, tokenizer, profile` in place of `ctx`): edit and score `records` with
    `method`; the model is left as it was. Returns the result dict that `edit_serve eval`
    writes (summary figures, timing, memory and per-record rows). `checkpoint`: a folder where
    progress is recorded as it goes, so a rerun resumes (edit_serve.evaluation.checkpoint)."""
    ctx, args = as_context(target, args)
    return _evaluate(ctx, *args, **kwargs)


def _evaluate(ctx: EditContext, method: str, records: Sequence[Record], editor_config: Mapping | None = None,
              settings: EvalSettings = EvalSettings(), checkpoint: str | Path | None = None) -> dict:
    started = time.perf_counter()
    model, profile = ctx.model, ctx.profile
    job = evaluation_job(method, records, editor_config)
    sequential = settings.mode == "sequential"
    size = 1 if settings.mode == "single" else settings.batch_size
    groups = [list(range(i, min(i + size, len(records)))) for i in range(0, len(records), size)]
    ckpt = done = None
    if checkpoint is not None:
        identity = {"method": method, "config": dataclasses.asdict(job.config),
                    "settings": dataclasses.asdict(settings), "active": ctx.stack.ids}
        if method in NETS:  # a retrained editor's edits are not the earlier one's
            identity["editor"] = editor_digest(method, getattr(job.config, "editor", None), ctx.fingerprint)
        ckpt = Checkpoint(checkpoint, identity, {"config": _defaults(job.config), "settings": _defaults(settings)})
        done = ckpt.done([[records[i].id for i in group] for group in groups])
    run = _Run(ctx, job, records, settings.fluency_tokens, settings.open_probe_tokens, settings.score_batch_size,
               greedy=settings.greedy, checkpoint=ckpt)
    after: list[dict | None] = [None] * len(records)
    patch_of: dict[int, str] = {}
    seconds_of: dict[int, float] = {}
    here = host(next(model.parameters()).device)
    hosts = Counter()  # patches timed on each machine (a resumed run may be on another)
    config = None
    bar = tqdm(groups, desc=f"{method} {settings.mode}", unit="patch", disable=not settings.progress)
    parts, ctx.parts = ctx.parts, ckpt.parts if ckpt else None  # a patch of thousands resumes within itself
    kept_keys, ctx.keys = ctx.keys, ckpt.keys if ckpt and sequential else ctx.keys
    try:
        for g, group in enumerate(bar):
            ids = [records[i].id for i in group]
            if done and g in done:  # recorded by an earlier, interrupted run
                entry = done[g]
                if sequential:
                    run.apply(ckpt.patch(g))
                config = entry["config"]
                hosts[entry.get("host") or "not recorded"] += 1
                run.meter.recall(entry.get("peak_memory_bytes"))
                for k, i in enumerate(group):
                    patch_of[i], seconds_of[i] = entry["patch"], entry["seconds"][k]
                    if entry["after"] is not None:
                        after[i] = entry["after"][k]
                continue
            sliced = ckpt is not None and not sequential and len(group) > SCORE_SLICE  # its scoring resumes too
            if sliced and (kept := ckpt.pending(g, ids)):  # made by an interrupted run, partly scored
                patch, entry, scores = kept
                run.apply(patch)
                host_of, peak = entry["host"], entry["peak_memory_bytes"]
                run.meter.recall(peak)
                seconds = entry["seconds"]
            else:
                patch, scores = run.edit(group), []
                host_of, peak = here, run.meter.peaks[-1]
                edits = sum(len(records[i].requests) for i in group)
                seconds = [run.meter.seconds[-1] * len(records[i].requests) / edits for i in group]
                if sliced:
                    ckpt.begin(g, ids, patch, seconds, host_of, peak)
            config = patch.config
            hosts[host_of or "not recorded"] += 1
            for i, s in zip(group, seconds):
                patch_of[i], seconds_of[i] = patch.id, s
            if not sequential:
                for start in range(len(scores), len(group), SCORE_SLICE):
                    scores += run.score(group[start:start + SCORE_SLICE])
                    if sliced:
                        ckpt.scored(scores[start:])
                for i, s in zip(group, scores):
                    after[i] = s
                    log.info("%s: %s", records[i].id, ", ".join(f"{k} {v:.3f}" for k, v in s.items() if v is not None))
                run.revert(patch.id)
                bar.set_postfix(rel=f"{summarize([a for a in after if a])['reliability']:.2f}")
            if ckpt is not None:
                ckpt.add(g, ids, patch, seconds, None if sequential else scores, keep_patch=sequential, host=host_of,
                         peak=peak)
        if sequential:
            log.info("scoring %d records after %d sequential patches", len(records), len(groups))
            after = list(run.score(range(len(records))))
    finally:
        ctx.parts, ctx.keys = parts, kept_keys
        run.revert_all()
        bar.close()

    rows = []
    for i, record in enumerate(records):
        pre = _unedited(run.before[i])
        rows.append({"id": record.id, "requests": _describe(record), "patch": patch_of[i],
                     "edit_seconds": seconds_of[i], **after[i], "pre": pre})
    return {
        "method": method, "model": profile.name, "mode": settings.mode, "batch_size": size,
        "n": len(records), "patches": len(groups), "resumed_patches": len(done or {}),
        **summarize(rows),
        "pre": _unedited(summarize([r["pre"] for r in rows])),
        **run.meter.summary(),
        # over every record, those of resumed patches included
        "seconds_per_edit": sum(seconds_of.values()) / sum(len(r.requests) for r in records),
        "hosts": dict(hosts),  # {machine: patches it timed}: more than one when resumed elsewhere
        "device": str(next(model.parameters()).device), "torch_threads": torch.get_num_threads(),
        "editor_config": config, "settings": dataclasses.asdict(settings),
        "wall_seconds": time.perf_counter() - started,
        "rows": rows,
    }


def edit_with_eval(target, *args, **kwargs) -> Patch:
    """edit_with_eval(ctx, method, records, editor_config=None, with_eval=True, fluency_tokens=0,
    memo=None, router=None) (or with `model, tokenizer, profile` in place of `ctx`): one patch
    editing all requests of `records`, computed on top of the context's active patches,
    carrying in its `eval` metadata the figures measured on those records (unless `with_eval`
    is False). The model is left as it was. `memo`: answers remembered by weight state
    (scoring.ScoreMemo); `router`: the scope router to score through (by default the
    context's, `editors.serac.router_of`)."""
    ctx, args = as_context(target, args)
    return _edit_with_eval(ctx, *args, **kwargs)


def _edit_with_eval(ctx: EditContext, method: str | EditJob, records: Sequence[Record],
                    editor_config: Mapping | None = None, with_eval: bool = True, fluency_tokens: int = 0,
                    memo: ScoreMemo | None = None, router=None) -> Patch:
    job = method if isinstance(method, EditJob) else evaluation_job(method, records, editor_config)
    run = _Run(ctx, job, records, fluency_tokens, measure_before=with_eval, memo=memo, router=router)
    everything = range(len(records))
    try:
        patch = run.edit(everything)
        if not with_eval:
            return patch
        figures = summarize(run.score(everything))
    finally:
        run.revert_all()
    pre = summarize(run.before)
    evaluation = {k: v for k, v in figures.items() if v is not None}
    evaluation["pre"] = {k: v for k, v in _unedited(pre).items() if v is not None}
    evaluation.update(records=len(records), locality_probes=sum(len(r.pairs) for r in run.references),
                      seconds=run.meter.seconds[-1], model=ctx.profile.name)
    measured = patch.replace(eval=evaluation)  # another id: the keys the edit made follow it
    ctx.carry_keys(measured, [patch], drop=True)
    return measured
