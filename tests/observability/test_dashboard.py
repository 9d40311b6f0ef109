"""Every metric the Grafana dashboards in k8s/ query is exported by a live server, so the
dashboard cannot drift from the code."""

from __future__ import annotations

import json
import re
from pathlib import Path

from tests.observability.conftest import scrape

K8S = Path(__file__).resolve().parents[2] / "k8s"
SUFFIXES = {"histogram": ("_bucket", "_sum", "_count"), "counter": ("_total",), "gauge": ("",)}


def queries(node) -> list[str]:
    """Every PromQL string in a dashboard: panel targets, annotations, template variables."""
    if isinstance(node, dict):
        found = [v for k, v in node.items() if k in ("expr", "query") and isinstance(v, str)]
        return found + [q for v in node.values() for q in queries(v)]
    if isinstance(node, list):
        return [q for v in node for q in queries(v)]
    return []


def test_dashboard_metrics_are_exported_by_the_live_server(server):
    dashboards = [p for p in K8S.rglob("*.json") if "panels" in json.loads(p.read_text())]
    assert dashboards
    live = scrape(server)
    exported = set(live.samples)
    for family, kind in live.types.items():  # a family with no sample yet still declares its series
        exported |= {family + s for s in SUFFIXES.get(kind, ())}
    for path in dashboards:
        used = {m for q in queries(json.loads(path.read_text())) for m in re.findall(r"\bedit_serve_\w+", q)}
        assert len(used) >= 10, path
        missing = sorted(used - exported)
        assert not missing, f"{path.name} queries metrics the server does not export: {missing}"
