"""The alerting rules in k8s/alerts: generated files up to date, accepted by `promtool check
rules` (the plain file and the PrometheusRule's groups), their unit tests pass under `promtool
test rules`, and the PrometheusRule's schema catches a mistake. promtool comes with the Debian
package `prometheus`, which `make test` installs when it is missing."""

from __future__ import annotations

import copy
import importlib.util
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.k8s.test_manifests import by_kind, validate
from tests.prometheus import tool

ALERTS = Path(__file__).resolve().parents[2] / "k8s" / "alerts"


def promtool() -> str:
    return tool("promtool")


def build():
    spec = importlib.util.spec_from_file_location("alerts_build", ALERTS / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_files_are_up_to_date():
    for path, text in build().render().items():
        assert path.read_text() == text, f"{path.name} is stale: run python k8s/alerts/build.py"


def test_promtool_accepts_the_rules(tmp_path):
    (rule,) = by_kind("PrometheusRule")
    plain = yaml.safe_load((ALERTS / "edit-serve-rules.yaml").read_text())
    assert rule["spec"]["groups"] == plain["groups"]
    alerts = {r["alert"] for g in plain["groups"] for r in g["rules"]}
    assert alerts == {"EditServeLocalityLow", "EditServeRetentionLow", "EditServeLatencyP99High",
                      "EditServePatchsetDisagreement", "EditServeErrorRateHigh", "EditServeEditsBacklog"}
    operator = tmp_path / "prometheusrule-groups.yaml"
    operator.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    out = subprocess.run([promtool(), "check", "rules", str(ALERTS / "edit-serve-rules.yaml"), str(operator)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("SUCCESS: 6 rules found") == 2, out.stdout


def test_promtool_unit_tests_pass():
    tests = yaml.safe_load((ALERTS / "tests.yaml").read_text())
    tested = {t["alertname"] for case in tests["tests"] for t in case["alert_rule_test"] if t["exp_alerts"]}
    assert tested == {r[0] for r in build().RULES}, "every alert is shown firing"
    out = subprocess.run([promtool(), "test", "rules", str(ALERTS / "tests.yaml")], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_catches_a_broken_rule(tmp_path):
    rules = yaml.safe_load((ALERTS / "edit-serve-rules.yaml").read_text())
    rules["groups"][0]["rules"][0]["expr"] = "min by (replica) (edit_serve_locality_ratio < 0.9"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(rules))
    out = subprocess.run([promtool(), "check", "rules", str(bad)], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    rule = copy.deepcopy(by_kind("PrometheusRule")[0])
    rule["spec"]["groups"][0]["rules"][0]["for"] = "5 minutes"
    with pytest.raises(jsonschema.ValidationError):
        validate(rule)
