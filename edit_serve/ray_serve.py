"""The Ray Serve application: an ingress, N model replicas, and an editor actor.

    ingress (FastAPI: OpenAI API, admin API, /v1/edits, /metrics, /health)
      |-- replica-0 .. replica-{N-1}   one engine each (num_gpus per replica on a GPU cluster)
      |-- editor                       computes patches on its own resources

Each model replica is its own Serve deployment (one replica each), so the ingress can reach
every one by name: generation goes to the least busy replica; every change (apply, revert,
compaction: one change-set each) is broadcast to all, with the new patches as parsed objects,
and answered only when every replica acknowledged; if one fails, the others are rolled back
and the error names the failing replica. Patch files live once in a shared store (a
folder every node mounts); the log there is the truth. A replica (re)starting replays the log
in its constructor, before Serve routes traffic to it, and the ingress reconciles any replica
whose patch set differs from the log (one restarted during a change, say).

Start it with `edit_serve serve --ray --replicas N`, with `serve run k8s/serve-config.yaml`, or
as a KubeRay RayService (k8s/rayservice.yaml); all use `app_builder`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from edit_serve.config import DEFAULT_PROBE_EDITS, LOG_FORMAT, EngineConfig, ProbeConfig, ServerConfig
from edit_serve.engines.base import (
    ActiveInfo, Engine, EngineError, Event, GenerationRequest, ReplicaError, Started, validate_requests,
)
from edit_serve.probes import ProbeReport
from patches import Patch, patchset_version, patchset_with, to_bytes

log = logging.getLogger(__name__)

#: how long GET /v1/patches waits for a replica's last probe report
PROBE_REPORT_TIMEOUT_S = 5.0


#: RayAppArgs keys that are EngineConfig fields, accepted flat in Serve config files
#: (`model: smollm2-135m`) and folded into `engine`
_FLAT_ENGINE_KEYS = ("model", "weights", "dtype", "device", "max_batch_size", "max_model_len",
                     "vllm_memory_utilization", "adapters", "enable_adapters")


class RayAppArgs(BaseModel):
    """Arguments of the Serve application (`args:` in a Serve config file).

    `engine` carries the whole engine configuration of the replicas (the same EngineConfig the
    embedded server uses). In a Serve config file it is either a mapping of EngineConfig
    fields or the runtime's name (`engine: hf`) with the other engine fields given flat
    (`model: ...`, `dtype: ...`)."""

    model_config = ConfigDict(extra="forbid")

    engine: EngineConfig = Field(default_factory=EngineConfig,
                                 description="Engine of every replica (and of the editor's model copy).")
    replicas: int = Field(1, ge=1, le=64, description="Model replicas (one Serve deployment each).")
    num_gpus_per_replica: float = Field(0, ge=0, description="GPUs each replica reserves.")
    num_cpus_per_replica: float = Field(
        0, ge=0, description="CPUs each replica reserves (0 lets replicas share a small machine).")
    threads_per_replica: int | None = Field(None, ge=1,
                                            description="torch threads per replica; CPU count / replicas when unset.")
    editor_num_gpus: float = Field(0, ge=0, description="GPUs the editor actor reserves.")
    editor_num_cpus: float = Field(0, ge=0, description="CPUs the editor actor reserves.")
    editor_threads: int | None = Field(None, ge=1, description="torch threads of the editor; 1 on a CPU-only cluster.")
    patch_store: str = Field(default_factory=lambda: str(_default_store()),
                             description="Folder every replica can reach (a shared volume on a cluster): patch files "
                                         "and the log; $EDIT_SERVE_PATCH_STORE or $EDIT_SERVE_CACHE/patch-store by "
                                         "default.")
    probe_interval_s: float = Field(30.0, ge=0,
                                    description="Seconds between probe runs on every replica (0: only after changes).")
    probes: bool = Field(True, description="Run locality and edit-retention probes on every replica.")
    probe_edits: int = Field(DEFAULT_PROBE_EDITS, ge=1, description="Most active edit requests one probe run measures.")
    probe_set: str | None = Field(None, description='JSONL file of locality probe prompts ({"prompt": ...} per line), '
                                                    "at a path every replica can read; default: built at start-up.")
    admin_token_env: str = Field("EDIT_SERVE_ADMIN_TOKEN", description="Environment variable holding the admin token.")
    warm_editor: bool = Field(False, description="Warm the editor actor at start (ServerConfig.warm_editor).")
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Logging level of the replicas, editor and ingress.")
    health_check_period_s: float = Field(2.0, gt=0, description="How often Serve checks each replica.")
    reconcile_interval_s: float = Field(2.0, gt=0, description="How often the ingress compares replicas with the log.")

    @model_validator(mode="before")
    @classmethod
    def _fold_engine_fields(cls, data):
        if not isinstance(data, dict):
            return data
        data = dict(data)
        flat = {k: data.pop(k) for k in _FLAT_ENGINE_KEYS if k in data}
        engine = data.get("engine", {})
        if isinstance(engine, str):
            engine = {"engine": engine}
        elif isinstance(engine, EngineConfig):
            engine = engine.model_dump(exclude_unset=True)
        if flat:
            if not isinstance(engine, dict):
                return data  # let the field's validation report it
            clash = sorted(set(flat) & set(engine))
            if clash:
                raise ValueError(f"{', '.join(clash)} given both flat and under engine: give each once")
            engine = {**engine, **flat}
        data["engine"] = engine
        return data

    @property
    def model(self) -> str:
        return self.engine.model

    def engine_config(self) -> EngineConfig:
        return self.engine

    def probe_config(self) -> ProbeConfig:
        return ProbeConfig(enabled=self.probes, interval_s=self.probe_interval_s,
                           probe_set=Path(self.probe_set) if self.probe_set else None, edits_per_run=self.probe_edits,
                           batch_size=min(ProbeConfig().batch_size, self.engine.max_batch_size))


def _default_store():
    from edit_serve.config import default_store

    return default_store()


def _log_level(args: RayAppArgs) -> None:
    """The `log_level` of the application, in this actor's process."""
    logging.basicConfig(format=LOG_FORMAT)
    for name in ("edit_serve", "editors", "patches"):
        logging.getLogger(name).setLevel(args.log_level.upper())


def _threads(args: RayAppArgs, explicit: int | None) -> int:
    return explicit or max(1, (os.cpu_count() or 1) // args.replicas)


# --- a model replica --------------------------------------------------------------------------


class ReplicaServer:
    """One engine. Its constructor loads the model and replays the patch log; Serve routes
    nothing to it before that finishes."""

    async def __init__(self, name: str, args: dict):
        import torch

        from edit_serve.engines import build_engine
        from edit_serve.metrics import Metrics
        from edit_serve.probes import ProbeRunner, read_probe_file
        from edit_serve.store import PatchStore

        self.name, self.args = name, RayAppArgs(**args)
        _log_level(self.args)
        torch.set_num_threads(_threads(self.args, self.args.threads_per_replica))
        self.engine: Engine = await asyncio.to_thread(build_engine, self.args.engine_config())
        await self.engine.start()
        self.store = PatchStore(self.args.patch_store)
        self.metrics = Metrics(replica=name)
        self.metrics.track_engine(lambda: self.engine)
        self._patches: dict[str, Patch] = {}
        self._lock = asyncio.Lock()
        self.probes = None
        if self.args.probes:
            config = self.args.probe_config()
            prompts = read_probe_file(config.probe_set) if config.probe_set else None
            self.probes = ProbeRunner(self.engine, config, lambda: list(self._patches.values()), self.metrics,
                                      prompts)
            await self.probes.prepare()
        await self.sync(self.store.active_ids())
        if self.probes is not None:
            self.probes.start()
        log.info("replica %s ready with patch set %s", name, self.engine.version)

    # --- serving ----------------------------------------------------------------------------
    async def info(self) -> dict:
        e = self.engine
        return {"name": self.name, "pid": os.getpid(), "model_name": e.model_name, "max_model_len": e.max_model_len,
                "max_tokens_limit": e.max_tokens_limit, "served_models": e.served_models,
                "version": e.version, "active": [a.id for a in e.active]}

    async def generate(self, requests: list[GenerationRequest]) -> AsyncIterator[tuple[int, Event]]:
        async for index, event in self.metrics.observe_events(self.engine.generate(requests)):
            if isinstance(event, Started):
                event = dataclasses.replace(event, replica=self.name)
            yield index, event

    async def metrics_text(self) -> bytes:
        return self.metrics.render()[0]

    async def weight_digests(self, names: list[str]) -> dict[str, str]:
        return await self.engine.weight_digests(names)

    # --- patches ------------------------------------------------------------------------------
    async def check(self, patch: Patch) -> None:
        await self.engine.check(patch)

    async def replace(self, ids: list[str], new: list[Patch], op: str) -> str:
        """Make the active patches exactly `ids`, in that order, in one engine change (`op`
        names it in the metrics). `new` brings patches as the ingress parsed them; any other
        patch that is not active here is read from the store (log replay, reconciliation,
        rollback). Idempotent: a replica that already serves `ids` changes nothing."""
        async with self._lock:
            if list(self._patches) == ids:
                return self.engine.version
            given = {p.id: p for p in new}
            for patch_id in ids:
                if patch_id not in self._patches and patch_id not in given:
                    given[patch_id] = await asyncio.to_thread(self.store.get, patch_id)
            started = time.perf_counter()
            version = await self.engine.replace(ids, [given[i] for i in ids if i not in self._patches])
            self.metrics.observe_apply(op, time.perf_counter() - started)
            self._patches = {i: self._patches.get(i) or given[i] for i in ids}
            if self.probes is not None:
                self.probes.trigger()
            return version

    async def sync(self, ids: list[str]) -> str:
        """Make the active patches exactly `ids` from the store's files (log replay, reconciliation)."""
        version = await self.replace(ids, [], "apply")
        log.info("replica %s serves %d patches (version %s)", self.name, len(ids), version)
        return version

    async def probe_report(self) -> ProbeReport | None:
        return self.probes.last if self.probes is not None else None

    async def probe_prompts(self) -> list:
        """This replica's probe set as text with the unedited answers (for dry runs)."""
        from edit_serve.dry_run import default_probe_prompts, probe_prompts

        return probe_prompts(self.probes) if self.probes is not None else default_probe_prompts()


# --- the editor actor -------------------------------------------------------------------------


class EditorServer:
    """Computes patches on its own model copy and resources (see edit_worker.EditWorker)."""

    def __init__(self, args: dict):
        from edit_serve.api.edits import LocalEditor
        from edit_serve.edit_worker import EditWorker
        from edit_serve.store import PatchStore

        self.args = RayAppArgs(**args)
        _log_level(self.args)
        threads = self.args.editor_threads or (None if self.args.editor_num_gpus else 1)
        # One dedicated thread: the actor's event loop stays free for health checks; without
        # resources of its own (no GPU, no reserved CPUs) it runs in the replicas' background,
        # so serving never slows for an edit (the edit waits for idle CPU instead).
        shared = not (self.args.editor_num_gpus or self.args.editor_num_cpus)
        self.editor = LocalEditor(EditWorker(self.args.engine_config(), PatchStore(self.args.patch_store),
                                             threads=threads, background=shared))

    async def compact(self, active: list[str], replaces: list[str], probes: list,
                      ticket: str | None = None) -> tuple[Patch, dict]:
        return await self.editor.compact(active, replaces, probes, ticket)

    async def compute(self, method: str, requests: list[dict], config: dict | None, active: list[str],
                      with_eval: bool, ticket: str | None = None) -> tuple[bytes, float]:
        patch, seconds = await self.editor.compute(method, requests, config, active, with_eval, ticket)
        return to_bytes(patch), seconds

    async def cancel(self, ticket: str) -> bool:
        return await self.editor.cancel(ticket)

    async def dry_run(self, data: bytes, active: list[str], probes: list, ticket: str | None = None) -> dict:
        from patches import from_bytes

        return await self.editor.dry_run(from_bytes(data), active, probes, ticket)

    async def warm(self, ticket: str | None = None) -> float:
        return await self.editor.warm(ticket)


class RemoteEditor:
    """The ingress's side of the editor actor (the `Editor` protocol of api/edits.py)."""

    def __init__(self, handle):
        self.handle = handle

    async def compute(self, method, requests, config, active, with_eval, ticket=None):
        from patches import from_bytes

        data, seconds = await self.handle.compute.remote(method, list(requests), dict(config or {}), list(active),
                                                         with_eval, ticket)
        return from_bytes(data), seconds

    async def cancel(self, ticket):
        return await self.handle.cancel.remote(ticket)

    async def dry_run(self, patch, active, probes, ticket=None):
        return await self.handle.dry_run.remote(to_bytes(patch), list(active), list(probes), ticket)

    async def compact(self, active, replaces, probes, ticket=None):
        return await self.handle.compact.remote(list(active), list(replaces), list(probes), ticket)

    async def warm(self, ticket=None):
        return await self.handle.warm.remote(ticket)


# --- the ingress's view of the replicas ----------------------------------------------------------


class ReplicaGroup(Engine):
    """The replicas, behind the Engine protocol, so the same PatchService and routers serve
    them: generate on one replica, check on one, apply/revert on all (with rollback)."""

    def __init__(self, handles: dict, tokenizer, info: dict, reconcile_interval_s: float):
        self.handles = handles  # name -> DeploymentHandle
        self.tokenizer = tokenizer
        self.model_name = info["model_name"]
        self.max_model_len = info["max_model_len"]
        self.max_tokens_limit = info["max_tokens_limit"]
        self._served = info["served_models"]
        self._ids: list[str] = list(info["active"])
        self._applied_at: dict[str, float] = {}
        self._methods: dict[str, str] = {}
        self._in_flight = {name: 0 for name in handles}
        self._turn = 0  # round-robin among equally busy replicas
        self._changing = asyncio.Lock()
        self._interval = reconcile_interval_s
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._reconcile_loop(), name="reconcile")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    @property
    def served_models(self) -> list[str]:
        return self._served

    @property
    def version(self) -> str:
        return patchset_version(self._ids)

    @property
    def active(self) -> list[ActiveInfo]:
        return [ActiveInfo(i, self._methods.get(i, ""), self._applied_at.get(i, 0.0)) for i in self._ids]

    # --- generation ---------------------------------------------------------------------------
    def _pick(self, exclude: set[str]) -> str:
        """The least busy replica; ties go round-robin."""
        names = [n for n in self.handles if n not in exclude] or list(self.handles)
        self._turn += 1
        return min(names, key=lambda n: (self._in_flight[n], (names.index(n) - self._turn) % len(names)))

    async def generate(self, requests: list[GenerationRequest]) -> AsyncIterator[tuple[int, Event]]:
        validate_requests(requests, max_batch_size=10**6, max_model_len=self.max_model_len,
                          max_tokens_limit=self.max_tokens_limit,
                          adapters=[m for m in self._served if m != self.model_name])
        tried: set[str] = set()
        while True:
            name = self._pick(tried)
            tried.add(name)
            started = False
            self._in_flight[name] += 1
            try:
                stream = self.handles[name].options(stream=True).generate.remote(requests)
                async for index, event in stream:
                    if isinstance(event, Started) and not started and event.version != self.version:
                        self._schedule_sync(name)
                    started = True
                    yield index, event
                return
            except EngineError:
                raise
            except Exception as e:  # noqa: BLE001 - a replica that died before answering: try another
                if started or len(tried) >= len(self.handles):
                    raise
                log.warning("replica %s failed before answering (%s); retrying on another", name, e)
            finally:
                self._in_flight[name] -= 1

    # --- patches ------------------------------------------------------------------------------
    async def check(self, patch: Patch) -> None:
        await self.handles[self._pick(set())].check.remote(patch)

    async def probe_report(self) -> ProbeReport | None:
        """The replicas' last probe runs as one: they probe the same set on the same patch set,
        so the run that reads lowest (of those on the current version, if any) stands for all,
        named in `replica`. A replica that does not answer within a few seconds (restarting)
        is left out."""
        async def ask(name):
            report = await asyncio.wait_for(self.handles[name].probe_report.remote(), PROBE_REPORT_TIMEOUT_S)
            return dataclasses.replace(report, replica=name) if report is not None else None

        results = await asyncio.gather(*(ask(n) for n in self.handles), return_exceptions=True)
        reports = [r for r in results if isinstance(r, ProbeReport)]
        current = [r for r in reports if r.version == self.version] or reports
        return min(current, default=None,
                   key=lambda r: tuple(1.0 if x is None else x for x in (r.locality, r.retention)))

    async def probe_prompts(self) -> list:
        """The probe set of one replica (all measure the same one), for dry runs."""
        return await self.handles[self._pick(set())].probe_prompts.remote()

    async def stamp(self, patch: Patch) -> Patch:
        raise NotImplementedError("on Ray Serve the editor actor stamps the patches it computes")

    async def _change(self, ids: list[str], new: list[Patch], op: str, what: str) -> str:
        """Broadcast one change-set to every replica; if one fails, roll the others back to
        the patch set of before (they read removed patches back from the store)."""
        before, names = list(self._ids), list(self.handles)
        results = await asyncio.gather(*(self.handles[n].replace.remote(ids, new, op) for n in names),
                                       return_exceptions=True)
        failed = {n: r for n, r in zip(names, results) if isinstance(r, BaseException)}
        if failed:
            done = [n for n in names if n not in failed]
            await asyncio.gather(*(self.handles[n].replace.remote(before, [], op) for n in done),
                                 return_exceptions=True)
            name, error = next(iter(failed.items()))
            reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
            raise ReplicaError(f"replica {name} failed to {what}: {reason[:300]}; "
                               f"{'rolled back on ' + ', '.join(done) if done else 'no replica changed'}")
        self._ids = ids
        for patch in new:
            self._applied_at[patch.id], self._methods[patch.id] = time.time(), patch.method
        return self.version

    async def apply(self, patch: Patch, position: int | None = None) -> str:
        async with self._changing:
            self._methods[patch.id] = patch.method
            if patch.id in self._ids:  # replicas replay the log themselves; restore re-applies
                return self.version
            return await self._change(patchset_with(self._ids, patch.id, position=position), [patch], "apply",
                                      f"apply patch {patch.id}")

    async def revert(self, patch_id: str) -> str:
        async with self._changing:
            return await self._change([i for i in self._ids if i != patch_id], [], "revert", f"revert patch {patch_id}")

    async def replace(self, ids: Sequence[str], new: Sequence[Patch]) -> str:
        async with self._changing:
            return await self._change(list(ids), list(new), "compact", f"compact into {', '.join(p.id for p in new)}")

    async def weight_digests(self, names: list[str]) -> dict[str, str]:
        results = await asyncio.gather(*(h.weight_digests.remote(names) for h in self.handles.values()))
        if any(r != results[0] for r in results):
            raise ReplicaError("replicas hold different weights for " + ", ".join(names))
        return results[0]

    # --- keeping replicas on the log's patch set ------------------------------------------------
    def _schedule_sync(self, name: str) -> None:
        if not self._changing.locked():
            asyncio.create_task(self._sync(name))

    async def _sync(self, name: str) -> None:
        async with self._changing:
            try:
                await self.handles[name].sync.remote(list(self._ids))
            except Exception as e:  # noqa: BLE001 - retried by the loop
                log.warning("cannot sync replica %s: %s", name, e)

    async def _reconcile_loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            for name, handle in self.handles.items():
                if self._changing.locked():
                    break
                try:
                    info = await handle.info.remote()
                except Exception:  # noqa: BLE001 - a replica that is down is restarted by Serve
                    continue
                if info["active"] != self._ids:
                    log.info("replica %s serves %s, the log says %s: syncing", name, info["version"], self.version)
                    await self._sync(name)

    async def remote_metrics(self) -> list[bytes]:
        results = await asyncio.gather(*(h.metrics_text.remote() for h in self.handles.values()),
                                       return_exceptions=True)
        return [r for r in results if isinstance(r, bytes)]


# --- the ingress ----------------------------------------------------------------------------------


class Ingress:
    """The HTTP entry: the same FastAPI app as the embedded server, over the replica group."""

    def __init__(self, args: dict, replicas: list, editor):
        self.args = RayAppArgs(**args)
        _log_level(self.args)
        self.replica_handles = replicas
        self.editor = editor

    async def __serve_build_asgi_app__(self):
        from transformers import AutoTokenizer

        from edit_serve.api.app import create_app
        from edit_serve.metrics import Metrics
        from edit_serve.models import weights_location
        from edit_serve.profiles import get_profile

        args = self.args
        handles = {f"replica-{i}": h for i, h in enumerate(self.replica_handles)}
        info = await next(iter(handles.values())).info.remote()
        profile = get_profile(args.engine.model)
        if args.engine.weights:
            profile = profile.with_weights(args.engine.weights)
        location = await asyncio.to_thread(weights_location, profile)
        tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, location)
        group = ReplicaGroup(handles, tokenizer, info, args.reconcile_interval_s)
        token = os.environ.get(args.admin_token_env)
        config = ServerConfig(engine=args.engine_config(), patch_store=Path(args.patch_store),
                              admin_token=token, probes=ProbeConfig(enabled=False), warm_editor=args.warm_editor)
        metrics = Metrics(replica="ingress")
        return create_app(config, engine=group, editor=RemoteEditor(self.editor), metrics=metrics,
                          remote_metrics=group.remote_metrics)


def app_builder(args: dict):
    """The Serve application (`import_path: edit_serve.ray_serve:app_builder`)."""
    from ray import serve

    parsed = RayAppArgs(**args)
    plain = parsed.model_dump()
    common = {"health_check_period_s": parsed.health_check_period_s, "health_check_timeout_s": 60,
              "max_ongoing_requests": 1000, "num_replicas": 1}
    internal = {**common, "logging_config": {"enable_access_log": False}}  # only the ingress's calls reach them
    replicas = [
        serve.deployment(ReplicaServer, name=f"replica-{i}", **internal,
                         ray_actor_options={"num_gpus": parsed.num_gpus_per_replica,
                                            "num_cpus": parsed.num_cpus_per_replica}).bind(f"replica-{i}", plain)
        for i in range(parsed.replicas)
    ]
    editor = serve.deployment(EditorServer, name="editor", **internal,
                              ray_actor_options={"num_gpus": parsed.editor_num_gpus,
                                                 "num_cpus": parsed.editor_num_cpus}).bind(plain)
    ingress = serve.deployment(serve.ingress()(Ingress), name="ingress", **common,
                               ray_actor_options={"num_cpus": 0}).bind(plain, replicas, editor)
    return ingress


def run(args: RayAppArgs, host: str, port: int, address: str | None = None) -> None:
    """Start (or join) a Ray cluster, run the application, block until SIGINT/SIGTERM."""
    import signal
    import threading

    import ray
    from ray import serve

    forwarded = {k: v for k, v in os.environ.items() if k.startswith("EDIT_SERVE_") and k != args.admin_token_env}
    forwarded.setdefault("HF_HUB_OFFLINE", os.environ.get("HF_HUB_OFFLINE", "1"))
    ray.init(address=address, include_dashboard=False, runtime_env={"env_vars": forwarded},
             logging_level=logging.WARNING)
    serve.start(http_options={"host": host, "port": port})
    serve.run(app_builder(args.model_dump()), name="edit_serve", route_prefix="/", blocking=False)
    log.info("edit_serve on Ray Serve: http://%s:%d (%d replicas)", host, port, args.replicas)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    log.info("shutting down")
    serve.shutdown()
    ray.shutdown()
