"""The Ray Serve application on a real local Ray cluster (started once for this module):
two model replicas with the real SmolLM2, broadcast apply/revert/compaction, replica
restarts, the editor actor, per-replica metrics, and an application restart."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from patches import to_bytes
from tests.serving.test_patch_admin import PROMPT, cli, paris_to_rome
from tests.servers import TOKEN, free_port, run_server

ray = pytest.importorskip("ray", reason="Ray Serve is part of the test install (pip install '.[ray]')")
RAY = str(Path(sys.executable).with_name("ray"))
ROME = {"layers": None, "stats_samples": 200, "stats_length": 64, "v_stop_nll": 0.05}  # quick: v* stops once it holds


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A local Ray head node (2 CPUs), joined by the test process for fault injection."""
    port = free_port()
    env = {**os.environ, "EDIT_SERVE_ADMIN_TOKEN": TOKEN, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    subprocess.run([RAY, "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
                    "--disable-usage-stats"], check=True, env=env, capture_output=True, timeout=120)
    address = "auto"  # the cluster just started (explicit GCS addresses trip Ray's token auth here)
    ray.init(address=address, logging_level="WARNING")
    try:
        yield address
    finally:
        ray.shutdown()
        subprocess.run([RAY, "stop", "--force"], capture_output=True, timeout=120)


PROBE_PROMPTS = ["The capital of France is", "The official language of Italy is", "One, two, three, four,"]
MAX_MODEL_LEN = 512


def ray_server(cluster: str, store: Path):
    """2 replicas; engine and probe flags that must travel to them (issue 16)."""
    probe_set = store.parent / "probes.jsonl"
    probe_set.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROBE_PROMPTS))
    return run_server(store, "--ray", "--ray-address", cluster, "--replicas", "2", "--probe-interval", "0",
                      "--max-model-len", str(MAX_MODEL_LEN), "--probe-set", str(probe_set), "--warm-editor",
                      timeout=420)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tmp_path_factory.mktemp("ray") / "store"


@pytest.fixture(scope="module")
def server(cluster, store):
    with ray_server(cluster, store) as s:
        yield s


@pytest.fixture(scope="module")
def rome_patch(smollm, data_dir, tmp_path_factory):
    from editors import compute_patch
    from patches import save

    config = {**ROME, "stats_corpus": str(data_dir / "wikitext2_valid.txt")}
    config.pop("layers")
    patch = compute_patch("rome", smollm.model, smollm.tokenizer, smollm.profile,
                          [{"prompt": "{} is located in the city of", "subject": "The Eiffel Tower",
                            "target_new": "Rome"}], config)
    return save(patch, tmp_path_factory.mktemp("rome") / "rome.safetensors"), patch


def completions(server, n: int, prompt: str = PROMPT) -> list[tuple[str, str, str]]:
    out = []
    with server.client() as http:
        for _ in range(n):
            r = http.post("/v1/completions", json={"model": "smollm2-135m", "prompt": prompt, "max_tokens": 6,
                                                  "temperature": 0})
            r.raise_for_status()
            out.append((r.json()["choices"][0]["text"], r.headers["x-edit-serve-patchset"],
                        r.headers["x-edit-serve-replica"]))
    return out


def test_rome_patch_reaches_every_replica(server, rome_patch):
    path, patch = rome_patch
    assert all("Paris" in text for text, _, _ in completions(server, 4))
    out = cli(server, "apply", str(path))
    assert out.returncode == 0, out.stderr
    answers = completions(server, 30)
    assert all("Rome" in text for text, _, _ in answers), {a for a, _, _ in answers}
    assert len({v for _, v, _ in answers}) == 1 and answers[0][1] != "base"
    # the replicas' probe runs reach the listing: the ratios, the replica read, each patch's share held
    deadline, listing = time.monotonic() + 120, {}
    while time.monotonic() < deadline:
        listing = server.admin().get("/v1/patches").json()
        if (listing["probes"] or {}).get("version") == answers[0][1]:
            break
        time.sleep(1)
    probes = listing["probes"]
    assert probes and probes["version"] == answers[0][1], listing
    assert probes["replica"] in {"replica-0", "replica-1"} and probes["prompts"] == len(PROBE_PROMPTS)
    assert probes["edits"] == 1 and probes["edit_retention_ratio"] == 1.0
    assert [p["retention"] for p in listing["patches"]] == [1.0]
    shown = cli(server, "patches")
    assert "probes       locality" in shown.stdout and "held 1.00" in shown.stdout, shown.stdout
    assert {r for _, _, r in answers} == {"replica-0", "replica-1"}
    digests = server.admin().get("/v1/weights/digest", params={"names": patch.targets})
    assert digests.status_code == 200  # every replica holds the same bytes (else 503)
    assert cli(server, "revert", patch.id).returncode == 0
    assert all("Paris" in text and v == "base" for text, v, _ in completions(server, 6))


def test_serac_memory_reaches_every_replica(server, smollm):
    """A SERAC memory patch is broadcast like any patch; every replica's scoped engine routes
    the edit's prompt to the edit and leaves other prompts to the base model. Two memory
    patches compacted into one (kind "memory") reach every replica as one change, with the
    same answers; so does dropping one edit from it."""
    from ray import serve

    from editors.context import EditContext

    ctx = EditContext(smollm.model, smollm.tokenizer, smollm.profile)
    eiffel = {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": "Rome"}
    patch = ctx.compute("serac", [eiffel])
    other = "The Colosseum is located in the city of"
    before = [t for t, _, _ in completions(server, 4, other)]
    admin = server.admin()
    r = admin.post("/v1/patches", content=to_bytes(patch))
    assert r.status_code == 201, r.text
    answers = completions(server, 8)
    assert all(t.strip().startswith("Rome") and v == r.json()["version"] for t, v, _ in answers), answers
    assert {rep for _, _, rep in answers} == {"replica-0", "replica-1"}
    assert [t for t, _, _ in completions(server, 4, other)] == before

    louvre = ctx.compute("serac", [{**eiffel, "subject": "The Louvre", "target_new": "Tokyo"}])
    assert admin.post("/v1/patches", content=to_bytes(louvre)).status_code == 201
    r = admin.post("/v1/patches/compact", params={"kind": "memory"}, timeout=900)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["applied"] and body["replaced"] == [patch.id, louvre.id] and body["memory"]["rows"] == 2
    for name in ("replica-0", "replica-1"):
        info = serve.get_deployment_handle(name, app_name="edit_serve").info.remote().result()
        assert info["active"] == [body["id"]] and info["version"] == body["version"]
    answers = completions(server, 8) + completions(server, 8, "The Louvre is located in the city of")
    assert all(t.strip().startswith(("Rome", "Tokyo")) and v == body["version"] for t, v, _ in answers), answers
    assert sum(t.strip().startswith("Tokyo") for t, _, _ in answers) == 8
    assert [t for t, _, _ in completions(server, 4, other)] == before

    # the Louvre's edit dropped from the merged patch: one change on every replica
    dropped = admin.post(f"/v1/patches/{body['id']}/drop", json={"requests": [1]}, timeout=900)
    assert dropped.status_code == 200 and dropped.json()["rows"] == 1, dropped.text
    kept = dropped.json()
    for name in ("replica-0", "replica-1"):
        info = serve.get_deployment_handle(name, app_name="edit_serve").info.remote().result()
        assert info["active"] == [kept["id"]] and info["version"] == kept["version"]
    answers = completions(server, 8) + completions(server, 8, "The Louvre is located in the city of")
    assert sum(t.strip().startswith("Rome") for t, _, _ in answers) == 8 and not any(
        t.strip().startswith("Tokyo") for t, _, _ in answers) and {v for _, v, _ in answers} == {kept["version"]}
    admin.delete(f"/v1/patches/{kept['id']}").raise_for_status()
    assert all("Paris" in t and v == "base" for t, v, _ in completions(server, 4))


def test_engine_flags_reach_the_replicas(server):
    long_prompt = "one two three four " * 200  # over --max-model-len
    r = httpx.post(server.url + "/v1/completions", timeout=120,
                   json={"model": "smollm2-135m", "prompt": long_prompt, "max_tokens": 4})
    assert r.status_code == 400 and str(MAX_MODEL_LEN) in r.json()["error"]["message"], r.text
    from ray import serve

    report = serve.get_deployment_handle("replica-0", app_name="edit_serve").probe_report.remote().result()
    assert report is not None and report.prompts == len(PROBE_PROMPTS)  # the --probe-set file's prompts


def test_logprobs_come_through_the_replicas(server):
    """Log-probabilities, the prompt's too (carried by the Started event a replica relabels
    with its name), reach the client through a replica."""
    r = httpx.post(server.url + "/v1/completions", timeout=120, json={
        "model": "smollm2-135m", "prompt": PROMPT, "max_tokens": 2, "temperature": 0, "echo": True, "logprobs": 1})
    r.raise_for_status()
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    assert "".join(lp["tokens"]) == choice["text"] and choice["text"].startswith(PROMPT)
    assert lp["token_logprobs"][0] is None and all(v <= 0 for v in lp["token_logprobs"][1:])
    assert all(len(top) == 1 for top in lp["top_logprobs"][1:]) and r.headers["x-edit-serve-replica"]


def test_prometheus_scrapes_the_ingress_and_evaluates_every_expression(server, rome_patch, tmp_path):
    from tests.observability.test_prometheus import Traffic
    from tests.prometheus import check_every_expression, run_prometheus

    path, patch = rome_patch
    with run_prometheus(tmp_path / "prometheus", server.url.removeprefix("http://")) as prom:
        prom.wait_for_target()
        with Traffic(server.url) as traffic:
            time.sleep(3)
            assert cli(server, "apply", str(path)).returncode == 0
            time.sleep(2)
            assert cli(server, "revert", patch.id).returncode == 0
            time.sleep(3)
        assert traffic.sent >= 4
        time.sleep(3)
        results = check_every_expression(prom)
        replicas = {s["metric"]["replica"] for s in results['edit_serve_patchset_info{replica=~".*"}']}
        assert replicas == {"replica-0", "replica-1"}


def test_16_clients_300_requests_during_10_cycles(server, smollm):
    bodies = [to_bytes(paris_to_rome(smollm, scale=s)) for s in (1.0, 1.5)]
    existed = {"base"}
    results: list[tuple[int, str | None]] = []

    async def main():
        queue = list(range(300))
        async with httpx.AsyncClient(base_url=server.url, timeout=300) as client:
            async def user():
                while queue:
                    i = queue.pop()
                    r = await client.post("/v1/completions", json={
                        "model": "smollm2-135m", "prompt": [PROMPT, "Once upon a time"][i % 2], "max_tokens": 3,
                        "temperature": 0})
                    results.append((r.status_code, r.headers.get("x-edit-serve-patchset")))

            async def operator():
                headers = {"authorization": f"Bearer {TOKEN}"}
                for cycle in range(10):
                    r = await client.post("/v1/patches", content=bodies[cycle % 2], headers=headers)
                    assert r.status_code == 201, r.text
                    existed.add(r.json()["version"])
                    await asyncio.sleep(0.3)
                    r = await client.delete(f"/v1/patches/{r.json()['id']}", headers=headers)
                    assert r.status_code == 200, r.text
                    existed.add(r.json()["version"])

            await asyncio.gather(operator(), *(user() for _ in range(16)))

    asyncio.run(main())
    assert len(results) == 300
    assert [s for s, _ in results if s != 200] == []
    assert {v for _, v in results} <= existed


def test_killed_replica_comes_back_with_all_patches(server, smollm):
    from ray import serve

    admin = server.admin()
    ids = [admin.post("/v1/patches", content=to_bytes(paris_to_rome(smollm, scale=s))).json()["id"]
           for s in (1.0, 1.2, 1.4)]
    version = admin.get("/v1/patches").json()["version"]
    handle = serve.get_deployment_handle("replica-1", app_name="edit_serve")
    old_pid = handle.info.remote().result()["pid"]
    os.kill(old_pid, signal.SIGKILL)
    seen: dict[str, tuple[str, str]] = {}
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            text, v, replica = completions(server, 1)[0]
        except httpx.HTTPError:
            time.sleep(1)
            continue
        seen[replica] = (text, v)
        if len(seen) == 2 and handle.info.remote().result()["pid"] != old_pid:
            break
        time.sleep(0.5)
    assert set(seen) == {"replica-0", "replica-1"}, seen
    info = handle.info.remote().result()
    assert info["pid"] != old_pid and info["active"] == ids
    # after the restart, both replicas answer with all three patches
    for _ in range(10):
        text, v, replica = completions(server, 1)[0]
        assert v == version and "Rome" in text
    for i in ids:
        admin.delete(f"/v1/patches/{i}").raise_for_status()


def test_compaction_is_one_broadcast(server, smollm):
    from ray import serve

    admin = server.admin()
    ids = [admin.post("/v1/patches", content=to_bytes(paris_to_rome(smollm, scale=s))).json()["id"]
           for s in (1.0, 1.1, 1.2)]
    before = {replica: compactions(server, replica) for replica in ("replica-0", "replica-1")}
    r = admin.post("/v1/patches/compact", timeout=900)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["applied"] and body["replaced"] == ids
    for name in ("replica-0", "replica-1"):
        info = serve.get_deployment_handle(name, app_name="edit_serve").info.remote().result()
        assert info["active"] == [body["id"]] and info["version"] == body["version"]
    answers = completions(server, 6)
    assert all("Rome" in t and v == body["version"] for t, v, _ in answers)
    targets = [t["param"] for t in body["targets"]]
    assert admin.get("/v1/weights/digest", params={"names": targets}).status_code == 200  # the same bytes everywhere
    for replica in ("replica-0", "replica-1"):  # one engine change per replica
        assert compactions(server, replica) == before[replica] + 1
    admin.delete(f"/v1/patches/{body['id']}").raise_for_status()


def compactions(server, replica: str) -> float:
    """The compactions a replica's engine has made (its apply-duration histogram's count)."""
    found = re.search(rf'edit_serve_patch_apply_duration_seconds_count{{op="compact",replica="{replica}"}} (\S+)',
                      httpx.get(server.url + "/metrics").text)
    return float(found.group(1)) if found else 0.0


def test_dry_run_on_the_editor_actor(server, smollm):
    from tests.observability.conftest import random_patch

    bad = random_patch(smollm, layer=10, scale=0.2, seed=16, requests=[
        {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": "Rome"}])
    admin = server.admin()
    digests = admin.get("/v1/weights/digest", params={"names": bad.targets}).json()
    r = admin.post("/v1/patches", params={"dry_run": "true"}, content=to_bytes(bad), timeout=900)
    assert r.status_code == 200, r.text
    report = r.json()["dry_run"]
    assert report["probe_prompts"] == len(PROBE_PROMPTS)  # the replicas' probe set (--probe-set)
    assert report["locality_ratio"] < 0.9 and report["changed"], report
    assert admin.get("/v1/weights/digest", params={"names": bad.targets}).json() == digests  # every replica
    assert admin.get("/v1/patches").json()["patches"] == []


def test_an_edit_on_the_editor_actor_is_stopped_when_cancelled(server):
    """DELETE /v1/edits/N of the edit the editor actor computes (fine-tuning that would run for
    hours) stops it there: its sender gets 409 edit_cancelled, nothing is applied, and the
    actor computes the next edit (the test after this one). So does its client going away."""
    admin = server.admin()
    body = {"method": "ft", "config": {"steps": 100_000, "stop_loss": 0.0}, "eval": False}
    requests = [{"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": "Rome"}]
    with ThreadPoolExecutor(1) as pool:
        sent = pool.submit(admin.post, "/v1/edits", timeout=900, json={**body, "requests": requests})
        while not (pending := admin.get("/v1/edits").json()["pending"]) or pending[0]["state"] != "computing":
            assert not sent.done(), sent.result().text
            time.sleep(0.05)
        time.sleep(2)  # on the actor by now: stopped there, not as it starts
        cancelled = admin.delete(f"/v1/edits/{pending[0]['number']}")
        assert cancelled.status_code == 200 and cancelled.json()["cancelled"]["cancelled_while"] == "computing"
        r = sent.result(timeout=300)  # not stopped, the fine-tuning would run for hours
    assert r.status_code == 409 and r.json()["error"]["code"] == "edit_cancelled", r.text
    assert admin.get("/v1/patches").json()["patches"] == [] and admin.get("/v1/edits").json()["pending"] == []

    with pytest.raises(httpx.ReadTimeout), server.admin() as impatient:  # a client that leaves stops it too
        impatient.post("/v1/edits", timeout=5, json={**body, "requests": requests})
    deadline = time.monotonic() + 120
    while admin.get("/v1/edits").json()["pending"]:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    # the actor is free: one step of fine-tuning is computed at once, not after hours
    quick = admin.post("/v1/edits", timeout=120, json={**body, "config": {"steps": 1}, "requests": requests,
                                                       "apply": False})
    assert quick.status_code == 200, quick.text
    assert admin.get("/v1/patches").json()["patches"] == []


def test_edit_computed_on_the_editor_actor(server, data_dir):
    deadline = time.monotonic() + 600  # --warm-editor: the actor loads its model and the default statistics
    while (editor := server.client().get("/health").json()["editor"]) != "warm":
        assert editor == "warming" and time.monotonic() < deadline, editor
        time.sleep(0.5)
    admin = server.admin()
    before = admin.get("/v1/patches").json()["version"]
    r = admin.post("/v1/edits", timeout=900, json={
        "method": "rome", "config": {**{k: v for k, v in ROME.items() if k != "layers"},
                                     "stats_corpus": str(data_dir / "wikitext2_valid.txt")},
        "requests": [{"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": "Rome"}]})
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["patch"]["method"] == "rome" and body["patch"]["eval"]["reliability"] >= 0.99
    assert body["computed_on"] == before
    answers = completions(server, 6)
    assert all("Rome" in t and v == body["version"] for t, v, _ in answers)
    assert {rep for _, _, rep in answers} == {"replica-0", "replica-1"}
    metrics = httpx.get(server.url + "/metrics").text
    for replica in ("replica-0", "replica-1"):
        assert f'edit_serve_patchset_info{{replica="{replica}",version="{body["version"]}"}} 1.0' in metrics
        assert f'edit_serve_active_patches{{replica="{replica}"}} 1.0' in metrics
    assert 'edit_serve_edit_duration_seconds_count{method="rome",replica="ingress"} 1.0' in metrics
    assert 'edit_serve_edits_pending{replica="ingress"} 0.0' in metrics


def test_application_restart_loses_nothing(cluster, store, server):
    before = server.admin().get("/v1/patches").json()
    assert before["patches"], "the previous test left one patch applied"
    answers = completions(server, 2)
    server.proc.send_signal(signal.SIGTERM)
    server.proc.wait(120)
    with ray_server(cluster, store) as again:
        assert again.admin().get("/v1/patches").json()["version"] == before["version"]
        assert [a[:2] for a in completions(again, 2)] == [a[:2] for a in answers]
        for p in before["patches"]:
            again.admin().delete(f"/v1/patches/{p['id']}").raise_for_status()
