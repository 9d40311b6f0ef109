"""POST /v1/edits on the embedded server: a ROME edit (and a T-Patcher side-module edit) computed
next to the serving model (on the editor process's own copy), applied, and recorded with its own
eval figures."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from patches import from_bytes, load, to_bytes
from tests.observability.conftest import scrape
from tests.serving.test_patch_admin import PROMPT
from tests.servers import TOKEN, run_server

REQUEST = {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": "Rome"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with run_server(tmp_path_factory.mktemp("edits") / "store", "--no-probes") as s:
        yield s


@pytest.fixture(scope="module")
def rome_config(data_dir):
    """Small statistics over the shared WikiText sample, and v* stopped once the target's NLL is
    below 0.05, so the tests stay quick (they are about the server, not the edit's quality)."""
    return {"stats_corpus": str(data_dir / "wikitext2_valid.txt"), "stats_samples": 200, "stats_length": 64,
            "v_stop_nll": 0.05}


def test_rome_edit_is_computed_applied_and_measured(server, rome_config):
    before, _ = server.complete(PROMPT)
    assert "Paris" in before
    r = server.admin().post("/v1/edits", json={"method": "rome", "requests": [REQUEST], "config": rome_config},
                            timeout=1200)
    assert r.status_code == 201, r.text
    body = r.json()
    patch = body["patch"]
    assert patch["method"] == "rome" and patch["requests"][0]["target_new"] == "Rome"
    assert patch["eval"]["reliability"] >= 0.99 and 0.0 <= patch["eval"]["locality"] <= 1.0
    assert (server.store / "keys" / f"{body['id']}.safetensors").is_file()  # what a restarted server reads
    after, version = server.complete(PROMPT)
    assert "Rome" in after and version == body["version"]
    listing = server.admin().get("/v1/patches").json()
    assert [p["id"] for p in listing["patches"]] == [body["id"]]
    server.admin().delete(f"/v1/patches/{body['id']}").raise_for_status()
    assert server.complete(PROMPT) == (before, "base")


def test_t_patcher_edit_is_served_and_reverted_exactly(server):
    """A side-module patch through the same endpoint: applied as hooks, reverted to the base.
    Its rephrasing is fitted and is what the patch's generality figure measures."""
    before, _ = server.complete(PROMPT)
    request = {**REQUEST, "rephrasings": ["Tourists visit {} in the city of"]}
    r = server.admin().post("/v1/edits", json={"method": "t-patcher", "requests": [request]}, timeout=1200)
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["patch"]["method"] == "t-patcher" and body["patch"]["eval"]["reliability"] >= 0.99
    assert body["patch"]["eval"]["generality"] >= 0.99 and body["patch"]["eval"]["pre"]["generality"] < 0.5
    after, version = server.complete(PROMPT)
    assert "Rome" in after and version == body["version"]
    server.admin().delete(f"/v1/patches/{body['id']}").raise_for_status()
    assert server.complete(PROMPT) == (before, "base")


def test_edit_without_apply_returns_the_file(server, rome_config):
    request = {**REQUEST, "rephrasings": ["You can visit {} in"]}  # fitted too, and recorded in the patch
    r = server.admin().post("/v1/edits", json={"method": "rome", "requests": [request], "config": rome_config,
                                               "apply": False, "eval": False}, timeout=1200,
                            headers={"accept": "application/octet-stream"})  # else: the dry-run report
    assert r.status_code == 200
    patch = from_bytes(r.content)
    assert patch.id == r.headers["x-edit-serve-patch-id"] and patch.method == "rome" and patch.requests == [request]
    assert len(patch.targets) == 1 and patch.targets[0].endswith("mlp.down_proj.weight")
    assert server.admin().get("/v1/patches").json()["patches"] == []  # nothing applied
    assert server.admin().post("/v1/patches", content=r.content).status_code == 201  # the server accepts it
    server.admin().delete(f"/v1/patches/{patch.id}").raise_for_status()


def test_the_cli_computes_an_edit_on_the_server(server, rome_config, tmp_path):
    """`edit_serve edit --server`: the server computes the patch on top of its active ones and
    applies it; with --dry-run it only reports, with -o it only writes the file; flags for a
    local edit are refused in one line."""
    env = {**os.environ, "EDIT_SERVE_URL": server.url, "EDIT_SERVE_ADMIN_TOKEN": TOKEN}

    def edit(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "edit_serve", "edit", "--server", "--method", "rome",
                               "--prompt", REQUEST["prompt"], "--subject", REQUEST["subject"], "--target", "Rome",
                               "--config", json.dumps(rome_config), *extra],
                              capture_output=True, text=True, env=env, timeout=1200)

    before, _ = server.complete(PROMPT)
    dry = edit("--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "nothing applied" in dry.stdout and "1/1 would hold (before: 0)" in dry.stdout
    path = tmp_path / "eiffel.safetensors"
    wrote = edit("-o", str(path))
    assert wrote.returncode == 0, wrote.stderr
    assert load(path).method == "rome" and load(path).requests == [REQUEST]
    assert server.admin().get("/v1/patches").json()["patches"] == [] and server.complete(PROMPT)[0] == before

    applied = edit()
    assert applied.returncode == 0, applied.stderr
    first, second = applied.stdout.splitlines()[:2]
    assert first.startswith("applied ") and second.startswith("eval reliability 1.000")
    patch_id = first.split()[1]
    after, version = server.complete(PROMPT)
    assert "Rome" in after and version in first
    assert [p["id"] for p in server.admin().get("/v1/patches").json()["patches"]] == [patch_id]
    server.admin().delete(f"/v1/patches/{patch_id}").raise_for_status()

    refused = edit("--paraphrase", "Tourists visit The Eiffel Tower in")
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1 and "--paraphrase" in refused.stderr
    assert server.admin().get("/v1/patches").json()["patches"] == []


def test_a_guarded_edit_that_would_undo_a_live_one_is_refused(server, rome_config, tmp_path):
    """An edit that contradicts a live one (the same subject, another city) would make the live
    edit's retention fall from 1 to 0: with a guard it is refused in one line and nothing
    changes, from the API and from `apply --guard`; a dry run with the guard names the edit it
    would lose and says it would be refused. An edit about another subject passes the guard
    and is applied, with the figures the guard measured."""
    from tests.serving.test_patch_admin import cli

    admin = server.admin()

    def edit(request: dict, **body) -> httpx.Response:
        return admin.post("/v1/edits", json={"method": "rome", "requests": [request], "config": rome_config,
                                             "eval": False, **body}, timeout=1200, **(
            {"headers": {"accept": "application/octet-stream"}} if body.get("apply") is False else {}))

    first = edit(REQUEST)
    assert first.status_code == 201, first.text
    live = [first.json()["id"]]
    try:
        answer = server.complete(PROMPT)
        assert "Rome" in answer[0]
        berlin = {**REQUEST, "target_new": "Berlin"}
        refused = edit(berlin, guard=0.02)
        assert refused.status_code == 409, refused.text
        error = refused.json()["error"]
        assert error["code"] == "tolerance_exceeded" and "\n" not in error["message"]
        assert "retention would fall from 1.000 to 0.000" in error["message"], error
        assert [p["id"] for p in admin.get("/v1/patches").json()["patches"]] == live
        assert server.complete(PROMPT) == answer  # the same answer, the same version

        path = tmp_path / "berlin.safetensors"
        path.write_bytes(edit(berlin, apply=False).content)
        dry = cli(server, "apply", "--dry-run", "--guard", "0.02", str(path))
        assert dry.returncode == 0, dry.stderr
        assert "live edits   0.000 of 1 would still hold (now 1.000)" in dry.stdout, dry.stdout
        assert "  lost     The Eiffel Tower is located in the city of -> Rome" in dry.stdout
        assert "guard 0.02: patch" in dry.stdout and "refused: retention would fall" in dry.stdout
        applied = cli(server, "apply", "--guard", "0.02", str(path))
        assert applied.returncode != 0 and applied.stderr.count("\n") == 1
        assert "409" in applied.stderr and "retention would fall from 1.000 to 0.000" in applied.stderr
        assert [p["id"] for p in admin.get("/v1/patches").json()["patches"]] == live

        other = edit({**REQUEST, "subject": "The Colosseum", "target_new": "Paris"}, guard=0.1)
        assert other.status_code == 201, other.text
        live.append(other.json()["id"])
        guard = other.json()["guard"]
        assert guard["edits"] == 1 and guard["retention_before"] == guard["retention_after"] == 1.0
        assert guard["locality_before"] - guard["locality_after"] <= 0.1
        assert [p["id"] for p in admin.get("/v1/patches").json()["patches"]] == live
    finally:
        for patch_id in reversed(live):
            admin.delete(f"/v1/patches/{patch_id}").raise_for_status()


COLOSSEUM = {**REQUEST, "subject": "The Colosseum", "target_new": "Paris"}
#: what the server logs when a ROME edit of one request starts being computed
STARTED = "computing a rome edit of 1 request(s) on top of patch set"
#: fine-tuning that would take hours (nothing stops it early): an edit to cancel while it is computed
ENDLESS_FT = {"steps": 100_000, "stop_loss": 0.0}


def computing(server, pool: ThreadPoolExecutor, admin: httpx.Client, request: dict, config: dict,
              method: str = "rome") -> Future:
    """Send an edit of `request` from `pool`; return its answer's future once the server
    computes it."""
    started = STARTED.replace("rome", method)
    seen = server.output().count(started)
    future = pool.submit(admin.post, "/v1/edits", json={"method": method, "requests": [request],
                                                        "config": config, "eval": False}, timeout=1200)
    deadline = time.monotonic() + 600
    while server.output().count(started) == seen:
        assert time.monotonic() < deadline and not future.done(), server.output()[-2000:]
        time.sleep(0.02)
    return future


def test_edits_sent_together_are_computed_in_turn(server, rome_config):
    """Two edits sent at once are computed one after the other, the second on top of the patch
    the first applied (its `computed_on`), and both hold."""
    base = server.admin().get("/v1/patches").json()["version"]

    def edit(request: dict) -> httpx.Response:
        with server.admin() as admin:  # a client of its own: the two are sent at once
            return admin.post("/v1/edits", json={"method": "rome", "requests": [request], "config": rome_config,
                                                 "eval": False}, timeout=1200)

    with ThreadPoolExecutor(2) as pool:
        answers = [a.result() for a in [pool.submit(edit, REQUEST), pool.submit(edit, COLOSSEUM)]]
    assert all(a.status_code == 201 for a in answers), [a.text for a in answers]
    first, second = sorted((a.json() for a in answers), key=lambda a: a["computed_on"] != base)
    try:
        assert first["computed_on"] == base and second["computed_on"] == first["version"]
        assert [p["id"] for p in server.admin().get("/v1/patches").json()["patches"]] == [first["id"], second["id"]]
        assert "Rome" in server.complete(PROMPT)[0]
        assert "Paris" in server.complete("The Colosseum is located in the city of")[0]
    finally:
        for a in (second, first):
            server.admin().delete(f"/v1/patches/{a['id']}").raise_for_status()


def test_an_edit_is_computed_again_when_the_patch_set_changes_under_it(server, rome_config, smollm):
    """A patch applied through the admin API while an edit is computed: the edit is computed again
    on top of it before it is applied, never applied on top of patches it was not computed with."""
    from tests.serving.test_patch_admin import paris_to_rome

    hand = paris_to_rome(smollm)
    with ThreadPoolExecutor(1) as pool, server.admin() as admin:
        pending = computing(server, pool, admin, COLOSSEUM, rome_config)
        assert scrape(server).value("edit_serve_edits_pending") == 1  # on the dashboard as it waits
        applied = server.admin().post("/v1/patches", content=to_bytes(hand))
        assert applied.status_code == 201, applied.text
        r = pending.result()
    assert r.status_code == 201, r.text
    assert scrape(server).value("edit_serve_edits_pending") == 0
    try:
        assert r.json()["computed_on"] == applied.json()["version"]
        assert "computing it again on top of them (attempt 2 of 3)" in server.output()
        assert [p["id"] for p in server.admin().get("/v1/patches").json()["patches"]] == [hand.id, r.json()["id"]]
    finally:
        for patch_id in (r.json()["id"], hand.id):
            server.admin().delete(f"/v1/patches/{patch_id}").raise_for_status()


def test_an_edit_whose_client_left_before_its_turn_is_not_computed(server, rome_config):
    """An edit waits for the one being computed; its client gives up (a timeout, Ctrl-C): when
    its turn comes it is not computed, and only the first edit is applied."""
    seen = server.output().count(STARTED)
    with ThreadPoolExecutor(1) as pool, server.admin() as admin:
        first = computing(server, pool, admin, REQUEST, rome_config)
        with pytest.raises(httpx.ReadTimeout), server.admin() as impatient:
            impatient.post("/v1/edits", timeout=1, json={"method": "rome", "requests": [COLOSSEUM],
                                                         "config": rome_config, "eval": False})
        assert first.result().status_code == 201, first.result().text
    patch_id = first.result().json()["id"]
    try:
        deadline = time.monotonic() + 60
        while "a rome edit's client went away before its turn" not in server.output():
            assert time.monotonic() < deadline, server.output()[-2000:]
            time.sleep(0.1)
        assert server.output().count(STARTED) == seen + 1
        assert [p["id"] for p in server.admin().get("/v1/patches").json()["patches"]] == [patch_id]
    finally:
        server.admin().delete(f"/v1/patches/{patch_id}").raise_for_status()


def test_an_edit_whose_client_leaves_while_it_is_computed_is_stopped(server):
    """An edit is applied only for a client that waits for it: fine-tuning that would run for
    hours, whose client times out while it is computed, is stopped and never applied."""
    with pytest.raises(httpx.ReadTimeout), server.admin() as impatient:
        impatient.post("/v1/edits", timeout=5, json={"method": "ft", "requests": [REQUEST], "config": ENDLESS_FT,
                                                     "eval": False})
    deadline = time.monotonic() + 120
    while server.admin().get("/v1/edits").json()["pending"]:
        assert time.monotonic() < deadline, server.output()[-2000:]
        time.sleep(0.1)
    assert "client went away while it was computed; stopping it" in server.output()
    assert server.admin().get("/v1/patches").json()["patches"] == []


def test_pending_edits_are_listed_in_order_and_cancelled(server, rome_config):
    """GET /v1/edits (and `edit_serve edits`) while one edit computes and another waits: the
    computing one first, then the waiting one. A third one, cancelled while it waits (DELETE
    /v1/edits/N), is answered 409 at once and never computed. The one computing (fine-tuning
    that would run for hours) is stopped by `edit_serve edits --cancel N` and answered 409;
    the next one is computed then, and nothing cancelled is ever applied."""
    from edit_serve.cli import describe_pending
    from tests.serving.test_patch_admin import cli

    big_ben = {**REQUEST, "subject": "Big Ben", "target_new": "Oslo"}
    with ThreadPoolExecutor(3) as pool, server.admin() as admin:
        first = computing(server, pool, admin, REQUEST, ENDLESS_FT, method="ft")
        second = pool.submit(admin.post, "/v1/edits", headers={"accept": "application/octet-stream"}, timeout=1200,
                             json={"method": "rome", "requests": [COLOSSEUM], "config": rome_config, "eval": False,
                                   "apply": False})
        while len((listing := admin.get("/v1/edits").json())["pending"]) < 2:
            time.sleep(0.02)
        third = pool.submit(admin.post, "/v1/edits", timeout=1200,
                            json={"method": "rome", "requests": [big_ben], "config": rome_config, "eval": False})
        while len((queued := admin.get("/v1/edits").json()["pending"])) < 3:
            time.sleep(0.02)
        cancelled = admin.delete(f"/v1/edits/{queued[2]['number']}")
        assert cancelled.status_code == 200, cancelled.text
        assert cancelled.json()["cancelled"]["subjects"] == ["Big Ben"]
        assert cancelled.json()["cancelled"]["cancelled_while"] == "waiting"
        refused = third.result()
        assert refused.status_code == 409 and refused.json()["error"]["code"] == "edit_cancelled", refused.text
        assert "nothing was computed" in refused.json()["error"]["message"]
        assert not first.done()  # answered at once, while the edit ahead of it still computes

        stopped = cli(server, "edits", "--cancel", str(queued[0]["number"]))
        assert stopped.returncode == 0, stopped.stderr
        assert stopped.stdout.startswith(f"cancelled edit #{queued[0]['number']} (ft, 1 request, The Eiffel Tower)")
        assert "stopped as it was computed; nothing of it was applied" in stopped.stdout
        stop_answer = first.result(timeout=300)  # not stopped, the fine-tuning would run for hours
        assert stop_answer.status_code == 409, stop_answer.text
        assert stop_answer.json()["error"]["code"] == "edit_cancelled"
        assert "while it was computed" in stop_answer.json()["error"]["message"]
        downloaded = second.result()
        assert downloaded.status_code == 200, downloaded.text  # computed next, on the same editor model
        assert from_bytes(downloaded.content).method == "rome"
    assert server.admin().get("/v1/patches").json()["patches"] == []  # neither cancelled edit was applied
    running, waiting = listing["pending"]
    assert (running["method"], running["state"], running["subjects"], running["apply"]) == (
        "ft", "computing", ["The Eiffel Tower"], True)
    assert (waiting["state"], waiting["subjects"], waiting["apply"]) == ("waiting", ["The Colosseum"], False)
    assert waiting["number"] > running["number"] and running["started_at"] >= running["received_at"]
    shown = describe_pending(listing, waiting["received_at"] + 3).splitlines()
    assert shown[0] == f"2 edits pending; patch set {listing['version']}"
    assert "ft         1 request      computing for" in shown[1] and shown[1].endswith("The Eiffel Tower")
    assert "waiting for 3 s  The Colosseum  (not to be applied)" in shown[2]
    assert server.admin().get("/v1/edits").json()["pending"] == []
    idle = cli(server, "edits")
    assert idle.returncode == 0 and idle.stdout.startswith("no edits pending; patch set "), idle.stdout + idle.stderr
    gone = cli(server, "edits", "--cancel", str(waiting["number"]))
    assert gone.returncode != 0 and gone.stderr.count("\n") == 1 and "is pending" in gone.stderr, gone.stderr


@pytest.mark.parametrize("body, fragment", [
    ({"method": "teleport", "requests": [REQUEST]}, "unknown editing method"),
    ({"method": "rome", "requests": [{"prompt": "x {}", "subject": "y"}]}, "target_new"),
    ({"method": "rome", "requests": []}, "requests"),
    ({"method": "rome", "requests": [REQUEST], "config": {"warp_factor": 9}}, "warp_factor"),
    ({"method": "rome", "requests": [{**REQUEST, "rephrasings": ["Paris is in"]}]}, "contains neither"),
    ({"method": "rome", "requests": [{**REQUEST, "rephrasings": "{} is in"}]}, "rephrasings must be a list"),
    ({"method": "mend", "requests": [{**REQUEST, "rephrasings": ["{} lies in"]}]}, "does not take rephrasings"),
])
def test_bad_edits_get_one_line_errors(server, body, fragment):
    r = server.admin().post("/v1/edits", json=body, timeout=600)
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert fragment in message and "\n" not in message
    assert server.admin().get("/v1/patches").json()["patches"] == []


def test_edits_need_the_token(server):
    r = httpx.post(server.url + "/v1/edits", json={"method": "rome", "requests": [REQUEST]})
    assert r.status_code == 401


def test_a_batch_edit_cut_short_by_a_crash_resumes_when_sent_again(tmp_path, rome_config):
    """A server killed in the middle of a MEMIT batch keeps the finished v* chunks under its
    store; the same request after the restart takes them instead of redoing them, and the
    folder is emptied once the edit is made."""
    requests = [{"prompt": "{} is located in the city of", "subject": s, "target_new": t}
                for s, t in [("The Eiffel Tower", "Rome"), ("The Colosseum", "Paris"), ("Big Ben", "Tokyo")]]
    body = {"method": "memit", "requests": requests, "eval": False,
            "config": {**rome_config, "layers": [3, 4], "v_chunk": 1}}
    store, env = tmp_path / "store", {"EDIT_SERVE_CACHE": str(tmp_path / "cache")}
    with run_server(store, "--no-probes", env=env) as s, ThreadPoolExecutor(1) as pool:
        pending = pool.submit(s.admin().post, "/v1/edits", json=body, timeout=1200)
        deadline = time.monotonic() + 900
        while not list((store / "parts").glob("vstar-*.safetensors")):
            assert time.monotonic() < deadline and not pending.done(), s.output()[-2000:]
            time.sleep(0.2)
        os.killpg(s.proc.pid, signal.SIGKILL)
        with pytest.raises(httpx.HTTPError):
            pending.result()
    assert list((store / "parts").glob("vstar-*.safetensors"))
    with run_server(store, "--no-probes", env=env) as s:
        r = s.admin().post("/v1/edits", json=body, timeout=1200)
        assert r.status_code == 201, r.text
        assert "memit: resumed from kept parts" in s.output()
        assert not (store / "parts").exists()
        assert [p["id"] for p in s.admin().get("/v1/patches").json()["patches"]] == [r.json()["id"]]



def test_a_warm_editor_has_the_first_edits_statistics_before_the_first_edit(tmp_path, smollm):
    """`serve --warm-editor` computes the default statistics of a first rome / memit / alphaedit
    edit in its editor process (GET /health: "warming", then "warm"), and the server's first edit
    computes none. A local `edit_serve edit` started at the same time on the same cache does not
    compute them a second time: it waits for the warm-up or the warm-up lets go and waits for it
    (editors.files.made_once, EditWorker.warm)."""
    from edit_serve.models import cache_dir
    from editors.context import EditContext

    cache = tmp_path / "cache"  # statistics start empty; the converted model is the session's
    cache.mkdir()
    (cache / "models").symlink_to(cache_dir() / "models")
    env = {"EDIT_SERVE_CACHE": str(cache), "EDIT_SERVE_LOG_LEVEL": "info"}
    with run_server(tmp_path / "store", "--no-probes", "--warm-editor", env=env) as s:
        local = subprocess.run(
            [sys.executable, "-m", "edit_serve", "edit", "--method", "rome", "--prompt", REQUEST["prompt"],
             "--subject", REQUEST["subject"], "--target", "Rome", "--no-eval", "-o", str(tmp_path / "p.safetensors")],
            env={**os.environ, **env, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=900)
        assert local.returncode == 0, local.stderr[-3000:]
        deadline = time.monotonic() + 600
        while (editor := s.client().get("/health").json()["editor"]) != "warm":  # "warming" until then
            assert editor == "warming" and time.monotonic() < deadline, s.output()[-3000:]
            time.sleep(0.5)
        both = s.output() + local.stderr
        # made once: by the local edit ([3]; a warm-up it finds under way lets go) or by the warm-up ([3, ..., 7])
        assert both.count("key statistics for layers [3") == 1, both[-5000:]
        layers = smollm.profile.first_edit_layers()
        folder = cache / "stats" / EditContext.from_loaded(smollm).fingerprint
        assert len(list(folder.glob("*.model-*.128x64.safetensors"))) == len(layers) > 1

        seen = len(s.output())
        r = s.admin().post("/v1/edits", json={"method": "rome", "requests": [REQUEST], "eval": False}, timeout=1200)
        assert r.status_code == 201, r.text
        assert "key statistics" not in s.output()[seen:]



def test_a_warm_up_lets_go_of_the_statistics_an_edit_waits_for(tmp_path, monkeypatch, smollm):
    """A process that starts waiting for the statistics the editor is warming up (a user's
    `edit_serve edit` on the same cache) gets them made at once by itself: the warm-up stops,
    waits, and reads what that process wrote."""
    import fcntl

    import torch

    from edit_serve.config import EngineConfig
    from edit_serve.edit_worker import EditWorker
    from edit_serve.models import cache_dir
    from edit_serve.store import PatchStore
    from editors.context import EditContext
    from editors.corpus import CorpusSpec
    from editors.files import made_once, save_tensors
    from editors.stats import StatsConfig, cache_file, lock_file

    cache = tmp_path / "cache"  # statistics start empty; the converted model is the session's
    cache.mkdir()
    (cache / "models").symlink_to(cache_dir() / "models")
    monkeypatch.setenv("EDIT_SERVE_CACHE", str(cache))
    cfg, fingerprint = StatsConfig(), EditContext.from_loaded(smollm).fingerprint
    corpus = CorpusSpec(cfg.corpus).ident()
    lock = lock_file(fingerprint, corpus, cfg)

    def held() -> bool:
        try:
            with open(lock.with_name(lock.name + ".lock")) as fh:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return False
        except BlockingIOError:
            return True
        except FileNotFoundError:
            return False

    worker = EditWorker(EngineConfig(), PatchStore(tmp_path / "store"))
    with ThreadPoolExecutor(1) as pool:
        warming = pool.submit(worker.warm)
        deadline = time.monotonic() + 300
        while not held():  # the warm-up is making them
            assert time.monotonic() < deadline and not warming.done()
            time.sleep(0.1)
        started = time.monotonic()
        mine = 7 * torch.eye(smollm.model.get_submodule(smollm.profile.mlp_out(3)).in_features)
        with made_once(lock, "key statistics"):
            assert time.monotonic() - started < 10  # let go within a forward pass or two, not after its ~30 s
            save_tensors(cache_file(fingerprint, smollm.profile.mlp_out(3), corpus, cfg), {"mom2": mine})
        warming.result(timeout=600)
    assert torch.equal(worker._ctx.stats([3], cfg)[3], mine)  # it read what the waiting process wrote
    layers = smollm.profile.first_edit_layers()
    assert all(cache_file(fingerprint, smollm.profile.mlp_out(x), corpus, cfg).is_file() for x in layers)
    assert not list(lock.parent.glob("*.wanted"))


def _editor_children(pid: int) -> list[int]:
    """The editor processes (multiprocessing's spawned children) of process `pid`."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == pid and b"spawn_main" in cmdline and b"resource_tracker" not in cmdline:
            found.append(int(stat.parent.name))
    return found


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_the_editor_process_ends_with_a_server_killed_outright(tmp_path):
    """A server killed with SIGKILL (the OOM killer, kill -9) cannot end its editor process, which
    would keep a model copy in memory for good: the editor ends by itself. On a CPU it runs in a
    session of its own (edit_process._idle_session: Linux's autogroups)."""
    with run_server(tmp_path / "store", "--no-probes", "--warm-editor") as s:
        deadline = time.monotonic() + 120
        while not (children := _editor_children(s.proc.pid)):  # the warm-up starts it
            assert time.monotonic() < deadline, s.output()[-2000:]
            time.sleep(0.2)
        (child,) = children
        while os.getsid(child) != child:  # its session, made as it starts (before its first call)
            assert time.monotonic() < deadline, s.output()[-2000:]
            time.sleep(0.2)
        os.kill(s.proc.pid, signal.SIGKILL)
        s.proc.wait()
        deadline = time.monotonic() + 15
        while _running(child):
            assert time.monotonic() < deadline, "the editor process outlived its server"
            time.sleep(0.2)

def test_an_editor_process_that_dies_fails_its_edit_in_one_line_and_the_next_starts_anew(server):
    """The server computes edits in a child process (edit_serve.edit_process: an OpenMP runtime of
    its own). Killed while it computes, its edit is answered 503 in one line and nothing is applied;
    the next edit starts a new child and is applied."""
    import psutil

    def editor_processes() -> list[psutil.Process]:
        return [c for c in psutil.Process(server.proc.pid).children() if "spawn_main" in " ".join(c.cmdline())]

    with ThreadPoolExecutor(1) as pool, server.admin() as admin:
        endless = computing(server, pool, admin, REQUEST, ENDLESS_FT, method="ft")
        (child,) = editor_processes()
        child.kill()
        failed = endless.result(timeout=120)
        assert failed.status_code == 503 and failed.json()["error"]["code"] == "editor_failed", failed.text
        assert "\n" not in failed.json()["error"]["message"]
        assert "the editor process ended while it computed" in failed.json()["error"]["message"]
        assert admin.get("/v1/patches").json()["patches"] == []
        quick = admin.post("/v1/edits", json={"method": "ft", "requests": [REQUEST], "config": {"steps": 1},
                                              "eval": False}, timeout=600)
        assert quick.status_code == 201, quick.text
        assert [p.pid for p in editor_processes()] != [child.pid]
        admin.delete(f"/v1/patches/{quick.json()['id']}").raise_for_status()


def test_a_stop_that_overtakes_its_computation_stops_it_as_it_starts():
    """A cancel can reach the editor before the computation it names (a Ray call still on its
    way): the computation's flag is set as it starts. A ticket never seen is only remembered.
    A second stop of a ticket (a route that gives up on a local computation: its cancelled
    call, then the stop meant for a remote editor) is known as one, so it is not logged twice."""
    from edit_serve.edit_worker import Stops

    stops = Stops()
    assert stops.stop("early") == (False, True)
    with stops.open("early") as flag, stops.open("other") as other:
        assert flag.is_set() and not other.is_set()
        assert stops.stop("other") == (True, True) and other.is_set()
        assert stops.stop("other") == (True, False)
    assert stops.stop("other") == (False, False)  # ended since: still a repeat
    with stops.open(None) as untracked:
        assert not untracked.is_set()


def test_an_edit_whose_route_fails_while_it_is_computed_is_stopped(tmp_path, monkeypatch):
    """Whatever ends the route while its edit is computed (here the check on the client fails,
    as a broken connection's receive channel would), the editor stops the computation: the next
    edit is computed at once instead of waiting for fine-tuning that would run for hours. The
    app runs in this process, its engine and editor real, so the failure can be put in."""
    from pydantic import SecretStr
    from starlette.requests import Request

    from edit_serve.api.app import create_app
    from edit_serve.config import ProbeConfig, ServerConfig

    broken = False
    plain = Request.is_disconnected

    async def flaky(self):
        if broken:
            raise RuntimeError("the connection's receive channel failed")
        return await plain(self)

    monkeypatch.setattr(Request, "is_disconnected", flaky)
    app = create_app(ServerConfig(patch_store=tmp_path / "store", probes=ProbeConfig(enabled=False),
                                  admin_token=SecretStr(TOKEN)))

    def edit(config: dict) -> dict:
        return {"method": "ft", "requests": [REQUEST], "config": config, "eval": False}

    async def calls():
        nonlocal broken
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=None,
                                         headers={"authorization": f"Bearer {TOKEN}"}) as client:
                endless = asyncio.ensure_future(client.post("/v1/edits", json=edit(ENDLESS_FT)))
                while not any(e["state"] == "computing" for e in (await client.get("/v1/edits")).json()["pending"]):
                    assert not endless.done(), endless.result().text
                    await asyncio.sleep(0.1)
                broken = True
                failed = await asyncio.wait_for(endless, 60)
                broken = False
                quick = await asyncio.wait_for(client.post("/v1/edits", json=edit({"steps": 1})), 120)
                return failed, quick, (await client.get("/v1/patches")).json()["patches"]

    failed, quick, patches = asyncio.run(calls())
    assert failed.status_code == 500, failed.text
    assert quick.status_code == 201, quick.text
    assert [p["id"] for p in patches] == [quick.json()["id"]]  # nothing of the stopped edit was applied
