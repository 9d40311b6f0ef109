"""An editor's computation for an HTTP request, stopped when its client goes away.

An edit, a dry run or a compaction is computed only for a client that waits for the answer:
if the client disconnects (a timeout, Ctrl-C), or the handler is cancelled (how Ray Serve passes
a disconnect on), the computation is stopped within a forward pass of the editor's model
(EditWorker.cancel) and nothing of it is applied; the next one does not wait for it.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import TypeVar

from fastapi import Request

log = logging.getLogger(__name__)

T = TypeVar("T")

#: how often a computation checks that its client still waits for it (seconds)
DISCONNECT_CHECK_S = 0.5
#: the status of a route whose client went away before its answer (nginx's "client closed
#: request"): nothing was changed, and nobody reads it
GONE = 499


async def watch(request: Request, editor, call: Callable[[str], Awaitable[T]], ticket: str, what: str,
                gone: Callable[[], Awaitable[None]] | None = None) -> T:
    """`call(ticket)`, an editor computation named `ticket`; when the client of `request` goes
    away meanwhile, `gone()` (by default: the editor told to stop `ticket`), once; the editor
    is also told when this call ends before the computation does (cancelled). What `call`
    raises when stopped (EditCancelled) comes out of here."""
    task = asyncio.ensure_future(call(ticket))
    left = False
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=DISCONNECT_CHECK_S)
            if not task.done() and not left and await request.is_disconnected():
                left = True
                log.warning("%s: its client went away while it was computed; stopping it (nothing of it is "
                            "applied)", what)
                await (gone() if gone is not None else editor.cancel(ticket))
        return task.result()
    except asyncio.CancelledError:
        log.warning("%s: its request was cancelled while it was computed; stopping it (nothing of it is applied)",
                    what)
        raise
    finally:
        if not task.done():  # nobody waits for it any more
            task.cancel()  # a LocalEditor or ChildEditor stops its computation as its call is cancelled
            # A remote editor is told as well, in a context of its own: Ray Serve cancels the calls
            # a cancelled request makes.
            told = asyncio.get_running_loop().create_task(editor.cancel(ticket), context=contextvars.Context())
            await asyncio.shield(told)


class Watched:
    """`editor` (an Editor, edit_serve.api.edits) whose dry runs and compactions `watch` the
    client of `request`: what the admin routes and a guarded edit measure with."""

    def __init__(self, editor, request: Request):
        self.editor, self.request = editor, request

    async def dry_run(self, patch, active, probes):
        return await watch(self.request, self.editor, lambda t: self.editor.dry_run(patch, active, probes, t),
                           _ticket("dry-run"), f"the dry run of patch {patch.id}")

    async def compact(self, active, replaces, probes):
        return await watch(self.request, self.editor, lambda t: self.editor.compact(active, replaces, probes, t),
                           _ticket("compaction"), f"the compaction of {len(replaces)} patches")


def _ticket(kind: str) -> str:
    return f"{kind}-{uuid.uuid4().hex}"
