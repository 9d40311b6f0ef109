"""The admin API: upload and apply, list, inspect, download, revert and compact patches, and
drop single edits from a memory patch.

Every route needs `Authorization: Bearer <EDIT_SERVE_ADMIN_TOKEN>`; a server started without
a token refuses every admin call.
"""

from __future__ import annotations

import hmac
from typing import Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from edit_serve.api.errors import APIError
from edit_serve.api.watch import Watched
from edit_serve.compaction import compact as run_compaction
from edit_serve.config import DEFAULT_COMPACT_TOLERANCE
from edit_serve.dry_run import guarded_add, guarded_report
from edit_serve.service import PatchService
from patches.memory import MAX_ROWS


class DropBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    requests: list[int] = Field(min_length=1, max_length=MAX_ROWS, description=(  # a patch has no more requests
        "the edits to drop: indices into the patch's requests, from 0 (GET /v1/patches/{id} lists them)"))


def require_token(token: str | None):
    def check(request: Request) -> None:
        challenge = {"WWW-Authenticate": "Bearer"}
        if not token:
            raise APIError(401, "the admin API is disabled: start the server with EDIT_SERVE_ADMIN_TOKEN set",
                           code="admin_disabled", headers=challenge)
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise APIError(401, "missing or wrong admin token (Authorization: Bearer $EDIT_SERVE_ADMIN_TOKEN)",
                           code="invalid_token", headers=challenge)

    return check


def router(get_service, token: str | None, get_editor=None) -> APIRouter:
    r = APIRouter(prefix="/v1", dependencies=[Depends(require_token(token))])

    @r.get("/weights/digest")
    async def digests(names: list[str] = Query(..., description="parameter names")):
        """sha256 of the exact bytes of the named weights, as the engine holds them now."""
        service: PatchService = get_service()
        if len(names) > 1024:
            raise APIError(400, "at most 1024 names per call", param="names")
        return {"version": service.engine.version, "digests": await service.engine.weight_digests(names)}

    @r.post("/patches", status_code=201)
    async def upload(request: Request,
                     dry_run: bool = Query(False, description="report what the patch would do; apply nothing"),
                     guard: float | None = Query(None, ge=0, le=1, description=(
                         "apply only if the live edits' retention and probe-set locality fall by at most this"))):
        service: PatchService = get_service()
        data = await request.body()  # the app's Guard refuses a body over max_patch_bytes
        patch = await service.parse(data)
        editor = Watched(get_editor(), request)  # a measurement stops if the client goes away (499)
        if dry_run:
            return JSONResponse(await guarded_report(service, editor, patch, guard))
        change, measured = await guarded_add(service, editor, patch, data, guard)
        return {"id": change.id, "version": change.version, "applied": True,
                "patch": service.describe(change.patch), **({"guard": measured} if measured else {})}

    @r.post("/patches/compact")
    async def compact(request: Request, tolerance: float = Query(DEFAULT_COMPACT_TOLERANCE, ge=0, le=1, description=(
                          "refuse if edit retention or probe-set locality would fall by more than this")),
                      dry_run: bool = Query(False, description="report what compaction would do; change nothing"),
                      kind: Literal["delta", "memory"] = Query("delta", description=(
                          "which active patches to replace by one: weight patches (delta) or SERAC's memory "
                          "patches (memory)"))):
        """Replace the active weight patches (or memory patches) by one that makes the same
        change, as one change; nothing changes if the client goes away before the change (499)."""
        return await run_compaction(get_service(), Watched(get_editor(), request), tolerance, dry_run, kind)

    @r.post("/patches/{patch_id}/drop")
    async def drop(patch_id: str, body: DropBody):
        """Replace an active memory patch by one without some of its edits, as one change."""
        change = await get_service().drop_edits(patch_id, body.requests)
        return {"id": change.id, "replaced": patch_id, "version": change.version,
                "requests": len(change.patch.requests), "rows": len(change.patch.memory["rows"])}

    @r.get("/patches")
    async def listing(requests: int | None = Query(None, ge=0, description=(
            "the most requests to list per patch (all when absent; each patch's n_requests counts them all): "
            "a merged memory patch can hold 100,000"))):
        service: PatchService = get_service()
        probes = await service.probe_report()
        return {"version": service.engine.version, "patches": service.listing(probes, requests),
                "probes": probes.to_dict() if probes is not None else None}

    @r.get("/patches/{patch_id}")
    async def show(patch_id: str, download: bool = False):
        service: PatchService = get_service()
        patch = service.get(patch_id)
        if download:
            return FileResponse(service.store.path(patch.id), media_type="application/octet-stream",
                                filename=f"{patch.id}.safetensors")
        return {**service.describe(patch, probes=await service.probe_report()), "summary": patch.summary()}

    @r.delete("/patches/{patch_id}")
    async def revert(patch_id: str):
        service: PatchService = get_service()
        change = await service.revert(patch_id)
        return {"id": change.id, "version": change.version, "reverted": True}

    return r
