"""Live probes: do the active edits still hold, and are unrelated facts untouched?

Two ratios, measured on the serving engine through its normal generate path (greedy, a few
tokens each, batched), so a probe run interleaves with traffic between forward passes:
- edit retention: the share of active edit requests whose `target_new` is still the greedy
  continuation of their prompt;
- locality: the share of a probe set of unrelated prompts whose greedy next token is the one
  the unedited model predicted. A probe prompt that names the subject of an active edit is not
  unrelated to it (the README's first edit moves "The Eiffel Tower is located in the city of",
  one of the default probes, on purpose): it is left out of the ratio while that edit is
  active, and counted as `about_edits`.

A run measures at most `edits_per_run` edit requests: with more active, runs take turns
through them (the requests never measured first, newest patch first), and retention counts each
active request's latest result, so a run's cost stays bounded however many edits pile up (a
thousand SERAC edits take minutes of CPU to measure all at once); and a timed run waits at least
four times as long as the last one took, so timed runs take at most a fifth of the engine's time
(a change still starts one at once).

A report also names what moved: the counted probe prompts whose answer changed (`moved`) and
the edit requests whose target is no longer the answer (`not_held`), the first `SHOWN` of each.

The probe set is measured on the unedited model at start-up (before the patch log is
replayed). By default it is built from a pool of generic factual prompts generated here,
keeping those the model answers with the highest top-1 probability; a JSONL file of prompts
(`{"prompt": "..."}` per line) replaces the pool. Runs happen after every apply and revert and
every `interval_s` seconds; a run whose requests saw a patch-set version other than the one
active at its end is discarded (a newer run is already due), and so is a run that took its edit
requests from a record of the active patches that differs from the engine's (a change the
engine has made and its service has not recorded yet: the run that change triggers follows).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from edit_serve.config import ProbeConfig
from edit_serve.engines.base import Engine, GenerationRequest, SamplingParams, Started, TextDelta
from edit_serve.metrics import Metrics
from patches import Patch

log = logging.getLogger(__name__)

#: how many moved probe prompts and edits not held a report lists (its ratios count them all)
SHOWN = 50
#: the most of the time the timed probe runs take: the next waits at least 1/MAX_SHARE - 1 times the last
MAX_SHARE = 0.2


class ProbeSetError(ValueError):
    """A probe-set file that cannot be used. One-line message."""


# --- the default pool: generic factual prompts, generated from templates --------------------

COUNTRIES = [  # (country, capital, nationality adjective)
    ("France", "Paris", "French"), ("Germany", "Berlin", "German"), ("Italy", "Rome", "Italian"),
    ("Spain", "Madrid", "Spanish"), ("Japan", "Tokyo", "Japanese"), ("China", "Beijing", "Chinese"),
    ("Russia", "Moscow", "Russian"), ("Egypt", "Cairo", "Egyptian"), ("Greece", "Athens", "Greek"),
    ("Portugal", "Lisbon", "Portuguese"), ("Poland", "Warsaw", "Polish"), ("Sweden", "Stockholm", "Swedish"),
    ("Norway", "Oslo", "Norwegian"), ("the Netherlands", "Amsterdam", "Dutch"), ("Finland", "Helsinki", "Finnish"),
    ("Denmark", "Copenhagen", "Danish"), ("Austria", "Vienna", "Austrian"), ("Hungary", "Budapest", "Hungarian"),
]
COUNTRY_TEMPLATES = [
    "The capital of {country} is",
    "The official language of {country} is",
    "{capital} is the capital of",
    "The {adjective} capital is",
]
GENERAL_PROMPTS = [
    "The Eiffel Tower is located in the city of",
    "The Colosseum is located in the city of",
    "The Statue of Liberty is located in",
    "The chemical symbol for gold is",
    "The largest planet in the solar system is",
    "The first president of the United States was George",
    "Romeo and Juliet was written by William",
    "The theory of relativity was developed by Albert",
    "Water freezes at a temperature of",
    "The sun rises in the",
    "Monday, Tuesday, Wednesday,",
    "January, February, March,",
    "One, two, three, four,",
    "The opposite of hot is",
]


def default_pool(subjects: Iterable[str] = ()) -> list[str]:
    """The candidate prompts of the default probe set (unrelated, generic facts), without those
    that name any of `subjects` (see `about`): the locality set of edits of those subjects."""
    pool = [t.format(country=c, capital=cap, adjective=adj) for c, cap, adj in COUNTRIES for t in COUNTRY_TEMPLATES]
    related = about(subjects)
    return [p for p in pool + GENERAL_PROMPTS if not related(p)]


def read_probe_file(path: str | Path) -> list[str]:
    """Prompts from a JSONL file, one `{"prompt": "..."}` object per line (blank lines skipped)."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise ProbeSetError(f"cannot read the probe set {path}: {e.strerror or e}") from None
    prompts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ProbeSetError(f"{path} line {number}: not JSON ({e.msg})") from None
        prompt = record.get("prompt") if isinstance(record, dict) else None
        if not isinstance(prompt, str) or not prompt.strip():
            raise ProbeSetError(f'{path} line {number}: expected an object with a non-empty "prompt" string')
        prompts.append(prompt)
    if not prompts:
        raise ProbeSetError(f"the probe set {path} holds no prompts")
    return prompts


# --- which probes an edit is about -------------------------------------------------------------


def subjects_of(patches: Iterable[Patch]) -> list[str]:
    """The subjects of the edit requests that `patches` carry (requests without one skipped)."""
    return [r["subject"] for p in patches for r in p.requests
            if isinstance(r, Mapping) and isinstance(r.get("subject"), str)]


def about(subjects: Iterable[str]) -> Callable[[str], bool]:
    """A test of whether a prompt names any of `subjects` (as whole words, case ignored): such a
    prompt asks about an edited subject, so a change of its answer is no loss of locality.
    Subjects shorter than two characters are ignored (they would match almost anything)."""
    names = sorted({s.strip() for s in subjects if len(s.strip()) >= 2}, key=len, reverse=True)
    if not names:
        return lambda text: False
    pattern = re.compile(r"(?<!\w)(?:" + "|".join(map(re.escape, names)) + r")(?!\w)", re.IGNORECASE)
    return lambda text: pattern.search(text) is not None


# --- measuring ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    """A prompt and the token ids its greedy continuation must start with."""

    prompt_ids: tuple[int, ...]
    expected: tuple[int, ...]


@dataclass(frozen=True)
class ProbeReport:
    """The outcome of one probe run, measured under one patch-set version."""

    version: str
    locality: float | None  # None: no probe prompts (or every one names an edited subject)
    retention: float | None  # None: no active edit requests
    per_patch: dict[str, float | None] = field(default_factory=dict)
    prompts: int = 0  # the probe prompts the locality ratio counts
    edits: int = 0
    at: float = 0.0
    seconds: float = 0.0
    about_edits: int = 0  # probe prompts left out: they name the subject of an active edit
    replica: str | None = None  # on Ray Serve: the replica whose run this is
    edits_measured: int = 0  # edit requests this run measured (`edits` counts each active one's latest result)
    edits_active: int = 0  # active edit requests (those not measured yet are in neither count)
    moved: list[dict] = field(default_factory=list)  # counted probe prompts whose answer changed (the first SHOWN)
    not_held: list[dict] = field(default_factory=list)  # active edit requests whose target is not the answer (SHOWN)

    def to_dict(self) -> dict:
        d = {"version": self.version, "locality_ratio": self.locality, "edit_retention_ratio": self.retention,
             "prompts": self.prompts, "about_edits": self.about_edits, "edits": self.edits, "at": self.at,
             "seconds": round(self.seconds, 4), "edits_measured": self.edits_measured,
             "edits_active": self.edits_active, "moved": self.moved, "not_held": self.not_held}
        return d if self.replica is None else {**d, "replica": self.replica}


def edit_probes(tokenizer, patch: Patch) -> list[Probe]:
    """One probe per edit request of `patch` (requests without a prompt and target are skipped)."""
    from editors.base import EditError, EditRequest
    from editors.lm import prompt_ids, target_ids  # the harness's tokenization of a prompt and its target

    probes = []
    for r in patch.requests:
        try:
            request = EditRequest.from_dict(r)
            prompt = request.text
            expected = target_ids(tokenizer, prompt, request.target_new)
        except (EditError, TypeError, AttributeError, ValueError):  # not an edit request, or a target with no tokens
            continue
        probes.append(Probe(tuple(prompt_ids(tokenizer, prompt)), tuple(expected)))
    return probes


async def greedy(engine: Engine, prompts: Sequence[Sequence[int]], lengths: Sequence[int],
                 batch_size: int) -> tuple[list[tuple[int, ...]], set[str]]:
    """Greedy continuations (exactly `lengths[i]` tokens each) through the engine's generate
    path, `batch_size` prompts per group, and the patch-set versions they ran under. The groups
    go one after another: a change that waits for the requests in flight to be admitted (the
    scoped engine's memory changes) waits for one group, not for a whole run queued at once."""
    outputs: list[list[int]] = [[] for _ in prompts]
    versions: set[str] = set()

    async def group(start: int) -> None:
        requests = [GenerationRequest(f"probe-{uuid.uuid4().hex}", list(prompts[i]),
                                      SamplingParams(max_tokens=lengths[i], temperature=0.0, ignore_eos=True))
                    for i in range(start, min(start + batch_size, len(prompts)))]
        async for index, event in engine.generate(requests):
            if isinstance(event, Started):
                versions.add(event.version)
            elif isinstance(event, TextDelta):
                outputs[start + index].extend(event.token_ids)

    for start in range(0, len(prompts), batch_size):
        await group(start)
    return [tuple(o) for o in outputs], versions


class ProbeRunner:
    """Owns the probe set and runs probes after changes and on a timer."""

    def __init__(self, engine: Engine, config: ProbeConfig, active: Callable[[], list[Patch]],
                 metrics: Metrics | None = None, prompts: list[str] | None = None):
        """`prompts`: the locality probe prompts (`read_probe_file`); None builds the default set."""
        self.engine, self.config, self.active, self.metrics = engine, config, active, metrics
        self.prompts = prompts
        self.probes: list[Probe] = []
        self.texts: list[str] = []  # the probes' prompts as text (what `about` matches)
        self.last: ProbeReport | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._edit_cache: dict[str, list[Probe]] = {}
        self._results: dict[tuple[str, int], tuple[int, ...]] = {}  # (patch id, request) -> its latest answer
        self._turn = 0  # where the next run's turn through the measured edits starts
        self._counted_for: tuple[tuple[str, ...] | None, list[bool]] = (None, [])

    async def prepare(self) -> None:
        """Measure the probe set on the unedited model (call before the patch log is replayed)."""
        if self.engine.active:
            log.warning("the probe set is measured on a model with %d active patches; locality is relative to "
                        "that model, not the unedited one", len(self.engine.active))
        started = time.perf_counter()
        tok = self.engine.tokenizer
        candidates = self.prompts or default_pool()
        ids = [tuple(tok(p, add_special_tokens=True).input_ids) for p in candidates]
        if self.prompts is None:
            ids = await self._confident(ids)
        answers, _ = await greedy(self.engine, ids, [1] * len(ids), self.config.batch_size)
        self.probes = [Probe(p, a) for p, a in zip(ids, answers)]
        self.texts = [tok.decode(list(p), skip_special_tokens=True) for p in ids]
        self._counted_for = (None, [])
        log.info("probe set: %d prompts (%s) measured in %.1f s", len(self.probes),
                 "probe-set file" if self.prompts else "default pool",
                 time.perf_counter() - started)

    async def _confident(self, ids: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
        """The `size` prompts the model answers with the highest top-1 probability, among those
        at or above `min_confidence`."""
        try:
            scored = []
            for start in range(0, len(ids), self.config.batch_size):
                chunk = [list(p) for p in ids[start:start + self.config.batch_size]]
                scored += await self.engine.top_tokens(chunk)
        except NotImplementedError as e:
            log.warning("%s; the default probe set takes the first %d pool prompts unfiltered", e, self.config.size)
            return ids[:self.config.size]
        ranked = sorted(zip((p for _, p in scored), ids), key=lambda x: -x[0])
        kept = [p for prob, p in ranked if prob >= self.config.min_confidence][:self.config.size]
        if len(kept) < self.config.size:
            log.warning("only %d pool prompts reach top-1 probability %.2f (wanted %d)",
                        len(kept), self.config.min_confidence, self.config.size)
        return kept

    # --- runs -------------------------------------------------------------------------------
    def _edits(self, active: Sequence[Patch]) -> list[tuple[tuple[str, int], Probe]]:
        """The active edit requests' probes, in apply order, each keyed by (patch id, index)."""
        out = []
        for patch in active:
            if patch.id not in self._edit_cache:
                self._edit_cache[patch.id] = edit_probes(self.engine.tokenizer, patch)
            out += [((patch.id, j), probe) for j, probe in enumerate(self._edit_cache[patch.id])]
        return out

    def _this_run(self, keys: Sequence[tuple[str, int]]) -> list[int]:
        """Which edits this run measures: all of them when they fit in `edits_per_run`; else
        those never measured (the newest first), then a turn through the others."""
        limit = self.config.edits_per_run
        if len(keys) <= limit:
            return list(range(len(keys)))
        new = [i for i, k in enumerate(keys) if k not in self._results][::-1][:limit]
        seen = [i for i, k in enumerate(keys) if k in self._results]
        start = self._turn % len(seen) if seen else 0
        turn = (seen[start:] + seen[:start])[:limit - len(new)]
        self._turn = start + len(turn)
        return new + turn

    def _counted(self, active: Sequence[Patch]) -> list[bool]:
        """Per probe prompt: whether locality counts it (it names no active edit's subject)."""
        key = tuple(p.id for p in active)
        if self._counted_for[0] != key:
            related = about(subjects_of(active))
            counted = [not related(t) for t in self.texts]
            if self.texts and sum(counted) < len(counted) / 2:
                log.warning("%d of %d probe prompts name the subject of an active edit and are not counted; a "
                            "probe-set file (--probe-set) about other subjects keeps locality measured",
                            len(counted) - sum(counted), len(counted))
            self._counted_for = (key, counted)
        return self._counted_for[1]

    async def run_once(self) -> ProbeReport | None:
        """One probe run; publishes and returns its report, or None if the patch set changed
        while it ran."""
        started = time.perf_counter()
        active = self.active()
        edits = self._edits(active)
        counted = await asyncio.to_thread(self._counted, active)  # thousands of subjects: not on the event loop
        chosen = self._this_run([k for k, _ in edits])
        probes = self.probes + [edits[i][1] for i in chosen]
        outputs, versions = await greedy(self.engine, [p.prompt_ids for p in probes],
                                         [len(p.expected) for p in probes], self.config.batch_size)
        version = self.engine.version
        if versions - {version}:
            log.debug("probe run saw versions %s while %s became active; discarded", versions, version)
            return None
        if {a.id for a in self.engine.active} != {p.id for p in active}:  # a change between the engine and its record
            log.debug("probe run on %s measured the edits of another patch set; discarded", version)
            return None
        n = len(self.probes)
        live = {k for k, _ in edits}
        self._results = {k: v for k, v in self._results.items() if k in live}
        self._results.update((edits[i][0], out) for i, out in zip(chosen, outputs[n:]))
        held = {k: self._results[k] == p.expected for k, p in edits if k in self._results}  # each edit's latest
        local = [out == p.expected for out, p, c in zip(outputs, self.probes, counted) if c]
        by_patch: dict[str, list[bool]] = {pid: [] for (pid, _), _ in edits}  # one pass: thousands of patches
        for (pid, _), h in held.items():
            by_patch[pid].append(h)
        per_patch = {pid: _share(flags) for pid, flags in by_patch.items()}
        decode = self.engine.tokenizer.decode
        answer = lambda ids: decode(list(ids))  # noqa: E731 - an end-of-text answer shows as such
        changed = [i for i, (p, out, c) in enumerate(zip(self.probes, outputs, counted)) if c and out != p.expected]
        moved = [{"prompt": self.texts[i], "before": answer(self.probes[i].expected), "now": answer(outputs[i])}
                 for i in changed[:SHOWN]]  # decoded: only those listed
        lost = [(k, p) for k, p in edits if held.get(k) is False][:SHOWN]
        not_held = [{"patch": k[0], "prompt": decode(list(p.prompt_ids), skip_special_tokens=True),
                     "target": answer(p.expected), "now": answer(self._results[k])} for k, p in lost]
        report = ProbeReport(version, _share(local), _share(list(held.values())), per_patch, len(local), len(held),
                             time.time(), time.perf_counter() - started, n - len(local),
                             moved=moved, not_held=not_held, edits_measured=len(chosen),
                             edits_active=len(edits))
        self._edit_cache = {pid: v for pid, v in self._edit_cache.items() if pid in per_patch}
        self.last = report
        if self.metrics is not None:
            self.metrics.set_probes(report.locality, report.retention, report.prompts)
        log.debug("probes on %s: locality %s, retention %s (%.2f s)", version, report.locality, report.retention,
                  report.seconds)
        return report

    def trigger(self) -> None:
        """Run the probes as soon as possible (after an apply or revert)."""
        self._wake.set()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="probes")
            self.trigger()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _loop(self) -> None:
        pause = self.config.interval_s or None
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=pause)
            except TimeoutError:
                pass
            self._wake.clear()
            started = time.perf_counter()
            try:
                await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a failed probe run must not stop the loop
                log.exception("probe run failed")
            if self.config.interval_s:  # timed runs take at most MAX_SHARE of the time; changes still wake it
                pause = max(self.config.interval_s, (time.perf_counter() - started) * (1 / MAX_SHARE - 1))


def _share(flags: Sequence[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None

