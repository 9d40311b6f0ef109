"""The embedded server's editor: an EditWorker in a child process of the server.

On a thread of the serving process an edit took over 1.5 times as long as in a process of its
own (2 cores: a SmolLM2 ROME edit 15.3 s against 8.8 s, medians; docs/editing-speed.md).
torch runs each thread's parallel operations on an OpenMP team of that thread; libgomp counts
the threads of every team of the process, and once they outnumber the CPUs (the serving threads'
team and the editor's) it lets no waiting thread spin, so every small operation wakes its helper
with a system call. A child process has an OpenMP runtime of its own, and the worker computes in
its main thread.

The child starts with the first edit, dry run or compaction (a server that never edits never
starts it), or with the server under `--warm-editor`, and keeps its model copy between them, as
the thread did. Patches cross as patch files' bytes (as they do to and from the Ray editor
actor). A stop crosses on a queue that a thread of the child reads, so it is never queued behind
the computation it stops. If the child dies (killed, out of memory), the call it was computing
fails in one line and the next call starts a new child; if the server dies, the child ends too.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import multiprocessing
import os
import pickle
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from edit_serve.api.errors import APIError
from edit_serve.config import LOG_FORMAT, EngineConfig
from patches import Patch, from_bytes, to_bytes

log = logging.getLogger(__name__)

_worker = None  # the child's EditWorker (set by _start)
#: how often the child looks whether the server that started it is still there
PARENT_POLL_SECONDS = 1.0


class ChildEditor:
    """The Editor (edit_serve.api.edits) of the embedded server: one child process, lazily
    started, running one call at a time."""

    def __init__(self, engine: EngineConfig, store_root: Path, background: bool):
        self._args = (engine, str(store_root), background, logging.getLogger().level)
        self._context = multiprocessing.get_context("spawn")  # no copy of the serving threads' state
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self._stops = None
        self._calls = 0  # calls sent and not answered

    def _executor(self) -> concurrent.futures.ProcessPoolExecutor:
        if self._pool is None:
            self._stops = self._context.SimpleQueue()
            self._pool = concurrent.futures.ProcessPoolExecutor(1, mp_context=self._context, initializer=_start,
                                                                initargs=(*self._args, self._stops))
        return self._pool

    async def _call(self, fn, *args, ticket: str | None):
        """`fn(*args, ticket)` in the child, stopped there if this call is cancelled."""
        pool = self._executor()
        self._calls += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, fn, *args, ticket)
        except asyncio.CancelledError:  # its caller gave up: stop the child's computation too
            if ticket is not None:
                await self.cancel(ticket)
            raise
        except BrokenProcessPool:
            if self._pool is pool:
                self._pool = None
                pool.shutdown(wait=False, cancel_futures=True)
            raise APIError(503, "the editor process ended while it computed (killed, or out of memory?); "
                                "the next edit starts a new one", code="editor_failed") from None
        finally:
            self._calls -= 1

    async def compute(self, method: str, requests: Sequence[Mapping], config: Mapping | None,
                      active: Sequence[str], with_eval: bool, ticket: str | None = None) -> tuple[Patch, float]:
        data, seconds = await self._call(_compute, method, list(requests), config, list(active), with_eval,
                                         ticket=ticket)
        return from_bytes(data), seconds

    async def cancel(self, ticket: str) -> bool:
        """Send the stop (EditWorker.cancel in the child); True once sent."""
        if self._pool is None:
            return False  # no child: nothing of it is computed
        self._stops.put(ticket)
        return True

    async def dry_run(self, patch: Patch, active: Sequence[str], probes: Sequence, ticket: str | None = None) -> dict:
        return await self._call(_dry_run, to_bytes(patch), list(active), list(probes), ticket=ticket)

    async def compact(self, active: Sequence[str], replaces: Sequence[str], probes: Sequence,
                      ticket: str | None = None) -> tuple[Patch, dict]:
        data, report = await self._call(_compact, list(active), list(replaces), list(probes), ticket=ticket)
        return from_bytes(data), report

    async def warm(self, ticket: str | None = None) -> float:
        return await self._call(_warm, ticket=ticket)

    def close(self) -> None:
        """End the child (an edit it computes is dropped; nothing of it was applied)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            if self._calls:  # else the child ends as it was started, and cleans up after itself
                for process in list(getattr(pool, "_processes", {}).values()):  # Python 3.14: terminate_workers()
                    process.terminate()
            pool.shutdown(wait=True, cancel_futures=True)
            self._stops.close()
            self._stops = None  # its lock is released here, not left to the interpreter's exit


# --- in the child ---------------------------------------------------------------------------
def _start(engine: EngineConfig, store_root: str, background: bool, level: int, stops) -> None:
    global _worker
    from edit_serve.edit_worker import EditWorker
    from edit_serve.store import PatchStore

    logging.basicConfig(level=level, format=LOG_FORMAT)
    if background:
        _idle_session()
    _worker = EditWorker(engine, PatchStore(store_root), background=background)

    def listen() -> None:
        while True:
            _worker.cancel(stops.get())

    parent = os.getppid()

    def watch_parent() -> None:
        """End with the server: one killed outright (kill -9, the OOM killer) cannot end its
        child, which would keep its model copy in memory for good."""
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_SECONDS)
        os._exit(0)

    threading.Thread(target=listen, name="editor-stops", daemon=True).start()
    threading.Thread(target=watch_parent, name="editor-parent", daemon=True).start()


def _idle_session() -> None:
    """A session of the child's own, at the lowest weight. Where Linux groups the CPU's time by
    session (autogroups, the default of most distributions), it shares it fairly between
    sessions before it looks at a thread's priority: SCHED_IDLE (EditWorker) ranks the editor
    below the serving threads of its session only, and a user's `edit_serve edit` in a terminal
    of its own got half the CPU at most beside it (its key statistics took 117 s instead of 25).
    A session at nice 19 weighs 15 against a normal one's 1,024."""
    try:
        os.setsid()
        Path("/proc/self/autogroup").write_text("19")
    except OSError:  # no autogroups (then SCHED_IDLE alone does it), or a session leader already
        pass


def _plain(fn):
    """`fn`, its exceptions re-raised as ones the server can unpickle (a type of the child's that
    takes other arguments would break the pool instead); pickled by its own name."""
    @functools.wraps(fn)
    def run(*args):
        try:
            return fn(*args)
        except Exception as e:
            try:
                pickle.loads(pickle.dumps(e))
            except Exception:
                raise RuntimeError(f"{type(e).__name__}: {e}") from None
            raise

    return run


@_plain
def _compute(method, requests, config, active, with_eval, ticket):
    patch, seconds = _worker.compute(method, requests, config, active, with_eval, ticket)
    return to_bytes(patch), seconds


@_plain
def _dry_run(data: bytes, active, probes, ticket) -> dict:
    return _worker.dry_run(from_bytes(data), active, probes, ticket)


@_plain
def _compact(active, replaces, probes, ticket):
    patch, report = _worker.compact(active, replaces, probes, ticket)
    return to_bytes(patch), report


@_plain
def _warm(ticket) -> float:
    return _worker.warm(ticket)
