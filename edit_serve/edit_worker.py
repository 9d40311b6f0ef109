"""Computing edits next to a serving model: a worker with its own copy of the model.

The worker keeps a private copy of the base model in an edit context whose PatchStack mirrors
the serving patch set (so sequential edits build on what is live, and methods that protect
earlier edits, such as alphaedit, see their keys), computes a patch with a registered method,
measures it on its own requests (the figures go into the patch's `eval`), and returns the
patch stamped (once, by the context) with the fingerprint of the BASE weights. Serving never waits for it: the
embedded server runs it in a child process (edit_serve.edit_process), the Ray application in an
editor actor on its own resources.

A long edit (a MEMIT batch of thousands) keeps its finished parts under the store's `parts`
folder (editors.context): the same request sent again after a crash or a restart of the server
resumes where it stopped. The folder is emptied once an edit finishes. The keys of the edits
(what alphaedit spares) are kept under the store's `keys` folder, so the first edit after a
restart does not recompute those of every active patch. `warm` loads the model copy and computes
the key statistics of a first edit ahead of it (serve --warm-editor).

An edit being computed can be cancelled (`cancel` with the ticket it was computed under): its
model's next forward pass raises EditCancelled (EditContext.stoppable), nothing is returned,
and the model copy is left carrying the active patches, as before.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from edit_serve.config import EngineConfig
from edit_serve.store import PatchStore
from editors import EditError
from editors.context import EditContext, prepare
from patches import Patch

log = logging.getLogger(__name__)

#: how long a warm-up that let go of the statistics waits for the waiting process to take them
#: over (a waiter removes its `wanted_file` once it holds the lock, or when it gives up)
HANDOVER_SECONDS = 10.0


class EditWorker:
    def __init__(self, engine: EngineConfig, store: PatchStore, threads: int | None = None,
                 background: bool = False):
        """`background`: edit at the lowest CPU priority (for a CPU shared with serving); the
        priority is set on the thread that first computes, so callers use one dedicated thread."""
        self.engine_config, self.store = engine, store
        self.threads, self.background = threads, background
        self._lock = threading.Lock()
        self._ctx: EditContext | None = None
        self._measured = None  # edit_serve.dry_run.Measured, made on the first measurement
        self._stops = Stops()

    def _load(self) -> EditContext:
        """The edit context, its model loaded on first use (float32: editing needs the precision)."""
        if self._ctx is None:
            import torch

            from edit_serve.models import load_model
            from edit_serve.profiles import get_profile

            if self.threads:
                torch.set_num_threads(self.threads)
            if self.background:
                _lowest_cpu_priority()
            profile = get_profile(self.engine_config.model)
            if self.engine_config.weights:
                profile = profile.with_weights(self.engine_config.weights)
            self._ctx = EditContext.from_loaded(load_model(profile, dtype="float32", device=self.engine_config.device))
            self._ctx.parts = self.store.root / "parts"  # a long edit resumes after a restart (module doc)
            self._ctx.keys = self.store.root / "keys"  # the first edit after a restart need not recompute them
        return self._ctx

    def _sync(self, active: Sequence[str]) -> None:
        """Make the private model carry exactly the `active` patches, in order (one change)."""
        stack = self._ctx.stack
        current = set(stack.ids)
        stack.replace(active, [self.store.get(i) for i in active if i not in current])

    def compute(self, method: str, requests: Sequence[Mapping], config: Mapping | None,
                active: Sequence[str], with_eval: bool = True, ticket: str | None = None) -> tuple[Patch, float]:
        """A patch for `requests` on top of the `active` patches, and the seconds it took.
        `ticket`: a name for this computation that `cancel` stops it by (EditCancelled)."""
        from edit_serve.evaluation import Record, edit_with_eval
        from edit_serve.evaluation.data import Probe, rephrasing_probes
        from edit_serve.probes import default_pool

        named = self.engine_config.editors.get(method)
        asked = (config or {}).get("editor")
        if asked:
            self._check_editor_path(asked)
        elif named is not None:
            config = {**(config or {}), "editor": str(named)}  # the server's trained editor checkpoint
        job = prepare(method, requests, config)  # checked once, before any loading; nothing checks it again
        with self._stops.open(ticket) as stop, self._lock:
            ctx = self._load()
            started = time.perf_counter()
            self._sync(list(active))
            record = Record(id="edit", requests=job.requests, paraphrases=rephrasing_probes(job.requests),
                            neighborhood=tuple(Probe(p) for p in default_pool(r.subject for r in job.requests)))
            memo = self._memo()
            with ctx.stoppable(stop):
                patch = edit_with_eval(ctx, job, [record], with_eval=with_eval, memo=memo.scores,
                                       router=memo.router(ctx.tokenizer))
            shutil.rmtree(ctx.parts, ignore_errors=True)  # kept only for a retry of an unfinished edit
            return patch, time.perf_counter() - started

    def warm(self, ticket: str | None = None) -> float:
        """Load the model copy and compute the key statistics a first rome, memit or alphaedit
        edit reads (the profile's default layers, the editors' default corpus), so that edit
        need not wait for them; the seconds it took, loading included. Nothing to compute for
        an encoder-decoder model (those methods do not edit one) or statistics already cached."""
        from editors.lm import is_seq2seq

        with self._stops.open(ticket) as stop, self._lock:
            started = time.perf_counter()
            ctx = self._load()
            layers = ctx.profile.first_edit_layers()
            if layers and not is_seq2seq(ctx.model):
                self._warm_stats(ctx, layers, stop)
            return time.perf_counter() - started

    @staticmethod
    def _warm_stats(ctx: EditContext, layers: list[int], stop: threading.Event) -> None:
        """The default statistics of `layers`; a process that starts waiting for them meanwhile
        (a user's `edit_serve edit` on the same cache) is let go first: this one stops, waits for
        it and reads what it wrote (one that waited here would share the CPU with the warm-up)."""
        from editors import EditCancelled
        from editors.corpus import CorpusSpec
        from editors.files import POLL_SECONDS, wanted_file
        from editors.stats import StatsConfig, lock_file

        cfg = StatsConfig()
        wanted = wanted_file(lock_file(ctx.fingerprint, CorpusSpec(cfg.corpus).ident(), cfg))
        halt, done = threading.Event(), threading.Event()

        def watch() -> None:
            while not done.wait(POLL_SECONDS):
                if stop.is_set() or wanted.exists():
                    halt.set()
                    return

        watcher = threading.Thread(target=watch, name="warm-watch", daemon=True)
        watcher.start()
        ctx.working_ahead = True  # waiting for another process here leaves it alone
        try:
            try:
                with ctx.stoppable(halt):
                    ctx.stats(layers, cfg)
                return
            except EditCancelled:
                if stop.is_set():
                    raise
            finally:
                done.set()
                watcher.join()
            log.info("another process is waiting for the key statistics: letting it make them, then reading them")
            deadline = time.monotonic() + HANDOVER_SECONDS
            while wanted.exists() and time.monotonic() < deadline:  # until it holds the lock (made_once)
                time.sleep(POLL_SECONDS)
            with ctx.stoppable(stop):
                ctx.stats(layers, cfg)
        finally:
            ctx.working_ahead = False

    def cancel(self, ticket: str) -> bool:
        """Stop the computation named `ticket` (EditCancelled in its thread within one forward
        pass; one not started yet is stopped as it starts). True if it was running."""
        running, first = self._stops.stop(ticket)
        if first:  # a route that gives up on a local computation stops it twice: cancelled call, then stop
            log.info("stopping %s%s", ticket, "" if running else " (not running now: if it "
                     "starts, it stops at once)")
        return running

    def _check_editor_path(self, asked) -> None:
        """A request names an editor checkpoint only in a folder the operator gave one in
        (serve --editor-checkpoint) or in the editor cache, never any file on the server."""
        from edit_serve.models import cache_dir

        folders = {p.parent for p in self.engine_config.editors.values()} | {(cache_dir() / "editors").resolve()}
        path = Path(str(asked)).expanduser().resolve()
        if not any(folder == path.parent or folder in path.parents for folder in folders):
            raise EditError(f"config.editor {asked!r} is outside the server's editor folders (those of "
                            "--editor-checkpoint and the editor cache); put the checkpoint there")

    def dry_run(self, patch: Patch, active: Sequence[str], probes: Sequence, ticket: str | None = None) -> dict:
        """What `patch` would do on top of the `active` patches, measured on this worker's
        model copy and reverted (see edit_serve.dry_run). `ticket`: as for `compute`."""
        from edit_serve.dry_run import measure

        with self._stops.open(ticket) as stop, self._lock:
            ctx = self._load()
            self._sync(list(active))
            with ctx.stoppable(stop):
                return measure(ctx.model, ctx.tokenizer, ctx.stack, patch, probes, memo=self._memo())

    def _memo(self):
        """What this worker's measurements (dry runs, an edit's evaluation) found on its model
        copy's last weight states, and their scope router (edit_serve.dry_run.Measured)."""
        from edit_serve.dry_run import Measured
        from editors.serac import encoder_of

        ctx = self._ctx
        if self._measured is None or self._measured.stack is not ctx.stack:
            self._measured = Measured(ctx.stack, lambda: encoder_of(ctx))  # the encoder the editor loaded
        return self._measured

    def compact(self, active: Sequence[str], replaces: Sequence[str], probes: Sequence,
                ticket: str | None = None) -> tuple[Patch, dict]:
        """The patch that makes the change of the active patches `replaces` (patches.compact:
        weight patches compacted, or memory patches merged), stamped, and what putting it in
        their place would do (edit_serve.dry_run's report: "before" with them, "after" with it),
        measured on this worker's model copy. `ticket`: as for `compute`."""
        from edit_serve.dry_run import measure
        from patches.compact import compact, merge_memory

        with self._stops.open(ticket) as stop, self._lock:
            ctx = self._load()
            self._sync(list(active))
            stack = ctx.stack
            old = [a.patch for a in stack.active if a.patch.id in replaces]
            if all(p.kind == "memory" for p in old):
                patch = stack.stamp(merge_memory(old))
            else:
                shapes = {name: stack.parameter(name).shape for p in old for name in p.deltas()}
                patch = stack.stamp(compact(old, shapes))
                ctx.carry_keys(patch, old)
            with ctx.stoppable(stop):
                return patch, measure(ctx.model, ctx.tokenizer, stack, patch, probes, replaces=replaces,
                                      memo=self._memo())


class Stops:
    """The stop flags of the computations running under a ticket. A stopped ticket is
    remembered for a while: a computation that starts under it (a cancel that overtook the
    call) stops as it starts, and a second stop is known as one."""

    #: how many stopped tickets are remembered
    REMEMBERED = 64

    def __init__(self):
        self._lock = threading.Lock()
        self._running: dict[str, threading.Event] = {}
        self._stopped: deque[str] = deque(maxlen=self.REMEMBERED)

    @contextlib.contextmanager
    def open(self, ticket: str | None) -> Iterator[threading.Event]:
        """The stop flag of `ticket` while the block runs (a flag nothing sets for None)."""
        flag = threading.Event()
        if ticket is None:
            yield flag
            return
        with self._lock:
            if ticket in self._stopped:
                flag.set()
            self._running[ticket] = flag
        try:
            yield flag
        finally:
            with self._lock:
                del self._running[ticket]

    def stop(self, ticket: str) -> tuple[bool, bool]:
        """Stop `ticket`'s computation -> (whether one is running now, whether this is the
        ticket's first stop)."""
        with self._lock:
            first = ticket not in self._stopped
            if first:
                self._stopped.append(ticket)
            flag = self._running.get(ticket)
            if flag is not None:
                flag.set()
            return flag is not None, first


def _lowest_cpu_priority() -> None:
    """This thread only runs when a CPU would otherwise idle: SCHED_IDLE where Linux offers it
    (nice 10 alone still took about half a core from the serving threads on 2 cores), else
    nice 19."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # 0: the calling thread
    except (AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
