"""Errors in OpenAI's JSON shape: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from edit_serve.api.watch import GONE
from edit_serve.engines.base import EngineError, ReplicaError
from editors import EditCancelled, EditError
from edit_serve.service import Conflict, NotFound
from edit_serve.store import StoreError
from patches import PatchError

log = logging.getLogger(__name__)

TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
         404: "not_found_error", 409: "conflict_error", 413: "invalid_request_error",
         422: "invalid_request_error", 429: "rate_limit_error", 503: "server_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.headers = status, message, code, param, headers


def error_response(status: int, message: str, code: str | None = None, param: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": TYPES.get(status, "server_error"), "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api(request: Request, e: APIError):
        return error_response(e.status, e.message, e.code, e.param, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(x) for x in first.get("loc", ()) if x not in ("body",)]
        param = ".".join(loc) or None
        message = f"{param}: {first['msg']}" if param else first["msg"]
        return error_response(400, message, "invalid_value", param)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, e: HTTPException):
        code = "too_large" if e.status_code == 413 else None
        return error_response(e.status_code, str(e.detail), code, headers=getattr(e, "headers", None))

    @app.exception_handler(PatchError)
    async def _patch(request: Request, e: PatchError):
        return error_response(400, str(e), "invalid_patch")

    @app.exception_handler(EngineError)
    async def _engine(request: Request, e: EngineError):
        return error_response(400, str(e), "invalid_request")

    @app.exception_handler(EditError)
    async def _edit(request: Request, e: EditError):
        return error_response(400, str(e), "invalid_edit")

    @app.exception_handler(EditCancelled)
    async def _gone(request: Request, e: EditCancelled):
        # a computation a route does not stop itself stops only as its client goes away
        # (edit_serve.api.watch): nothing was changed, and nobody reads the answer
        return Response(status_code=GONE)

    @app.exception_handler(ReplicaError)
    async def _replica(request: Request, e: ReplicaError):
        return error_response(503, str(e), "replica_failed")

    @app.exception_handler(StoreError)
    async def _store(request: Request, e: StoreError):
        return error_response(503, str(e), "store_unavailable")

    @app.exception_handler(NotFound)
    async def _missing(request: Request, e: NotFound):
        return error_response(404, str(e), "patch_not_found")

    @app.exception_handler(Conflict)
    async def _conflict(request: Request, e: Conflict):
        return error_response(409, str(e), e.code)

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, f"internal server error: {type(e).__name__}: {e}".splitlines()[0])
