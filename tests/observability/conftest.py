"""A live `edit_serve serve` (real SmolLM2, probes every 10 s) shared by the observability
tests, a Prometheus scrape parser, and hand-built patches."""

from __future__ import annotations

import time

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from patches import Patch, PatchStack
from tests.servers import run_server

PROBE_INTERVAL_S = 10.0


@pytest.fixture(scope="package")
def server(tmp_path_factory):
    with run_server(tmp_path_factory.mktemp("observability") / "store",
                    "--probe-interval", str(PROBE_INTERVAL_S)) as s:
        s.first_scrape = httpx.get(s.url + "/metrics", timeout=30).text  # before any other request or patch
        yield s


class Scrape:
    """One parsed /metrics answer: family name -> type, and sample values by name and labels."""

    def __init__(self, text: str):
        self.types: dict[str, str] = {}
        self.samples: dict[str, list[tuple[dict, float]]] = {}
        for family in text_string_to_metric_families(text):
            self.types[family.name] = family.type
            for s in family.samples:
                self.samples.setdefault(s.name, []).append((s.labels, s.value))

    def value(self, name: str, **labels) -> float:
        """The value of the one sample of `name` whose labels include `labels` (0 if none)."""
        hits = [v for lab, v in self.samples.get(name, []) if labels.items() <= lab.items()]
        assert len(hits) <= 1, f"{name}{labels} matches {len(hits)} samples"
        return hits[0] if hits else 0.0


def scrape(server) -> Scrape:
    r = httpx.get(server.url + "/metrics", timeout=30)
    r.raise_for_status()
    assert r.headers["content-type"].startswith("text/plain")
    return Scrape(r.text)


def wait_for_probes(server, version: str, timeout: float) -> tuple[dict, float]:
    """The first probe report for patch-set `version` (from GET /v1/patches) and the seconds
    it took to appear."""
    started = time.monotonic()
    with server.admin() as admin:
        while True:
            report = admin.get("/v1/patches").json()["probes"]
            if report and report["version"] == version:
                return report, time.monotonic() - started
            if time.monotonic() - started > timeout:
                raise AssertionError(f"no probe report for {version} in {timeout} s (last: {report})")
            time.sleep(0.1)


def random_patch(lm, layer: int, scale: float, requests: list[dict], seed: int = 0) -> Patch:
    """A dense random delta on one MLP's output projection, stamped for the real model."""
    name = lm.profile.mlp_out(layer) + ".weight"
    w = lm.model.get_parameter(name)
    g = torch.Generator().manual_seed(seed)
    delta = torch.randn(w.shape, generator=g) * scale  # (d, d_ff)
    stack = PatchStack(lm.model, base_model=lm.profile.name, architecture=lm.profile.architecture)
    return stack.stamp(Patch(kind="delta", method="manual", base_model="", base_fingerprint="",
                             tensors={f"delta.{name}.full": delta}, requests=requests))
