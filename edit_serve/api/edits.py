"""POST /v1/edits: compute an edit with a named method next to the serving model, then apply
it (or return the patch file). Admin token required, like every change.

Edits are computed one at a time, in the order they came, each on top of the patches active
when its turn comes (the answer's `computed_on` names that patch set; GET /v1/edits lists the
one computing and those waiting; DELETE /v1/edits/N cancels one that waits, or stops the one
being computed within a forward pass of the editor's model: nothing of it is applied). An edit
is applied only for a client that waits for the answer: one whose client went away (a timeout,
Ctrl-C) is not computed when its turn comes, or is stopped while it is computed. If the active
patches change while it is computed (an apply, revert or compaction through the admin API), it
is computed again on top of the new ones before it is applied (at most COMPUTE_ATTEMPTS times,
then 409 `patch_set_changed`)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from typing import Protocol

from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edit_serve.api.admin import require_token
from edit_serve.api.errors import APIError
from edit_serve.api.watch import GONE, Watched, watch
from edit_serve.dry_run import guarded_add, guarded_report
from edit_serve.edit_worker import EditWorker
from edit_serve.service import Conflict, PatchService
from editors import EditCancelled
from patches import Patch, to_bytes

log = logging.getLogger(__name__)

#: how often an edit is computed before its answer is a conflict, when the active patches
#: change (an apply, revert or compaction through the admin API) while it is computed
COMPUTE_ATTEMPTS = 3
#: subjects GET /v1/edits shows per pending edit (a batch can have thousands)
LISTED_SUBJECTS = 3


class Editor(Protocol):
    async def compute(self, method: str, requests: Sequence[Mapping], config: Mapping | None,
                      active: Sequence[str], with_eval: bool, ticket: str | None = None) -> tuple[Patch, float]:
        """A patch on top of the `active` patches, and the seconds it took. `ticket`: the name
        `cancel` stops it by (EditCancelled)."""

    async def cancel(self, ticket: str) -> bool:
        """Stop the computation named `ticket` (True if it was running)."""

    async def dry_run(self, patch: Patch, active: Sequence[str], probes: Sequence,
                      ticket: str | None = None) -> dict:
        """What `patch` would do on top of the `active` patches (edit_serve.dry_run's report)."""

    async def compact(self, active: Sequence[str], replaces: Sequence[str], probes: Sequence,
                      ticket: str | None = None) -> tuple[Patch, dict]:
        """The stamped patch that replaces `replaces` among the `active` patches, and the
        dry-run report of that swap."""

    async def warm(self, ticket: str | None = None) -> float:
        """Get ready for a first edit ahead of it (EditWorker.warm): the seconds it took."""


class LocalEditor:
    """An EditWorker on one dedicated, lower-priority thread of this process (the Ray editor
    actor's; the embedded server's editor is edit_serve.edit_process.ChildEditor)."""

    def __init__(self, worker: EditWorker):
        self.worker = worker
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="editor")

    async def _run(self, fn, *args, ticket: str | None):
        """`fn(*args, ticket)` on the worker's thread, stopped if this call is cancelled."""
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args, ticket)
        except asyncio.CancelledError:  # its caller gave up (on Ray Serve: the ingress's request was cancelled)
            if ticket is not None:
                self.worker.cancel(ticket)  # else the thread would compute on, and the next call wait for it
            raise

    async def compute(self, method, requests, config, active, with_eval, ticket=None):
        return await self._run(self.worker.compute, method, requests, config, active, with_eval, ticket=ticket)

    async def cancel(self, ticket):
        return self.worker.cancel(ticket)  # sets a flag: not queued behind the computation it stops

    async def dry_run(self, patch, active, probes, ticket=None):
        return await self._run(self.worker.dry_run, patch, active, probes, ticket=ticket)

    async def compact(self, active, replaces, probes, ticket=None):
        return await self._run(self.worker.compact, active, replaces, probes, ticket=ticket)

    async def warm(self, ticket=None):
        return await self._run(self.worker.warm, ticket=ticket)


class EditBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: str = Field(description="A registered editing method (rome, memit, alphaedit, ft, ft-lora, kn, serac, "
                                    "t-patcher, calinet, mend, ke).")
    requests: list[dict] = Field(min_length=1, description="Edit requests: prompt ('{}' for the subject), subject, "
                                 "target_new; optional target_true and rephrasings (other wordings of the prompt "
                                 "that the edit is fitted to as well; mend and ke refuse them).")
    config: dict = Field(default_factory=dict, description="Method settings over the method's defaults.")
    apply: bool = Field(True, description="Apply the patch (true), or return its dry-run report without applying it "
                                          "(false; the patch file itself with `Accept: application/octet-stream`).")
    eval: bool = Field(True, description="Measure the patch on its own requests and record the figures in it.")
    guard: float | None = Field(None, ge=0, le=1, description=(
        "Apply only if, measured as a dry run, neither the retention of the live edits nor locality on the "
        "probe set would fall by more than this (else 409 tolerance_exceeded, nothing applied)."))


class PendingEdits:
    """The edits received and not answered yet, oldest first: what GET /v1/edits lists and
    the gauge `edits_pending` counts."""

    def __init__(self, metrics=None):
        self.metrics = metrics
        self._edits: dict[int, dict] = {}
        self._cancelled: dict[int, asyncio.Event] = {}  # set by `cancel`
        self._tickets: dict[int, str] = {}  # the name the editor computes each edit under (Editor.cancel)
        self._numbers = itertools.count(1)

    @contextlib.contextmanager
    def track(self, body: EditBody) -> Iterator[dict]:
        """Count the edit `body` as pending while the block runs; the entry it yields is marked
        `computing` (`started`) when its turn comes."""
        entry = {"number": next(self._numbers), "method": body.method, "requests": len(body.requests),
                 "subjects": [str(r.get("subject")) for r in body.requests[:LISTED_SUBJECTS]],
                 "apply": body.apply, "received_at": time.time(), "state": "waiting"}
        self._edits[entry["number"]] = entry
        self._cancelled[entry["number"]] = asyncio.Event()
        self._tickets[entry["number"]] = f"edit-{entry['number']}-{uuid.uuid4().hex}"
        self._count()
        try:
            yield entry
        finally:
            del self._edits[entry["number"]], self._cancelled[entry["number"]], self._tickets[entry["number"]]
            self._count()

    def ticket(self, entry: dict) -> str:
        return self._tickets[entry["number"]]

    async def turn(self, entry: dict, lock: asyncio.Lock) -> bool:
        """Wait until `lock` is held for the edit `entry` (True; the caller releases it), or
        until the edit is cancelled while it waits (False)."""
        acquire = asyncio.ensure_future(lock.acquire())
        cancelled = asyncio.ensure_future(self._cancelled[entry["number"]].wait())
        proceed = False
        try:
            await asyncio.wait({acquire, cancelled}, return_when=asyncio.FIRST_COMPLETED)
            proceed = entry["state"] != "cancelled"  # when both came at once, the cancel wins
        finally:  # also when this request itself is cancelled while it waits
            cancelled.cancel()
            acquire.cancel()  # no effect once it has the lock
            held = acquire.done() and not acquire.cancelled()
            if held and not proceed:
                lock.release()
        if held and proceed:
            entry.update(state="computing", started_at=time.time())
        return held and proceed

    def cancel(self, number: int) -> tuple[dict, str | None]:
        """Cancel the edit `number` while it waits or is computed (its sender gets 409
        `edit_cancelled`): the entry as it was, with `cancelled_while` set, and the ticket of
        the computation to stop (None for an edit that waited)."""
        entry = self._edits.get(number)
        if entry is None:
            raise APIError(404, f"no edit {number} is pending (GET /v1/edits lists them)", code="not_found")
        if entry["state"] not in ("waiting", "computing"):
            raise APIError(409, f"edit {number} is {entry['state']}: it was computed already (revert its patch once "
                                "it is applied)", code="edit_computed")
        was, entry["state"] = entry["state"], "cancelled"
        self._cancelled[number].set()
        log.info("edit %d (%s, %d request(s)) cancelled while %s", number, entry["method"], entry["requests"],
                 "it waited" if was == "waiting" else "it was computed")
        return {**entry, "cancelled_while": was}, (self._tickets[number] if was == "computing" else None)

    def listing(self) -> list[dict]:
        return [dict(e) for e in self._edits.values()]

    def _count(self) -> None:
        if self.metrics is not None:
            self.metrics.set_edits_pending(len(self._edits))


def router(get_service, get_editor, token: str | None, metrics=None) -> APIRouter:
    r = APIRouter(prefix="/v1", dependencies=[Depends(require_token(token))])
    # Edits are computed one at a time, in the order they came, each on top of every edit
    # before it: one that took the active patches before the previous edit landed would be
    # computed without it (AlphaEdit would not spare its keys).
    in_order = asyncio.Lock()
    pending = PendingEdits(metrics)

    @r.get("/edits")
    async def queue():
        """The edits sent to POST /v1/edits and not answered yet, oldest first: the one being
        computed, then those waiting for their turn."""
        return {"version": get_service().engine.version, "pending": pending.listing()}

    @r.delete("/edits/{number}")
    async def cancel(number: int):
        """Cancel an edit that waits for its turn (nothing of it is computed) or stop the one
        being computed (nothing of it is applied)."""
        return {"cancelled": await stop(number, get_editor())}

    async def stop(number: int, editor: Editor) -> dict:
        """Cancel the pending edit `number` (PendingEdits.cancel) and stop its computation if it
        is being computed: the entry as it was."""
        cancelled, ticket = pending.cancel(number)
        if ticket is not None:
            await editor.cancel(ticket)
        return cancelled

    @r.post("/edits", status_code=201, openapi_extra={"requestBody": {
        "required": True, "content": {"application/json": {"schema": EditBody.model_json_schema()}}}})
    async def edit(request: Request):
        # Parsed here, not as a FastAPI body parameter: FastAPI reads and parses a declared
        # body before the router's token dependency runs, and a caller without the token
        # must get 401 before a byte of its body is read.
        try:
            body = EditBody.model_validate_json(await request.body())
        except ValidationError as e:
            raise RequestValidationError(e.errors()) from None
        service: PatchService = get_service()
        editor: Editor = get_editor()
        with pending.track(body) as entry:
            return await ordered(request, body, entry, service, editor)

    async def ordered(request: Request, body: EditBody, entry: dict, service: PatchService, editor: Editor):
        """The edit `body`, computed in its turn on top of the active patches, then applied
        (or reported, or returned as a file)."""
        if not await pending.turn(entry, in_order):
            raise APIError(409, f"edit {entry['number']} was cancelled while it waited (DELETE /v1/edits/"
                                f"{entry['number']}); nothing was computed", code="edit_cancelled")
        try:
            if await request.is_disconnected():  # its sender gave up while it waited: not computed
                log.warning("a %s edit's client went away before its turn; it was not computed", body.method)
                return Response(status_code=GONE)
            for attempt in range(1, COMPUTE_ATTEMPTS + 1):
                active, basis = [p.id for p in service.active], service.engine.version
                log.info("computing a %s edit of %d request(s) on top of patch set %s", body.method,
                         len(body.requests), basis)
                try:
                    patch, seconds = await watched(request, body, entry, editor, active)
                except EditCancelled:
                    entry["state"] = "cancelled"  # also where the editor was stopped some other way
                if entry["state"] == "cancelled":  # also one cancelled as its computation ended
                    raise APIError(409, f"edit {entry['number']} was cancelled while it was computed (DELETE "
                                        f"/v1/edits/{entry['number']}); nothing was applied", code="edit_cancelled")
                entry["state"] = "applying" if body.apply else "answering"
                if metrics is not None:
                    metrics.observe_edit(body.method, seconds)
                data = to_bytes(patch)
                done = {"seconds": round(seconds, 3), "computed_on": basis}
                if not body.apply and "application/octet-stream" not in request.headers.get("accept", ""):
                    report = await guarded_report(service, Watched(editor, request), patch, body.guard)
                    return JSONResponse({**report, **done, "patch": service.describe(patch)})
                if not body.apply:
                    return Response(data, media_type="application/octet-stream", status_code=200,
                                    headers={"x-edit-serve-patch-id": patch.id, "x-edit-serve-computed-on": basis,
                                             "content-disposition": f'attachment; filename="{patch.id}.safetensors"'})
                try:
                    change, measured = await guarded_add(service, Watched(editor, request), patch, data, body.guard,
                                                         expect=active)
                except Conflict as e:
                    if e.code != "patch_set_changed" or attempt == COMPUTE_ATTEMPTS:
                        raise
                    log.warning("the active patches changed while a %s edit was computed on %s; computing it again "
                                "on top of them (attempt %d of %d)", body.method, basis, attempt + 1,
                                COMPUTE_ATTEMPTS)
                    entry["state"] = "computing"
                    continue
                return {"id": change.id, "version": change.version, "applied": True, **done,
                        "patch": service.describe(change.patch), **({"guard": measured} if measured else {})}
        finally:
            in_order.release()

    async def watched(request: Request, body: EditBody, entry: dict, editor: Editor, active: list[str]):
        """editor.compute of the edit, stopped (as DELETE /v1/edits/N stops it) if its client
        goes away meanwhile (edit_serve.api.watch)."""
        async def gone() -> None:
            if entry["state"] == "computing":  # not one DELETE cancelled already
                await stop(entry["number"], editor)

        return await watch(request, editor, lambda ticket: editor.compute(body.method, body.requests, body.config,
                                                                          active, body.eval, ticket),
                           pending.ticket(entry), f"edit {entry['number']}", gone)

    return r
