"""The patch service: what the admin API does, over one engine and one patch store.

Every change follows the same path: parse and validate the file, open the log (so an
unwritable store refuses before the model is touched), apply it between forward passes (the
engine checks it against the live model first and refuses it changing nothing), store the file
durably, then write the log record (fsync). A patch is
acknowledged only once it is logged, so an acknowledged patch survives a restart; a failure
at any step leaves the model, its version and the log exactly as they were (a revert whose
record cannot be written puts the patch back at its place in the apply order).

A compaction (`replace`) is one such change: many active patches out, the one that makes
their change in, with one engine change and one log record, so a crash at any point leaves
a store that restarts into the old patch set or the new one. `EDIT_SERVE_FAULT=<point>` kills
the process at a named point of it (`compact:stored`, `compact:applied`, `compact:logged`):
the crash tests' hook.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from edit_serve.engines.base import Engine
from edit_serve.store import PatchStore, StoreError
from patches import Patch, PatchError, from_bytes, patchset_with

if TYPE_CHECKING:
    from edit_serve.metrics import Metrics
    from edit_serve.probes import ProbeReport, ProbeRunner

log = logging.getLogger(__name__)


class NotFound(LookupError):
    """No such patch (or not active, for a revert)."""


class Conflict(RuntimeError):
    """The change conflicts with the active patch set (the patch is already applied, say).
    `code` names the conflict in the API's error."""

    def __init__(self, message: str, code: str = "already_applied"):
        super().__init__(message)
        self.code = code


class RestoreError(RuntimeError):
    """The patch log cannot be replayed on this model."""


@dataclass(frozen=True)
class Change:
    id: str
    op: str
    version: str
    patch: Patch


class PatchService:
    def __init__(self, engine: Engine, store: PatchStore, max_patch_bytes: int = 2 * 1024**3,
                 metrics: Metrics | None = None, probes: ProbeRunner | None = None):
        self.engine = engine
        self.store = store
        self.max_patch_bytes = max_patch_bytes
        self.metrics = metrics  # apply/revert durations
        self.probes = probes  # run after every change; their last report shows in listings
        self._lock = asyncio.Lock()  # one change at a time
        self._active: dict[str, Patch] = {}  # id -> patch, in apply order

    async def restore(self) -> list[str]:
        """Apply the store's active patches in order (at start-up, before serving)."""
        await asyncio.to_thread(self.store.sweep_temp)
        try:
            ids = await asyncio.to_thread(self.store.active_ids)
        except StoreError as e:
            raise RestoreError(str(e)) from None
        for patch_id in ids:
            try:
                patch = await asyncio.to_thread(self.store.get, patch_id)
                await self._timed("apply", self.engine.apply(patch))
                self._active[patch_id] = patch
            except KeyError:
                raise RestoreError(
                    f"the patch log {self.store.log_path} names {patch_id}, whose file is missing from "
                    f"{self.store.files} (put the file back, or start with another --patch-store)"
                ) from None
            except PatchError as e:
                raise RestoreError(
                    f"cannot re-apply patch {patch_id} from {self.store.root}: {e} "
                    "(start with the model it was made for, or another --patch-store)"
                ) from None
        if ids:
            log.info("restored %d active patches from %s; version %s", len(ids), self.store.root, self.engine.version)
        return ids

    async def parse(self, data: bytes) -> Patch:
        """Parse and validate an uploaded file (structure only; `add` checks the model)."""
        return await asyncio.to_thread(from_bytes, data, self.max_patch_bytes)

    async def add(self, patch: Patch, data: bytes | None = None, expect: Sequence[str] | None = None) -> Change:
        """Apply (the engine checks the patch first: a refused one changes nothing), store
        (`data`: the file's original bytes, when it came as a file) and log; if storing or
        logging fails, the apply is reverted exactly. Checking inside the apply, not before
        the store, spares an engine round trip (on vLLM and Ray, a call to the workers).
        `expect`: the active patches the caller measured the patch on; if others are active
        now, nothing is applied (Conflict)."""
        async with self._lock:
            if patch.id in self._active:
                raise Conflict(f"patch {patch.id} is already applied")
            if expect is not None and list(self._active) != list(expect):
                raise Conflict("the active patches changed while the patch was measured; send it again",
                               code="patch_set_changed")
            async with self._logging("apply", patch.id) as commit:
                version = await self._timed("apply", self.engine.apply(patch))
                try:
                    await asyncio.to_thread(self.store.put, patch, data)
                    await asyncio.to_thread(commit)
                except BaseException:
                    await self.engine.revert(patch.id)  # the last one: its revert is exact
                    raise
            self._active[patch.id] = patch
        self._changed()
        log.info("applied patch %s (%s); version %s", patch.id, patch.method, version)
        return Change(patch.id, "apply", version, patch)

    async def revert(self, patch_id: str) -> Change:
        async with self._lock:
            patch = self._active.get(patch_id)
            if patch is None:
                raise NotFound(f"patch {patch_id} is not applied")
            position = list(self._active).index(patch_id)
            async with self._logging("revert", patch_id) as commit:
                version = await self._timed("revert", self.engine.revert(patch_id))
                try:
                    await asyncio.to_thread(commit)
                except BaseException:
                    await self.engine.apply(patch, position=position)  # back where it was
                    raise
            del self._active[patch_id]
        self._changed()
        log.info("reverted patch %s; version %s", patch_id, version)
        return Change(patch_id, "revert", version, patch)

    async def replace(self, patch: Patch, replaces: Sequence[str]) -> Change:
        """Put `patch` in the place of the active patches `replaces` (it makes their change:
        a compaction), as one change: stored, swapped on the engine at once, one log record."""
        async with self._lock:
            before = list(self._active)
            if patch.id in self._active:
                raise Conflict(f"patch {patch.id} is already applied")
            if not replaces or [i for i in before if i in replaces] != list(replaces):
                raise Conflict("the active patches changed while the compaction was prepared; run it again",
                               code="patch_set_changed")
            after = patchset_with(before, patch.id, replaces)
            await asyncio.to_thread(self.store.put, patch)
            _fault("compact:stored")
            async with self._logging("compact", patch.id, replaces) as commit:
                version = await self._timed("compact", self.engine.replace(after, [patch]))
                _fault("compact:applied")
                try:
                    await asyncio.to_thread(commit)
                except BaseException:
                    await self.engine.replace(before, [self._active[i] for i in replaces])  # exactly as it was
                    raise
            _fault("compact:logged")
            old = self._active
            self._active = {i: patch if i == patch.id else old[i] for i in after}
        self._changed()
        log.info("replaced %d patches by %s; version %s", len(replaces), patch.id, version)
        return Change(patch.id, "compact", version, patch)

    async def drop_edits(self, patch_id: str, drop: Sequence[int]) -> Change:
        """Replace the active memory patch `patch_id` by one without the edits `drop` (indices
        into its requests; patches.memory.without_requests), as one change."""
        from patches.memory import without_requests

        patch = self._active.get(patch_id)
        if patch is None:
            raise NotFound(f"patch {patch_id} is not applied")
        return await self.replace(await asyncio.to_thread(without_requests, patch, drop), [patch_id])

    @contextlib.asynccontextmanager
    async def _logging(self, op: str, patch_id: str, replaces: Sequence[str] = ()):
        """The store's `appending` (open and lock the log, commit later) off the event loop."""
        cm = self.store.appending(op, patch_id, replaces)
        commit = await asyncio.to_thread(cm.__enter__)
        try:
            yield commit
        except BaseException as e:
            await asyncio.to_thread(cm.__exit__, type(e), e, e.__traceback__)
            raise
        else:
            await asyncio.to_thread(cm.__exit__, None, None, None)

    async def _timed(self, op: str, change) -> str:
        """Await an engine change (apply, revert, compact), recording its duration."""
        started = time.perf_counter()
        version = await change
        if self.metrics is not None:
            self.metrics.observe_apply(op, time.perf_counter() - started)
        return version

    def _changed(self) -> None:
        if self.probes is not None:
            self.probes.trigger()

    async def probe_report(self) -> ProbeReport | None:
        """The last probe run (locality and edit-retention ratios), None before the first: this
        server's, or on Ray Serve the replicas' (they probe themselves; the engine asks them)."""
        if self.probes is not None:
            return self.probes.last
        if hasattr(self.engine, "probe_report"):
            return await self.engine.probe_report()
        return None

    @property
    def active(self) -> list[Patch]:
        return list(self._active.values())

    def get(self, patch_id: str) -> Patch:
        if patch_id in self._active:
            return self._active[patch_id]
        try:
            return self.store.get(patch_id)
        except (KeyError, PatchError):
            raise NotFound(f"no patch {patch_id} in the store") from None

    def describe(self, patch: Patch, applied_at: dict[str, float] | None = None,
                 probes: ProbeReport | None = None, requests: int | None = None) -> dict:
        """A patch as the admin API shows it; `retention`: the share of its edit requests still
        answered with their target in the probe run `probes`; `requests`: the most of its
        requests to list (all when None; `n_requests` counts them all)."""
        applied_at = self.store.applied_at() if applied_at is None else applied_at
        held = probes.per_patch.get(patch.id) if probes is not None and patch.id in self._active else None
        return {
            "id": patch.id, "kind": patch.kind, "method": patch.method, "base_model": patch.base_model,
            "requests": patch.requests[:requests], "n_requests": len(patch.requests), "targets": patch.targets,
            "created_at": patch.created_at, "eval": patch.eval, "active": patch.id in self._active,
            "applied_at": applied_at.get(patch.id),
            "retention": held,
        }

    def listing(self, probes: ProbeReport | None = None, requests: int | None = None) -> list[dict]:
        """The active patches, in the order they were applied (`requests`: as in `describe`)."""
        applied_at = self.store.applied_at()
        return [self.describe(p, applied_at, probes, requests) for p in self._active.values()]


FAULT_ENV = "EDIT_SERVE_FAULT"


def _fault(point: str) -> None:
    """The crash tests' hook: SIGKILL this process at `point` when $EDIT_SERVE_FAULT names it."""
    if os.environ.get(FAULT_ENV) == point:
        log.warning("%s=%s: killing this process", FAULT_ENV, point)
        os.kill(os.getpid(), signal.SIGKILL)
