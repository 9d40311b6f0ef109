"""Compaction as one change: the service and the store on a tiny model (one log record, undone
exactly when it cannot be written, a torn record replays as the old set), then on a live
SmolLM2 server over HTTP and the CLI, and killed with SIGKILL at each point inside it: a
restart comes back with the old patch set or the new one, never a mix."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from edit_serve.dry_run import verdict
from edit_serve.service import FAULT_ENV
from edit_serve.store import PatchStore, StoreError
from patches import PatchStack, to_bytes
from patches.compact import compact
from tests.patches.conftest import assert_identical, llama, rank_one, snapshot  # noqa: F401 (fixture)
from tests.serving.test_patch_admin import PROMPT, cli, paris_to_rome
from tests.serving.test_service_rollback import failing_service
from tests.servers import run_server

DOWN = "model.layers.{}.mlp.down_proj.weight"


def compacted(stack: PatchStack, patches):
    shapes = {n: stack.parameter(n).shape for p in patches for n in p.deltas()}
    return stack.stamp(compact(patches, shapes))


def test_compaction_is_one_record_and_undone_exactly_when_it_cannot_be_logged(llama, tmp_path):
    async def main():
        async with failing_service(llama, tmp_path / "store") as (engine, store, service):
            patches = [rank_one(engine.stack, DOWN.format(s % 2), seed=s, scale=0.1) for s in range(3)]
            for p in patches:
                await service.add(p)
            version, snap, ids = engine.version, snapshot(llama.model), [p.id for p in patches]
            one = compacted(engine.stack, patches)
            store.fail = True
            with pytest.raises(StoreError):
                await service.replace(one, ids)
            assert engine.version == version and store.active_ids() == ids
            assert_identical(llama.model, snap)  # bit for bit: the old set, in its order
            store.fail = False
            change = await service.replace(one, ids)
            assert engine.stack.ids == [one.id] == [p.id for p in service.active] == store.active_ids()
            assert change.version == engine.version
            assert [r.op for r in store.records()] == ["apply"] * 3 + ["compact"]

    asyncio.run(main())


def test_a_torn_compact_record_replays_as_the_old_set(tmp_path):
    store = PatchStore(tmp_path / "store")
    old, new = ["a1" * 12, "b2" * 12, "c3" * 12], "d4" * 12
    for i in old:
        store.append("apply", i)
    with store.appending("compact", new, old[:2]) as commit:
        line = commit().to_json()
    assert store.active_ids() == [new, old[2]]  # in the place of the first replaced one
    data = store.log_path.read_bytes()
    store.log_path.write_bytes(data[:-len(line) // 2])  # a crash in the middle of the write
    assert store.active_ids() == old


def test_refusal_names_the_figure_that_falls():
    figures = {"retention_before": 0.9, "retention_after": 0.85, "locality_before": 1.0, "locality_after": 1.0}
    assert verdict(figures, 0.02, "compaction").startswith(
        "compaction refused: retention would fall from 0.900 to 0.850")
    assert verdict(figures, 0.1, "compaction") is None


# --- a live server --------------------------------------------------------------------------


def three_patches(smollm) -> list[bytes]:
    """The Paris -> Rome edit and two small rank-one patches on other layers."""
    stack = PatchStack(smollm.model, base_model=smollm.profile.name, architecture=smollm.profile.architecture)
    small = [rank_one(stack, DOWN.format(layer), seed=layer, scale=1e-3) for layer in (5, 29)]
    return [to_bytes(paris_to_rome(smollm)), *map(to_bytes, small)]


def digest(admin: httpx.Client) -> dict:
    return admin.get("/v1/weights/digest", params={"names": [DOWN.format(5), DOWN.format(29)]}).json()["digests"]


def test_compact_over_http_and_the_cli(smollm, tmp_path):
    store = tmp_path / "store"
    with run_server(store) as server, server.admin() as admin:
        base = digest(admin)
        ids = [admin.post("/v1/patches", content=b).json()["id"] for b in three_patches(smollm)]
        assert server.complete(PROMPT)[0].strip().startswith("Rome")

        with pytest.raises(httpx.ReadTimeout):  # a client that gives up (a timeout, Ctrl-C): stopped, not applied
            admin.post("/v1/patches/compact", timeout=0.5)
        dry = cli(server, "compact", "--dry-run")  # computed after it: the editor runs one call at a time
        assert dry.returncode == 0, dry.stderr
        assert dry.stdout.startswith("would compact 3 patches")
        log = server.output()
        assert "the compaction of 3 patches: its client went away while it was computed; stopping it" in log
        assert log.count("compaction of 3 patches into") == 1  # the dry run's: the stopped one never finished
        assert [p["id"] for p in admin.get("/v1/patches").json()["patches"]] == ids  # nothing changed

        r = admin.post("/v1/patches/compact", params={"tolerance": 0.02})
        assert r.status_code == 200, r.text
        result = r.json()
        assert result["applied"] and result["replaced"] == ids
        assert result["report"]["retention_after"] >= result["report"]["retention_before"] - 0.02
        listing = admin.get("/v1/patches").json()
        assert [p["id"] for p in listing["patches"]] == [result["id"]] and listing["version"] == result["version"]
        shown = admin.get(f"/v1/patches/{result['id']}").json()
        assert shown["method"] == "compact" and shown["summary"]["config"]["replaces"] == ids
        assert len(shown["requests"]) == 3
        text, version = server.complete(PROMPT)
        assert text.strip().startswith("Rome") and version == result["version"]

        again = admin.post("/v1/patches/compact")
        assert again.status_code == 409 and again.json()["error"]["code"] == "nothing_to_compact"
        metrics = server.client().get("/metrics").text
        assert 'edit_serve_patch_apply_duration_seconds_count{op="compact",replica="embedded"} 1.0' in metrics
        # the stopped compaction's route ended with 499 (nobody read it; the request metrics count it)
        assert 'edit_serve_requests_total{endpoint="/v1/patches/compact",replica="embedded",status="499"} 1.0' \
            in metrics

    with run_server(store) as server, server.admin() as admin:  # a restart replays the compact record
        assert [p["id"] for p in admin.get("/v1/patches").json()["patches"]] == [result["id"]]
        assert server.complete(PROMPT)[0].strip().startswith("Rome")
        admin.delete(f"/v1/patches/{result['id']}").raise_for_status()
        assert digest(admin) == base  # reverting the compacted patch restores the base exactly


@pytest.mark.parametrize("point", ["compact:stored", "compact:applied", "compact:logged"])
def test_kill_9_inside_a_compaction_restarts_into_the_old_set_or_the_new_one(smollm, tmp_path, point):
    store = tmp_path / "store"
    with run_server(store, "--no-probes", env={FAULT_ENV: point}) as server, server.admin() as admin:
        ids = [admin.post("/v1/patches", content=b).json()["id"] for b in three_patches(smollm)]
        old = digest(admin)
        with pytest.raises(httpx.HTTPError):  # the server dies inside the request
            admin.post("/v1/patches/compact")
        assert server.proc.wait(30) == -9
    records = [json.loads(line) for line in (store / "log.jsonl").read_text().splitlines()]
    with run_server(store, "--no-probes") as server, server.admin() as admin:
        active = [p["id"] for p in admin.get("/v1/patches").json()["patches"]]
        if point == "compact:logged":
            assert records[-1]["op"] == "compact" and active == [records[-1]["id"]]
        else:  # the record was never written: exactly the old set, bit for bit
            assert records[-1]["op"] == "apply" and active == ids
            assert digest(admin) == old
        assert server.complete(PROMPT)[0].strip().startswith("Rome")
