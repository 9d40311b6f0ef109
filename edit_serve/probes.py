"""Live probes: do the active edits still hold, and are unrelated facts untouched?

Two ratios, measured on the serving engine through its normal generate path (greedy, a few
tokens each, batched), so a probe run interleaves with traffic between forward passes:
- edit retention: the share of active edit requests whose `target_new` is still the greedy
  continuation of their prompt;
- locality: the share of a probe set of unrelated prompts whose greedy next token is the one
  the unedited model predicted.

The probe set is measured on the unedited model at start-up (before the patch log is
replayed). By default it is built from a pool of generic factual prompts generated here,
keeping those the model answers with the highest top-1 probability; a JSONL file of prompts
(`{"prompt": "..."}` per line) replaces the pool. Runs happen after every apply and revert and
every `interval_s` seconds; a run whose requests saw a patch-set version other than the one
active at its end is discarded (a newer run is already due).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from edit_serve.config import ProbeConfig
from edit_serve.engines.base import Engine, GenerationRequest, SamplingParams, Started, TextDelta
from edit_serve.metrics import Metrics
from patches import Patch

log = logging.getLogger(__name__)


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


def default_pool() -> list[str]:
    """The candidate prompts of the default probe set (unrelated, generic facts)."""
    pool = [t.format(country=c, capital=cap, adjective=adj) for c, cap, adj in COUNTRIES for t in COUNTRY_TEMPLATES]
    return pool + GENERAL_PROMPTS


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
    locality: float | None  # None: no probe prompts
    retention: float | None  # None: no active edit requests
    per_patch: dict[str, float | None] = field(default_factory=dict)
    prompts: int = 0
    edits: int = 0
    at: float = 0.0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"version": self.version, "locality_ratio": self.locality, "edit_retention_ratio": self.retention,
                "prompts": self.prompts, "edits": self.edits, "at": self.at, "seconds": round(self.seconds, 4)}


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
    path, `batch_size` prompts per group, and the patch-set versions they ran under."""
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

    await asyncio.gather(*(group(s) for s in range(0, len(prompts), batch_size)))
    return [tuple(o) for o in outputs], versions


class ProbeRunner:
    """Owns the probe set and runs probes after changes and on a timer."""

    def __init__(self, engine: Engine, config: ProbeConfig, active: Callable[[], list[Patch]],
                 metrics: Metrics | None = None, prompts: list[str] | None = None):
        """`prompts`: the locality probe prompts (`read_probe_file`); None builds the default set."""
        self.engine, self.config, self.active, self.metrics = engine, config, active, metrics
        self.prompts = prompts
        self.probes: list[Probe] = []
        self.last: ProbeReport | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._edit_cache: dict[str, list[Probe]] = {}

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
    def _edits(self) -> list[tuple[str, Probe]]:
        out = []
        for patch in self.active():
            if patch.id not in self._edit_cache:
                self._edit_cache[patch.id] = edit_probes(self.engine.tokenizer, patch)
            out += [(patch.id, probe) for probe in self._edit_cache[patch.id]]
        return out

    async def run_once(self) -> ProbeReport | None:
        """One probe run; publishes and returns its report, or None if the patch set changed
        while it ran."""
        started = time.perf_counter()
        edits = self._edits()
        probes = self.probes + [p for _, p in edits]
        outputs, versions = await greedy(self.engine, [p.prompt_ids for p in probes],
                                         [len(p.expected) for p in probes], self.config.batch_size)
        version = self.engine.version
        if versions - {version}:
            log.debug("probe run saw versions %s while %s became active; discarded", versions, version)
            return None
        held = [out == p.expected for out, p in zip(outputs, probes)]
        local, kept = held[:len(self.probes)], held[len(self.probes):]
        per_patch = {pid: _share([k for (p, _), k in zip(edits, kept) if p == pid])
                     for pid in dict.fromkeys(pid for pid, _ in edits)}
        report = ProbeReport(version, _share(local), _share(kept), per_patch, len(local), len(kept),
                             time.time(), time.perf_counter() - started)
        self._edit_cache = {pid: v for pid, v in self._edit_cache.items() if pid in per_patch}
        self.last = report
        if self.metrics is not None:
            self.metrics.set_probes(report.locality, report.retention)
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
        interval = self.config.interval_s or None
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=interval)
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a failed probe run must not stop the loop
                log.exception("probe run failed")


def _share(flags: Sequence[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None

