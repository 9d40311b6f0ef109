"""A real Prometheus for tests: the `prometheus` binary (Debian package `prometheus`, which
`make test` installs) started directly on loopback with a temporary data folder, scraping
given targets every second with the alerting rules of k8s/alerts loaded; and every PromQL
expression of the Grafana dashboards and the alert rules, to evaluate through its HTTP API."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import yaml

from tests.servers import free_port, wait_ready

K8S = Path(__file__).resolve().parents[1] / "k8s"
RULES = K8S / "alerts" / "edit-serve-rules.yaml"
JOB = "edit-serve"
COMPARISON = re.compile(r"^(?P<measure>.*\S)\s*(?:<|>|<=|>=|==|!=)\s*[0-9.eE+-]+$", re.S)


class Prometheus:
    def __init__(self, url: str, proc: subprocess.Popen, log: Path):
        self.url, self.proc, self.log = url, proc, log

    def query(self, expr: str) -> dict:
        """The `data` of an instant query; raises with Prometheus' own error message."""
        r = httpx.get(self.url + "/api/v1/query", params={"query": expr}, timeout=30)
        body = r.json()
        if body.get("status") != "success":
            raise AssertionError(f"{expr}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def rules(self) -> list[dict]:
        r = httpx.get(self.url + "/api/v1/rules", timeout=30)
        r.raise_for_status()
        return [rule for group in r.json()["data"]["groups"] for rule in group["rules"]]

    def wait_for_target(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(s["value"][1] == "1" for s in self.query(f'up{{job="{JOB}"}}')["result"]):
                return
            time.sleep(0.5)
        raise AssertionError(f"Prometheus did not scrape its target in {timeout} s:\n{self.log.read_text()[-2000:]}")


def tool(name: str = "prometheus") -> str:
    """Path of a program of the Debian package `prometheus` (prometheus, promtool)."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is missing: `make test` installs it (Debian package prometheus), "
                    "or apt-get install prometheus")
    return path


@contextmanager
def run_prometheus(folder: Path, target: str):
    """Prometheus scraping `target` (host:port) every second, rules evaluated every second."""
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": [target]}]}],
    }))
    port = free_port()
    log = folder / "prometheus.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([tool(), f"--config.file={config}", f"--storage.tsdb.path={folder / 'data'}",
                                 f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    prom = Prometheus(f"http://127.0.0.1:{port}", proc, log)
    try:
        wait_ready(proc, prom.url + "/-/ready", "prometheus", 60, log.read_text)
        yield prom
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _strings(node, keys: tuple[str, ...]) -> list[str]:
    if isinstance(node, dict):
        found = [v for k, v in node.items() if k in keys and isinstance(v, str)]
        return found + [q for v in node.values() for q in _strings(v, keys)]
    if isinstance(node, list):
        return [q for v in node for q in _strings(v, keys)]
    return []


def dashboard_expressions() -> list[str]:
    """Every PromQL expression of the Grafana dashboards in k8s/, with template variables
    resolved as Grafana would for "All": `$replica` matches everything, and
    `label_values(metric, label)` becomes the series query `metric`. The datasource
    variable's query (`prometheus`, a plugin type) is not PromQL and is left out."""
    exprs = []
    for path in sorted(K8S.rglob("*.json")):
        dashboard = json.loads(path.read_text())
        if "panels" not in dashboard:
            continue
        datasource_queries = {v.get("query") for v in dashboard.get("templating", {}).get("list", [])
                              if v.get("type") == "datasource"}
        for expr in _strings(dashboard, ("expr", "query")):
            if expr in datasource_queries:
                continue
            expr = re.sub(r"^label_values\((\w+(?:\{[^}]*\})?),\s*\w+\)$", r"\1", expr.strip())
            exprs.append(expr.replace("$replica", ".*").replace("$__rate_interval", "1m"))
    return list(dict.fromkeys(exprs))


def alert_expressions() -> list[tuple[str, str, str]]:
    """(alert, expression, measure) of every rule in k8s/alerts: the measure is the expression
    without its final threshold comparison, which must return data on a live deployment."""
    out = []
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            match = COMPARISON.match(rule["expr"].strip())
            assert match, f"{rule['alert']}: the expression must end in `<comparison> <threshold>`"
            out.append((rule["alert"], rule["expr"], match["measure"]))
    return out


def check_every_expression(prom: Prometheus) -> dict[str, list[dict]]:
    """Evaluate every dashboard and alert expression; assert none errs and each (for alerts:
    its measure) returns data. Returns the results by expression."""
    results, empty = {}, []
    for expr in dashboard_expressions():
        results[expr] = prom.query(expr)["result"]
        if not results[expr]:
            empty.append(expr)
    for name, expr, measure in alert_expressions():
        prom.query(expr)  # the full rule parses and evaluates (firing or not)
        results[measure] = prom.query(measure)["result"]
        if not results[measure]:
            empty.append(f"{name}: {measure}")
    assert not empty, "expressions without data:\n" + "\n".join(empty)
    return results
