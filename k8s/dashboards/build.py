"""Writes the Grafana dashboard (dashboards/edit-serve.json) and the ConfigMap that Grafana's
dashboard sidecar loads (dashboards/configmap.yaml) from the panel list below.

Run `python k8s/dashboards/build.py` after changing a panel; tests/k8s checks both files are
up to date and that every metric a query uses is exported by a live server.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
SEL = 'replica=~"$replica"'
COMPLETIONS = 'endpoint=~"/v1/completions|/v1/chat/completions"'


def quantiles(metric: str, by: str = "", extra: str = "") -> list[dict]:
    """p50/p95/p99 of a histogram over 5 minutes."""
    labels = ", ".join(x for x in (SEL, extra) if x)
    group = f"le{', ' + by if by else ''}"
    legend = f"p{{q}}{' {{' + by + '}}' if by else ''}"
    return [{"expr": f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{{{labels}}}[5m])))",
             "legendFormat": legend.format(q=int(q * 100))} for q in (0.5, 0.95, 0.99)]


PANELS = [  # (title, unit, kind, targets, width)
    ("Request latency (completions)", "s", "timeseries", quantiles("edit_serve_request_duration_seconds",
                                                                   extra=COMPLETIONS), 12),
    ("Time to first token", "s", "timeseries", quantiles("edit_serve_time_to_first_token_seconds"), 12),
    ("Throughput", "reqps", "timeseries", [
        {"expr": f"sum by (endpoint) (rate(edit_serve_requests_total{{{SEL}}}[5m]))", "legendFormat": "{{endpoint}}"},
    ], 8),
    ("Generated tokens per second", "short", "timeseries", [
        {"expr": f"sum by (replica) (rate(edit_serve_generated_tokens_total{{{SEL}}}[5m]))",
         "legendFormat": "{{replica}}"},
    ], 8),
    ("Errors (5xx share)", "percentunit", "timeseries", [
        {"expr": f'sum(rate(edit_serve_requests_total{{{SEL}, status=~"5.."}}[5m])) / '
                 f"clamp_min(sum(rate(edit_serve_requests_total{{{SEL}}}[5m])), 1e-9)", "legendFormat": "5xx"},
    ], 8),
    ("Device memory", "bytes", "timeseries", [
        {"expr": f"edit_serve_device_memory_bytes{{{SEL}}}", "legendFormat": "{{replica}} {{device}} {{kind}}"},
    ], 12),
    ("Active patches", "short", "timeseries", [
        {"expr": f"edit_serve_active_patches{{{SEL}}}", "legendFormat": "{{replica}}"},
    ], 6),
    ("Patch-set version", "short", "table", [
        {"expr": f"edit_serve_patchset_info{{{SEL}}}", "legendFormat": "{{replica}} {{version}}", "format": "table",
         "instant": True},
    ], 6),
    ("Locality and edit retention", "percentunit", "timeseries", [
        {"expr": f"edit_serve_locality_ratio{{{SEL}}}", "legendFormat": "locality {{replica}}"},
        {"expr": f"edit_serve_edit_retention_ratio{{{SEL}}}", "legendFormat": "retention {{replica}}"},
    ], 18),
    ("Locality probe prompts counted", "short", "timeseries", [
        {"expr": f"edit_serve_locality_probe_prompts{{{SEL}}}", "legendFormat": "{{replica}}"},
    ], 6),
    ("Patch apply / revert duration (p95)", "s", "timeseries", [
        {"expr": f"histogram_quantile(0.95, sum by (le, op) (rate(edit_serve_patch_apply_duration_seconds_bucket"
                 f"{{{SEL}}}[5m])))", "legendFormat": "{{op}}"},
    ], 12),
    ("Edit computation time (p50)", "s", "timeseries", [
        {"expr": f"histogram_quantile(0.5, sum by (le, method) (rate(edit_serve_edit_duration_seconds_bucket"
                 f"{{{SEL}}}[15m])))", "legendFormat": "{{method}}"},
    ], 12),
    ("Edits pending (waiting for their turn or being computed)", "short", "timeseries", [
        {"expr": f"edit_serve_edits_pending{{{SEL}}}", "legendFormat": "{{replica}}"},
    ], 12),
]

ANNOTATIONS = [  # patch applies and reverts, as marks on every time series
    ("Patch applied", "green", "apply"),
    ("Patch reverted", "orange", "revert"),
]


def dashboard() -> dict:
    panels, x, y = [], 0, 0
    for i, (title, unit, kind, targets, width) in enumerate(PANELS, 1):
        if x + width > 24:
            x, y = 0, y + 8
        panel = {"id": i, "title": title, "type": kind, "datasource": DATASOURCE,
                 "gridPos": {"x": x, "y": y, "w": width, "h": 8},
                 "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                 "targets": [{"refId": chr(65 + j), "datasource": DATASOURCE, **t} for j, t in enumerate(targets)]}
        if unit == "percentunit":
            panel["fieldConfig"]["defaults"].update(min=0, max=1)
        panels.append(panel)
        x += width
    annotations = [{"builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"}, "enable": True,
                    "hide": True, "iconColor": "rgba(0, 211, 255, 1)", "name": "Annotations & Alerts",
                    "type": "dashboard"}]
    for name, color, op in ANNOTATIONS:
        annotations.append({
            "name": name, "datasource": DATASOURCE, "enable": True, "iconColor": color, "step": "30s",
            "expr": f'sum by (replica) (increase(edit_serve_patch_apply_duration_seconds_count{{{SEL}, op="{op}"}}'
                    "[1m])) > 0",
            "titleFormat": name, "textFormat": "{{replica}}", "useValueForTime": False})
    return {
        "uid": "edit-serve", "title": "edit_serve", "tags": ["edit_serve", "llm"], "timezone": "browser",
        "schemaVersion": 39, "version": 1, "refresh": "30s", "time": {"from": "now-6h", "to": "now"},
        "annotations": {"list": annotations},
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus"},
            {"name": "replica", "label": "Replica", "type": "query", "datasource": DATASOURCE,
             "query": {"query": "label_values(edit_serve_patchset_info, replica)", "refId": "replica"},
             "includeAll": True, "multi": True, "allValue": ".*", "refresh": 2,
             "current": {"text": "All", "value": "$__all"}},
        ]},
        "panels": panels,
    }


def configmap(text: str) -> str:
    body = "\n".join("    " + line for line in text.splitlines())
    return ("# Generated by k8s/dashboards/build.py from edit-serve.json; do not edit by hand.\n"
            "# Grafana's dashboard sidecar loads ConfigMaps labelled grafana_dashboard=\"1\" (kube-prometheus-stack:\n"
            "# in Grafana's own namespace unless sidecar.dashboards.searchNamespace is set).\n"
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: edit-serve-dashboard\n  namespace: monitoring\n"
            "  labels:\n    grafana_dashboard: \"1\"\n    app.kubernetes.io/part-of: edit-serve\n"
            f"data:\n  edit-serve.json: |\n{body}\n")


def render() -> dict[Path, str]:
    text = json.dumps(dashboard(), indent=2) + "\n"
    return {HERE / "edit-serve.json": text, HERE / "configmap.yaml": configmap(text)}


if __name__ == "__main__":
    for path, text in render().items():
        path.write_text(text)
        print(f"wrote {path}")
