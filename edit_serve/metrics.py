"""Prometheus metrics of one serving process (or one Ray replica).

Every app owns its own `CollectorRegistry`, so several apps in one process never clash. The
metric names below are a contract with the Grafana dashboard in `k8s/`; keep them. Each
series carries a constant `replica` label ("embedded" for the one-process server, the
replica's name on Ray Serve).

Every labelled series whose label values are known in advance (apply, revert and compact, each route
with status 200 and 500, each editing method) is created at start with value 0, so a
dashboard shows 0 rather than "no data" and `rate()` works from the first scrape.

Counters and histograms are updated as things happen (`RequestMetrics` middleware for the
HTTP side, `observe_events` around an engine's event stream, `PatchService` for apply, compact and
revert); gauges that mirror live state (memory, active patches, patch-set version) are read
from the engine at scrape time, so they are never stale.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator, Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from edit_serve.engines.base import Engine, Event, Finished, TextDelta

PREFIX = "edit_serve_"
#: (name without prefix, type) of every family this module exports; the dashboard test
#: and the docs read this list
FAMILIES = {
    "request_duration_seconds": "histogram",
    "time_to_first_token_seconds": "histogram",
    "generated_tokens_total": "counter",
    "requests_total": "counter",
    "device_memory_bytes": "gauge",
    "patch_apply_duration_seconds": "histogram",
    "edit_duration_seconds": "histogram",
    "edits_pending": "gauge",
    "active_patches": "gauge",
    "patchset_info": "gauge",
    "edit_retention_ratio": "gauge",
    "locality_ratio": "gauge",
    "locality_probe_prompts": "gauge",
}

# Bucket bounds in seconds, sized for a CPU-served small model up to a GPU-served large one.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
APPLY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
EDIT_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
#: label values created at start: patch operations, and the statuses every route starts with
OPS = ("apply", "revert", "compact")
STATUSES = ("200", "500")


class _EngineState(Collector):
    """Gauges read from the engine when Prometheus scrapes."""

    def __init__(self, get_engine: Callable[[], Engine | None], replica: str):
        self.get_engine, self.replica = get_engine, replica

    def describe(self):  # registered without calling collect() on an engine that is not there yet
        names = ("device_memory_bytes", "active_patches", "patchset_info")
        return [GaugeMetricFamily(PREFIX + name, "") for name in names]

    def collect(self):
        memory = GaugeMetricFamily(PREFIX + "device_memory_bytes",
                                   "Memory in use: GPU allocated and reserved on a GPU, process resident on a CPU.",
                                   labels=["replica", "device", "kind"])
        active = GaugeMetricFamily(PREFIX + "active_patches", "Patches applied now.", labels=["replica"])
        info = GaugeMetricFamily(PREFIX + "patchset_info", "The active patch-set version (value 1).",
                                 labels=["replica", "version"])
        engine = self.get_engine()
        if engine is not None:
            for (device, kind), value in engine.memory().items():
                memory.add_metric([self.replica, device, kind], value)
            active.add_metric([self.replica], len(engine.active))
            info.add_metric([self.replica, engine.version], 1)
        yield from (memory, active, info)


class Metrics:
    """The metrics of one app; `replica` is a constant label on every series."""

    def __init__(self, replica: str = "embedded"):
        self.replica = replica
        self.registry = CollectorRegistry()
        r, rep = self.registry, ["replica"]
        self.request_duration = Histogram(PREFIX + "request_duration_seconds", "HTTP request duration, until the "
                                          "last byte of the response (streams included).", rep + ["endpoint"],
                                          registry=r, buckets=LATENCY_BUCKETS)
        self.requests = Counter(PREFIX + "requests", "HTTP requests by endpoint and status code.",
                                rep + ["endpoint", "status"], registry=r)
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Time from submitting a generation to its "
                              "first output (one observation per API call).", rep, registry=r, buckets=TTFT_BUCKETS)
        self.tokens = Counter(PREFIX + "generated_tokens", "Completion tokens generated for API calls.", rep,
                              registry=r)
        self.apply_duration = Histogram(PREFIX + "patch_apply_duration_seconds", "Time to apply, revert or compact "
                                        "patches on the engine (weights changed between forward passes).", rep + ["op"],
                                        registry=r, buckets=APPLY_BUCKETS)
        self.edit_duration = Histogram(PREFIX + "edit_duration_seconds", "Time to compute an edit, by method.",
                                       rep + ["method"], registry=r, buckets=EDIT_BUCKETS)
        self.edits_pending = Gauge(PREFIX + "edits_pending", "Edits received by POST /v1/edits and not answered yet: "
                                   "waiting for their turn or being computed.", rep, registry=r)
        self.retention = Gauge(PREFIX + "edit_retention_ratio", "Share of active edits whose target is still the "
                               "greedy answer (NaN while no edit is active).", rep, registry=r)
        self.locality = Gauge(PREFIX + "locality_ratio", "Share of probe prompts whose greedy answer is unchanged "
                              "from the unedited model, prompts naming an active edit's subject left out (NaN "
                              "before the first probe).", rep, registry=r)
        self.locality_prompts = Gauge(PREFIX + "locality_probe_prompts", "Probe prompts the locality ratio counts: "
                                      "the probe set less the prompts naming an active edit's subject (NaN before the "
                                      "first probe).", rep, registry=r)
        for gauge in (self.retention, self.locality, self.locality_prompts):
            gauge.labels(self.replica).set(math.nan)
        self.ttft.labels(self.replica)  # export the unlabelled families from the start
        self.tokens.labels(self.replica)
        self.edits_pending.labels(self.replica)
        for op in OPS:
            self.apply_duration.labels(self.replica, op)

    def declare(self, endpoints=(), methods=()) -> None:
        """Create the series of these routes (path templates) and editing methods at 0, so
        they exist before their first request or edit."""
        for endpoint in endpoints:
            self.request_duration.labels(self.replica, endpoint)
            for status in STATUSES:
                self.requests.labels(self.replica, endpoint, status)
        for method in methods:
            self.edit_duration.labels(self.replica, method)

    def track_engine(self, get_engine: Callable[[], Engine | None]) -> None:
        """Export memory, active patches and the patch-set version of the engine `get_engine` returns."""
        self.registry.register(_EngineState(get_engine, self.replica))

    # --- recording ------------------------------------------------------------------------
    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        self.request_duration.labels(self.replica, endpoint).observe(seconds)
        self.requests.labels(self.replica, endpoint, str(status)).inc()

    def observe_apply(self, op: str, seconds: float) -> None:
        self.apply_duration.labels(self.replica, op).observe(seconds)

    def observe_edit(self, method: str, seconds: float) -> None:
        self.edit_duration.labels(self.replica, method).observe(seconds)

    def set_edits_pending(self, count: int) -> None:
        self.edits_pending.labels(self.replica).set(count)

    def set_probes(self, locality: float | None, retention: float | None, prompts: int) -> None:
        self.locality.labels(self.replica).set(math.nan if locality is None else locality)
        self.retention.labels(self.replica).set(math.nan if retention is None else retention)
        self.locality_prompts.labels(self.replica).set(prompts)

    async def observe_events(self, events: AsyncIterator[tuple[int, Event]]) -> AsyncIterator[tuple[int, Event]]:
        """Pass an engine's event stream through, recording time to first output and tokens."""
        started, first = time.perf_counter(), True
        try:
            async for index, event in events:
                if first and isinstance(event, (TextDelta, Finished)):
                    self.ttft.labels(self.replica).observe(time.perf_counter() - started)
                    first = False
                if isinstance(event, Finished):
                    self.tokens.labels(self.replica).inc(event.completion_tokens)
                yield index, event
        finally:
            await events.aclose()  # a client that went away cancels the engine's rows now

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class RequestMetrics:
    """ASGI middleware: duration (to the last body byte) and count of every HTTP request,
    labelled by the route's path template (`unmatched` for unknown paths) and status."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), 500

        async def watch(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            self.metrics.observe_request(endpoint, status, time.perf_counter() - started)


class _Parsed(Collector):
    def __init__(self, families):
        self.families = families

    def collect(self):
        return self.families


def combine_expositions(texts: list[str | bytes]) -> bytes:
    """One Prometheus exposition from several (e.g. every Ray replica's `render()`): families
    of the same name are merged, so each keeps a single HELP and TYPE line. Series stay apart
    through their `replica` label; the optional `_created` series are left out."""
    from prometheus_client.parser import text_string_to_metric_families

    merged: dict[str, object] = {}
    for text in texts:
        for family in text_string_to_metric_families(text.decode() if isinstance(text, bytes) else text):
            if family.name.endswith("_created"):  # the text parser splits these off; optional, dropped
                continue
            if family.name in merged:
                merged[family.name].samples.extend(family.samples)
            else:
                merged[family.name] = family
    registry = CollectorRegistry()
    registry.register(_Parsed(list(merged.values())))
    return generate_latest(registry)
