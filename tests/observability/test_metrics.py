"""GET /metrics of a live server after real traffic and a patch apply: every family of the
dashboard contract is there, with values that match what the test did."""

from __future__ import annotations

import math

import httpx

from edit_serve.metrics import FAMILIES, PREFIX
from patches import to_bytes
from tests.observability.conftest import Scrape, random_patch, scrape, wait_for_probes
from tests.serving.test_patch_admin import cli

MODEL = "smollm2-135m"
EIFFEL = "The Eiffel Tower is located in the city of"


def test_every_family_with_values_matching_the_traffic(server, smollm):
    before = scrape(server)
    url = server.url
    for prompt in ("The capital of Italy is", "One, two, three,", EIFFEL):
        r = httpx.post(url + "/v1/completions", timeout=120, json={
            "model": MODEL, "prompt": prompt, "max_tokens": 4, "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200
    chunks = server.openai().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Name a color."}], max_tokens=3, temperature=0,
        stream=True, extra_body={"ignore_eos": True})
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 1
    assert httpx.post(url + "/v1/completions", json={"model": "nope", "prompt": "x"}, timeout=30).status_code == 404

    # a patch that keeps the model's own answer: a tiny delta, with the edit " Paris" for EIFFEL
    patch = random_patch(smollm, layer=10, scale=1e-6, requests=[
        {"prompt": EIFFEL, "subject": "The Eiffel Tower", "target_new": "Paris"}])
    with server.admin() as admin:
        applied = admin.post("/v1/patches", content=to_bytes(patch))
        assert applied.status_code == 201, applied.text
        version = applied.json()["version"]
        report, _ = wait_for_probes(server, version, timeout=120)
        listing = admin.get("/v1/patches").json()
    after = scrape(server)

    # every family of the contract, with its type and the constant replica label
    for name, kind in FAMILIES.items():
        family = PREFIX + (name.removesuffix("_total") if kind == "counter" else name)
        assert after.types.get(family) == kind, f"{family}: {after.types.get(family)}"
    replicas = {lab.get("replica") for samples in after.samples.values() for lab, _ in samples}
    assert replicas == {"embedded"}

    def delta(name, **labels):
        return after.value(name, **labels) - before.value(name, **labels)

    # requests by endpoint and status; durations; time to first token; tokens
    assert delta("edit_serve_requests_total", endpoint="/v1/completions", status="200") == 3
    assert delta("edit_serve_requests_total", endpoint="/v1/completions", status="404") == 1
    assert delta("edit_serve_requests_total", endpoint="/v1/chat/completions", status="200") == 1
    assert delta("edit_serve_request_duration_seconds_count", endpoint="/v1/completions") == 4
    assert delta("edit_serve_request_duration_seconds_count", endpoint="/v1/chat/completions") == 1
    assert delta("edit_serve_request_duration_seconds_sum", endpoint="/v1/completions") > 0
    assert delta("edit_serve_request_duration_seconds_bucket", endpoint="/v1/completions", le="+Inf") == 4
    assert delta("edit_serve_time_to_first_token_seconds_count") == 4  # the 404 never reached the engine
    assert delta("edit_serve_generated_tokens_total") == 3 * 4 + 3
    # the patch: one apply timed, one active patch, the version it made, memory of this process
    assert delta("edit_serve_patch_apply_duration_seconds_count", op="apply") == 1
    assert after.value("edit_serve_active_patches") == 1
    assert after.value("edit_serve_patchset_info", version=version) == 1
    assert [lab["version"] for lab, _ in after.samples["edit_serve_patchset_info"]] == [version]
    assert after.value("edit_serve_device_memory_bytes", device="cpu", kind="resident") > 300e6
    assert "edit_serve_edit_duration_seconds" in after.types  # exported; no edit was computed here
    # probes: the tiny patch keeps both the edit's answer and every unrelated answer
    locality = after.value("edit_serve_locality_ratio")
    retention = after.value("edit_serve_edit_retention_ratio")
    assert 0 <= locality <= 1 and 0 <= retention <= 1
    assert (locality, retention) == (1.0, 1.0)
    assert listing["probes"]["locality_ratio"] == locality and listing["probes"]["edit_retention_ratio"] == retention
    assert listing["probes"]["prompts"] >= 8 and listing["probes"]["edits"] == 1
    assert [p["retention"] for p in listing["patches"]] == [1.0]
    assert listing["probes"]["about_edits"] == 1  # the Eiffel Tower probe names the patch's subject
    assert after.value("edit_serve_locality_probe_prompts") == listing["probes"]["prompts"]
    # `edit_serve patches` prints the same figures
    out = cli(server, "patches")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == f"patch set {version}: 1 active"
    assert lines[1] == (f"probes       locality 1.000 on {listing['probes']['prompts']} prompts (1 naming an edited "
                        "subject not counted), retention 1.000 over 1 edits")
    assert lines[2].startswith(patch.id) and "held 1.00" in lines[2] and EIFFEL in lines[2]

    with server.admin() as admin:
        reverted = admin.delete(f"/v1/patches/{patch.id}")
        assert reverted.status_code == 200
        wait_for_probes(server, reverted.json()["version"], timeout=120)
    final = scrape(server)
    assert final.value("edit_serve_patch_apply_duration_seconds_count", op="revert") - \
        before.value("edit_serve_patch_apply_duration_seconds_count", op="revert") == 1
    assert final.value("edit_serve_active_patches") == 0
    assert math.isnan(final.value("edit_serve_edit_retention_ratio"))  # no active edit


def test_labelled_series_exist_before_their_first_event(server):
    """The fresh server's first /metrics (before any request, patch or edit) already has the
    labelled series at 0, so dashboards show 0 and rate() works from the first scrape."""
    first = Scrape(server.first_scrape)
    for op in ("apply", "revert", "compact"):
        assert ({"replica": "embedded", "op": op}, 0.0) in [
            (lab, v) for lab, v in first.samples["edit_serve_patch_apply_duration_seconds_count"]], op
    endpoints = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/patches", "/v1/patches/{patch_id}",
                 "/v1/patches/compact", "/v1/edits", "/v1/weights/digest", "/health", "/metrics"}
    requests = {(lab["endpoint"], lab["status"]): v for lab, v in first.samples["edit_serve_requests_total"]}
    for endpoint in endpoints - {"/health"}:  # the test harness polled /health until the server was up
        assert requests.get((endpoint, "200")) == 0 and requests.get((endpoint, "500")) == 0, endpoint
    assert requests[("/health", "500")] == 0 and requests[("/health", "200")] >= 1
    durations = {lab["endpoint"] for lab, _ in first.samples["edit_serve_request_duration_seconds_count"]}
    assert endpoints <= durations
    methods = {lab["method"]: v for lab, v in first.samples["edit_serve_edit_duration_seconds_count"]}
    assert {"rome", "memit", "ft"} <= set(methods) and set(methods.values()) == {0.0}
