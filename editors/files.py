"""Files that several processes share: the cache of statistics, sampled corpora, projectors and
trained editors (one `EDIT_SERVE_CACHE` for a server's editor, the CLI, Ray's editor actor,
replicas on one volume).

`save_tensors` writes a safetensors file whole or not at all: a temporary file of the writer's
own in the same folder, then a rename, so two writers of the same file never write into one
temporary file and a reader never sees half of one. `made_once` lets one process make a
derived file while the others wait for it (an exclusive `flock` on `<file>.lock`), so processes
that need the same statistics at once compute them once: after taking the lock, a caller looks
again for what another process may have written meanwhile. A process waiting for the lock says
so (`wanted_file`), so one that only works ahead of need can let go.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from editors.base import EditCancelled
from patches.format import replace_atomically

log = logging.getLogger(__name__)

#: how often a process waiting for a lock looks whether its computation was cancelled
POLL_SECONDS = 0.2


def save_tensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> Path:
    """Write `tensors` to `path` atomically (patches.format.replace_atomically)."""
    return replace_atomically(path, lambda tmp: save_file(dict(tensors), tmp,
                                                          metadata=dict(metadata) if metadata else None))


@contextlib.contextmanager
def made_once(path: Path, what: str, stop: threading.Event | None = None, announce: bool = True
              ) -> Iterator[None]:
    """Hold the lock of `path` (`<path>.lock`) across processes for the block. When another
    process holds it, say so once and wait; `stop`, when set meanwhile, ends the wait with
    EditCancelled (an edit cancelled while another process computes its statistics). A waiter
    that does not `announce` itself (one working ahead of need, too) leaves no `wanted_file`.

    A process in a hurry waits for one that works ahead of need too (a user's `edit_serve edit`
    beside a server's editor warming up, `serve --warm-editor`), and that one lets go
    (EditWorker.warm): the work is done once, by the process that needs it first."""
    lock = Path(path).with_name(Path(path).name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as fh:
        if not _try_lock(fh):
            log.warning("waiting for another process making %s (it holds %s)", what, lock)
            started = time.perf_counter()
            if announce:  # a holder that only works ahead of need (EditWorker.warm) lets go
                wanted_file(path).touch()
            try:
                while not _try_lock(fh):
                    if stop is not None and stop.is_set():
                        raise EditCancelled("the computation was cancelled")
                    time.sleep(POLL_SECONDS)
            finally:
                if announce:
                    wanted_file(path).unlink(missing_ok=True)
            log.info("%s: the other process let go after %.1f s", what, time.perf_counter() - started)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def wanted_file(path: Path) -> Path:
    """Present while a process waits for `path`'s lock (made_once)."""
    return Path(path).with_name(Path(path).name + ".lock.wanted")


def _try_lock(fh) -> bool:
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
