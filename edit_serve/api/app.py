"""The FastAPI application of one serving process (the embedded topology)."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from types import SimpleNamespace

from fastapi import FastAPI, Response
from fastapi.routing import APIRoute
from starlette.datastructures import MutableHeaders

from edit_serve.api import admin, edits, errors, openai_api
from edit_serve.api.edits import Editor, LocalEditor
from edit_serve.api.errors import APIError, error_response
from edit_serve.config import ServerConfig
from edit_serve.engines import build_engine
from edit_serve.engines.base import Engine
from edit_serve.edit_worker import EditWorker
from edit_serve.metrics import Metrics, RequestMetrics, combine_expositions
from edit_serve.probes import ProbeRunner, read_probe_file
from edit_serve.service import PatchService
from edit_serve.store import PatchStore

log = logging.getLogger(__name__)


class Guard:
    """ASGI middleware: refuses oversized API bodies early (413) and stamps every response
    with the active patch-set version unless the route already named the one it ran under."""

    def __init__(self, app, get_version, max_request_bytes: int):
        self.app, self.get_version, self.max_request_bytes = app, get_version, max_request_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if not scope["path"].startswith("/v1/patches"):
            length = dict(scope["headers"]).get(b"content-length", b"")
            if length.isdigit() and int(length) > self.max_request_bytes:
                response = error_response(413, f"request body of {int(length)} bytes is over this server's "
                                               f"limit of {self.max_request_bytes} bytes", "too_large")
                return await response(scope, receive, send)

        async def stamped(message):
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                version = self.get_version()
                if openai_api.VERSION_HEADER not in headers and version is not None:
                    headers[openai_api.VERSION_HEADER] = version
            await send(message)

        await self.app(scope, receive, stamped)


def create_app(config: ServerConfig, engine: Engine | None = None, editor: Editor | None = None,
               metrics: Metrics | None = None, remote_metrics=None) -> FastAPI:
    """The app; the engine is built (or the given one started) when the server starts.

    The embedded server passes nothing. The Ray ingress passes its replica-group engine, the
    editor actor, its own metrics, and `remote_metrics` (an async callable returning the
    replicas' expositions, merged into GET /metrics)."""
    state = SimpleNamespace(engine=None, service=None, editor=editor)
    if metrics is None:
        metrics = Metrics()
        metrics.track_engine(lambda: state.engine)
    probing = config.probes
    probe_prompts = read_probe_file(probing.probe_set) if probing.enabled and probing.probe_set else None

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        eng = engine or await asyncio.to_thread(build_engine, config.engine)
        await eng.start()
        probes = (ProbeRunner(eng, probing, lambda: service.active, metrics, probe_prompts)
                  if probing.enabled else None)
        service = PatchService(eng, PatchStore(config.patch_store), config.max_patch_bytes, metrics, probes)
        try:
            if probes is not None:
                await probes.prepare()  # on the unedited model, before the log is replayed
            await service.restore()
        except BaseException:
            await eng.stop()
            raise
        state.engine, state.service = eng, service
        if state.editor is None:
            state.editor = LocalEditor(EditWorker(config.engine, service.store,
                                                  background=config.engine.device == "cpu"))
        if probes is not None:
            probes.start()
        log.info("serving %s (engine %s) with patch set %s; patch store %s",
                 eng.model_name, config.engine.engine, eng.version, config.patch_store)
        yield
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
        return {"status": "ok", "model": eng.model_name, "version": eng.version, "active_patches": len(eng.active)}

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
                       max_request_bytes=config.max_request_bytes)
    app.add_middleware(RequestMetrics, metrics=metrics)  # outermost: times everything, refusals included
    return app
