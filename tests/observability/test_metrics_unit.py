"""Metrics without a server: per-app registries do not clash, and the expositions of several
replicas combine into one with a HELP/TYPE pair per family."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from edit_serve.metrics import FAMILIES, Metrics, combine_expositions


def test_two_apps_in_one_process_and_combined_replicas():
    a, b = Metrics(replica="r0"), Metrics(replica="r1")  # separate registries: no duplicate-name error
    a.observe_request("/v1/completions", 200, 0.5)
    b.observe_request("/v1/completions", 200, 0.2)
    b.observe_request("/v1/completions", 500, 0.1)
    a.observe_apply("apply", 0.01)
    b.set_probes(locality=0.75, retention=None, prompts=12)
    text = combine_expositions([a.render()[0].decode(), b.render()[0].decode()]).decode()
    assert text.count("# TYPE edit_serve_requests_total counter") + \
        text.count("# TYPE edit_serve_requests counter") == 1
    families = {f.name: f for f in text_string_to_metric_families(text)}
    requests = {(s.labels["replica"], s.labels["status"]): s.value
                for s in families["edit_serve_requests"].samples if s.name == "edit_serve_requests_total"}
    assert requests == {("r0", "200"): 1, ("r1", "200"): 1, ("r1", "500"): 1}
    locality = {s.labels["replica"]: s.value for s in families["edit_serve_locality_ratio"].samples}
    assert locality["r1"] == 0.75 and locality["r0"] != locality["r0"]  # NaN until r0 probes
    counted = {s.labels["replica"]: s.value for s in families["edit_serve_locality_probe_prompts"].samples}
    assert counted["r1"] == 12 and counted["r0"] != counted["r0"]
    declared = {n.removesuffix("_total") for n in FAMILIES} - {"device_memory_bytes", "active_patches", "patchset_info"}
    assert {f"edit_serve_{n}" for n in declared} <= set(families)
