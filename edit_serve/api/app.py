"""The FastAPI application of one serving process (the embedded topology)."""

from __future__ import annotations

import asyncio
import logging
import uuid
from contextlib import asynccontextmanager
from types import SimpleNamespace

from fastapi import FastAPI, Response
from fastapi.routing import APIRoute
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException

from edit_serve.api import admin, edits, errors, openai_api
from edit_serve.api.edits import Editor
from edit_serve.api.errors import APIError, error_response
from edit_serve.config import ServerConfig
from edit_serve.engines import build_engine
from edit_serve.engines.base import Engine
from edit_serve.edit_process import ChildEditor
from edit_serve.metrics import Metrics, RequestMetrics, combine_expositions
from edit_serve.probes import ProbeRunner, read_probe_file
from edit_serve.service import PatchService, RestoreError
from edit_serve.store import PatchStore, StoreError

log = logging.getLogger(__name__)


class Guard:
    """ASGI middleware: the one size limit on request bodies, and the patch-set version on
    every response (unless the route already named the one it ran under).

    A body is refused with 413 as soon as it passes the route's limit, whether it declared
    its length or came in chunks: from the Content-Length header before anything is read,
    else while it is read (the bytes are counted as they arrive, never buffered past the
    limit). Any response sent before the body was read to its end (a 413, a 401 that never
    looked at the body) closes the connection, so the rest of the body is never read."""

    def __init__(self, app, get_version, max_request_bytes: int, max_patch_bytes: int):
        self.app, self.get_version = app, get_version
        self.max_request_bytes, self.max_patch_bytes = max_request_bytes, max_patch_bytes

    def limit(self, scope) -> int:
        """Patch uploads may be large; every other body is a JSON request."""
        return self.max_patch_bytes if scope["path"].startswith("/v1/patches") else self.max_request_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit(scope)
        headers = dict(scope["headers"])
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > limit:
            response = error_response(413, f"request body of {int(length)} bytes is over this server's "
                                           f"limit of {limit} bytes", "too_large", headers={"connection": "close"})
            return await response(scope, receive, send)
        received, unread = 0, bool(length.isdigit() and int(length)) or b"transfer-encoding" in headers

        async def counted():
            nonlocal received, unread
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                unread = unread and message.get("more_body", False)
                if received > limit:
                    raise HTTPException(413, f"request body is over this server's limit of {limit} bytes")
            return message

        async def stamped(message):
            if message["type"] == "http.response.start":
                out = MutableHeaders(scope=message)
                version = self.get_version()
                if openai_api.VERSION_HEADER not in out and version is not None:
                    out[openai_api.VERSION_HEADER] = version
                if unread:
                    out["connection"] = "close"
            await send(message)

        await self.app(scope, counted, stamped)


class StartupErrors:
    """ASGI middleware: when start-up fails for a reason the operator can fix (a damaged or
    unwritable patch store, a log that does not fit the model), the server reports it in one
    line that names the fix, instead of the traceback Starlette hands to uvicorn."""

    def __init__(self, app, get_reason):
        self.app, self.get_reason = app, get_reason

    async def __call__(self, scope, receive, send):
        if scope["type"] != "lifespan":
            return await self.app(scope, receive, send)

        async def one_line(message):
            if message["type"] == "lifespan.startup.failed" and self.get_reason():
                message = {**message, "message": self.get_reason()}
            await send(message)

        await self.app(scope, receive, one_line)


async def _warm(editor: Editor, state: SimpleNamespace) -> None:
    """Get the editor ready for a first edit while the server serves (ServerConfig.warm_editor;
    GET /health's `editor`); an edit sent meanwhile waits for it, as it would for its own
    statistics."""
    log.info("warming the editor: its model copy and the key statistics of a first edit")
    state.editor_state = "warming"
    try:
        seconds = await editor.warm(f"warm-{uuid.uuid4().hex}")
    except Exception as e:  # the first edit computes what it needs, as without warming
        state.editor_state = "warm-up failed"
        log.warning("warming the editor failed (%s); the first edit computes what it needs", e)
    else:
        state.editor_state = "warm"
        log.info("the editor is warm (%.1f s)", seconds)


def create_app(config: ServerConfig, engine: Engine | None = None, editor: Editor | None = None,
               metrics: Metrics | None = None, remote_metrics=None) -> FastAPI:
    """The app; the engine is built (or the given one started) when the server starts.

    The embedded server passes nothing. The Ray ingress passes its replica-group engine, the
    editor actor, its own metrics, and `remote_metrics` (an async callable returning the
    replicas' expositions, merged into GET /metrics)."""
    state = SimpleNamespace(engine=None, service=None, editor=editor, startup_error=None, editor_state=None)
    if metrics is None:
        metrics = Metrics()
        metrics.track_engine(lambda: state.engine)
    probing = config.probes
    probe_prompts = read_probe_file(probing.probe_set) if probing.enabled and probing.probe_set else None

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        try:
            store = PatchStore(config.patch_store)
            await asyncio.to_thread(store.check)  # a damaged log fails before the model loads
        except StoreError as e:
            state.startup_error = f"cannot start: {e}"
            raise
        eng = engine or await asyncio.to_thread(build_engine, config.engine)
        await eng.start()
        probes = (ProbeRunner(eng, probing, lambda: service.active, metrics, probe_prompts)
                  if probing.enabled else None)
        service = PatchService(eng, store, config.max_patch_bytes, metrics, probes)
        try:
            if probes is not None:
                await probes.prepare()  # on the unedited model, before the log is replayed
            await service.restore()
        except BaseException as e:
            if isinstance(e, (RestoreError, StoreError)):
                state.startup_error = f"cannot start: {e}"
            await eng.stop()
            raise
        state.engine, state.service = eng, service
        owned = None
        if state.editor is None:
            state.editor = owned = ChildEditor(config.engine, service.store.root,
                                               background=config.engine.device == "cpu")
        if probes is not None:
            probes.start()
        warming = asyncio.create_task(_warm(state.editor, state), name="warm-editor") if config.warm_editor else None
        log.info("serving %s (engine %s) with patch set %s; patch store %s",
                 eng.model_name, config.engine.engine, eng.version, config.patch_store)
        yield
        if warming is not None:
            warming.cancel()
            await asyncio.gather(warming, return_exceptions=True)
        if owned is not None:
            await asyncio.to_thread(owned.close)
        if probes is not None:
            await probes.stop()
        await eng.stop()

    def get(name: str):
        def getter():
            value = getattr(state, name)
            if value is None:
                raise APIError(503, "the server is starting", code="starting")
            return value

        return getter

    app = FastAPI(title="edit_serve", lifespan=lifespan)
    app.state.metrics = metrics
    errors.install(app)
    token = config.admin_token.get_secret_value() if config.admin_token else None
    app.include_router(openai_api.router(get("engine"), metrics.observe_events))
    app.include_router(admin.router(get("service"), token, get("editor")))
    app.include_router(edits.router(get("service"), get("editor"), token, metrics))

    @app.get("/health")
    async def health():
        eng = get("engine")()
        health = {"status": "ok", "model": eng.model_name, "version": eng.version, "active_patches": len(eng.active)}
        if state.editor_state is not None:  # serve --warm-editor: "warming", "warm" or "warm-up failed"
            health["editor"] = state.editor_state
        return health

    @app.get("/metrics", include_in_schema=False)
    async def prometheus():
        body, content_type = metrics.render()
        if remote_metrics is not None:
            body = combine_expositions([body, *await remote_metrics()])
        return Response(body, media_type=content_type)

    from editors import list_editors

    # every route and editing method has its series from the first scrape (value 0)
    metrics.declare(endpoints=[r.path for r in app.routes if isinstance(r, APIRoute)], methods=list_editors())
    app.add_middleware(Guard, get_version=lambda: state.engine.version if state.engine else None,
                       max_request_bytes=config.max_request_bytes, max_patch_bytes=config.max_patch_bytes)
    app.add_middleware(RequestMetrics, metrics=metrics)  # times everything, refusals included
    app.add_middleware(StartupErrors, get_reason=lambda: state.startup_error)
    return app
