"""Patches over HTTP and through the CLI, on a live server with the real SmolLM2: a hand-built
rank-one edit, restart persistence, exact revert, auth, the malformed table, and patches
landing while 32 clients keep generating."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import httpx
import pytest
import torch

from patches import Patch, PatchStack, save, to_bytes
from tests.patches.malformed import malformed_cases
from tests.servers import TOKEN, run_server

PROMPT = "The Eiffel Tower is located in the city of"
LAYER = 29


def cli(server, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "EDIT_SERVE_URL": server.url, "EDIT_SERVE_ADMIN_TOKEN": TOKEN}
    return subprocess.run([sys.executable, "-m", "edit_serve", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def paris_to_rome(lm, scale: float = 1.0) -> Patch:
    """A rank-one edit built by hand: at the last MLP, the key of the prompt's last token is
    mapped to a value that moves the output from " Paris" towards " Rome"."""
    model, tok, profile = lm.model, lm.tokenizer, lm.profile
    down = model.get_submodule(profile.mlp_out(LAYER))
    seen = {}
    handle = down.register_forward_hook(lambda m, args, out: seen.__setitem__("k", args[0][0, -1].detach()))
    with torch.no_grad():
        model(**tok(PROMPT, return_tensors="pt"))
    handle.remove()
    k = seen["k"]  # (d_ff,) key at the last token
    emb = model.get_input_embeddings().weight  # tied with the output head
    rome, paris = tok(" Rome").input_ids[0], tok(" Paris").input_ids[0]
    v = (emb[rome] - emb[paris]) * 16.0 * scale  # (d,) value shift
    name = profile.mlp_out(LAYER) + ".weight"
    stack = PatchStack(model, base_model=profile.name, architecture=profile.architecture)
    return stack.stamp(Patch(kind="delta", method="manual", base_model="", base_fingerprint="",
                             requests=[{"prompt": PROMPT, "subject": "The Eiffel Tower", "target_new": "Rome"}],
                             tensors={f"delta.{name}.B": v[:, None].clone(),
                                      f"delta.{name}.A": (k / k.dot(k))[None, :].clone()}))


@pytest.fixture(scope="module")
def edit(smollm, tmp_path_factory):
    patch = paris_to_rome(smollm)
    path = save(patch, tmp_path_factory.mktemp("patch") / "rome.safetensors")
    return patch, path


def test_apply_survives_restart_and_revert_is_exact(smollm, edit, tmp_path):
    patch, path = edit
    store = tmp_path / "store"
    param = patch.targets[0]
    with run_server(store) as server:
        before, version0 = server.complete(PROMPT)
        assert "Paris" in before and version0 == "base"
        digest0 = server.admin().get("/v1/weights/digest", params={"names": [param]}).json()["digests"]
        out = cli(server, "apply", str(path))
        assert out.returncode == 0, out.stderr
        assert patch.id in out.stdout
        edited, version1 = server.complete(PROMPT)
        assert "Rome" in edited and version1 != "base"
        listing = cli(server, "patches")
        assert listing.returncode == 0 and patch.id in listing.stdout and "manual" in listing.stdout
        assert "Rome" in listing.stdout
    with run_server(store) as server:  # a restart replays the log
        again, version2 = server.complete(PROMPT)
        assert again == edited and version2 == version1
        out = cli(server, "revert", patch.id)
        assert out.returncode == 0, out.stderr
        restored, version3 = server.complete(PROMPT)
        assert restored == before and version3 == "base"
        digest3 = server.admin().get("/v1/weights/digest", params={"names": [param]}).json()["digests"]
        assert digest3 == digest0  # the original weights, bit for bit
    with run_server(store) as server:  # and the revert survives a restart too
        assert server.complete(PROMPT) == (before, "base")


def test_a_patch_set_is_saved_and_rebuilt_on_another_server(smollm, edit, tmp_path):
    """`apply` takes several files in order; `patches --save` downloads the active ones as
    uploaded, named in apply order; applying that folder on a fresh server gives the same
    patch set (version) and the same answers. A used folder is refused, nothing written;
    `revert` takes several ids, and stops at the first that fails."""
    patch, path = edit
    half = paris_to_rome(smollm, scale=0.5)
    half_path = save(half, tmp_path / "half.safetensors")
    folder = tmp_path / "saved"
    with run_server(tmp_path / "a") as server:
        out = cli(server, "apply", str(path), str(half_path))
        assert out.returncode == 0, out.stderr
        assert [line.split()[1] for line in out.stdout.splitlines()] == [patch.id, half.id]
        answer, version = server.complete(PROMPT)
        again = cli(server, "apply", str(tmp_path / "half.safetensors"))  # already applied: one line, no change
        assert again.returncode == 1 and "already applied" in again.stderr and again.stderr.count("\n") == 1
        saved = cli(server, "patches", "--save", str(folder))
        assert saved.returncode == 0, saved.stderr
        files = sorted(folder.glob("*.safetensors"))
        assert [f.name for f in files] == [f"001-{patch.id}.safetensors", f"002-{half.id}.safetensors"]
        assert [f.read_bytes() for f in files] == [path.read_bytes(), half_path.read_bytes()]
        refused = cli(server, "patches", "--save", str(folder))
        assert refused.returncode == 1 and "not an empty folder" in refused.stderr
        assert sorted(folder.iterdir()) == files
        quarter = save(paris_to_rome(smollm, scale=0.25), tmp_path / "quarter.safetensors")
        stopped = cli(server, "apply", str(quarter), str(half_path))  # the second is active already
        assert stopped.returncode == 1 and stopped.stderr.count("\n") == 1
        assert f"{half_path}: 409" in stopped.stderr and "the 1 file(s) before it stay applied" in stopped.stderr
    with run_server(tmp_path / "b") as server:
        out = cli(server, "apply", *map(str, files))
        assert out.returncode == 0, out.stderr
        assert server.complete(PROMPT) == (answer, version)
        # revert takes several ids too, in order; an unknown one stops it with one line
        out = cli(server, "revert", half.id, patch.id, half.id)
        assert out.returncode == 1 and out.stderr.count("\n") == 1, out.stderr
        assert f"{half.id}: 404" in out.stderr and "the 2 patch(es) before it stay reverted" in out.stderr
        assert [line.split()[1].rstrip(";") for line in out.stdout.splitlines()] == [half.id, patch.id]
        assert server.complete(PROMPT)[1] == "base"


def test_admin_needs_the_token(tmp_path, edit):
    patch, path = edit
    with run_server(tmp_path / "store") as server:
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": f"Basic {TOKEN}"}):
            for method, url in (("GET", "/v1/patches"), ("POST", "/v1/patches"), ("DELETE", f"/v1/patches/{patch.id}"),
                                ("GET", f"/v1/patches/{patch.id}")):
                r = httpx.request(method, server.url + url, headers=headers, content=b"x" if method == "POST" else None)
                assert r.status_code == 401, (method, url, headers)
                assert r.json()["error"]["type"] == "authentication_error"
        assert server.complete(PROMPT)[1] == "base"
    with run_server(tmp_path / "store2", token=None) as server:  # no token configured: admin is off
        r = httpx.get(server.url + "/v1/patches", headers={"authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 401 and "disabled" in r.json()["error"]["message"]


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory):
    with run_server(tmp_path_factory.mktemp("admin") / "store") as s:
        yield s


def test_malformed_patches_over_http(shared_server, smollm, edit):
    patch, _ = edit
    stack = PatchStack(smollm.model, base_model="smollm2-135m", architecture=smollm.profile.architecture)
    cases = malformed_cases(stack, patch)
    admin = shared_server.admin()
    before = shared_server.complete(PROMPT)
    digest = admin.get("/v1/weights/digest", params={"names": patch.targets}).json()["digests"]
    for name, data, fragment in cases:
        r = admin.post("/v1/patches", content=data, headers={"content-type": "application/octet-stream"})
        assert 400 <= r.status_code < 500, name
        message = r.json()["error"]["message"]
        assert fragment.lower() in message.lower() and "\n" not in message, (name, message)
    assert shared_server.complete(PROMPT) == before
    assert admin.get("/v1/weights/digest", params={"names": patch.targets}).json()["digests"] == digest
    assert admin.get("/v1/patches").json()["patches"] == []
    assert not list((shared_server.store / "patches").glob("*.safetensors"))  # nothing was stored


def test_admin_routes(shared_server, edit):
    patch, path = edit
    admin = shared_server.admin()
    r = admin.post("/v1/patches", content=path.read_bytes())
    assert r.status_code == 201 and r.json()["id"] == patch.id
    assert admin.post("/v1/patches", content=path.read_bytes()).status_code == 409
    info = admin.get(f"/v1/patches/{patch.id}").json()
    assert info["active"] and info["method"] == "manual" and info["summary"]["targets"][0]["rank"] == 1
    assert admin.get(f"/v1/patches/{patch.id}", params={"download": 1}).content == path.read_bytes()
    assert admin.get("/v1/patches/0123456789abcdef").status_code == 404
    assert admin.get("/v1/weights/digest", params={"names": ["no.such.weight"]}).status_code == 400
    assert admin.delete(f"/v1/patches/{patch.id}").json()["version"] == "base"
    assert admin.delete(f"/v1/patches/{patch.id}").status_code == 404


def test_cli_errors_are_one_line(shared_server, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage")
    for args in (["apply", str(tmp_path / "missing.safetensors")], ["apply", str(bad)], ["revert", "abcdef"],
                 ["inspect", str(bad)]):
        out = cli(shared_server, *args)
        assert out.returncode != 0, args
        lines = [line for line in out.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "error" in lines[0], (args, out.stderr)
    env = {**os.environ, "EDIT_SERVE_URL": "http://127.0.0.1:9", "EDIT_SERVE_ADMIN_TOKEN": TOKEN}
    out = subprocess.run([sys.executable, "-m", "edit_serve", "patches"], capture_output=True, text=True, env=env)
    assert out.returncode == 1 and "cannot reach" in out.stderr
    for command in ("serve", "apply", "revert", "patches", "inspect"):
        assert cli(shared_server, command, "--help").returncode == 0
    # a reader that stops early (`edit_serve patches | head`) is not an error
    env = {**os.environ, "EDIT_SERVE_URL": shared_server.url, "EDIT_SERVE_ADMIN_TOKEN": TOKEN}
    proc = subprocess.Popen([sys.executable, "-m", "edit_serve", "patches"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    proc.stdout.close()  # before it writes a line
    assert proc.wait(timeout=120) == 141 and proc.stderr.read() == ""


def test_32_clients_while_patches_come_and_go(shared_server, smollm):
    patches = [paris_to_rome(smollm, scale=s) for s in (1.0, 1.5)]
    bodies = [to_bytes(p) for p in patches]
    existed = {"base"}
    results: list[tuple[int, str | None]] = []

    async def main():
        done = asyncio.Event()
        async with httpx.AsyncClient(base_url=shared_server.url, timeout=120,
                                     limits=httpx.Limits(max_connections=64)) as client:
            async def user(i: int):
                prompts = [PROMPT, "The official language of Italy is", "Once upon a time"]
                while not done.is_set():
                    r = await client.post("/v1/completions", json={
                        "model": "smollm2-135m", "prompt": prompts[i % 3], "max_tokens": 4, "temperature": 0})
                    results.append((r.status_code, r.headers.get("x-edit-serve-patchset")))

            async def operator():
                headers = {"authorization": f"Bearer {TOKEN}"}
                cycle = 0
                while cycle < 10 or (len(results) < 64 and cycle < 100):  # a loaded machine answers fewer per cycle
                    body = bodies[cycle % 2]
                    cycle += 1
                    r = await client.post("/v1/patches", content=body, headers=headers)
                    assert r.status_code == 201, r.text
                    existed.add(r.json()["version"])
                    await asyncio.sleep(0.2)
                    r = await client.delete(f"/v1/patches/{r.json()['id']}", headers=headers)
                    assert r.status_code == 200, r.text
                    existed.add(r.json()["version"])
                    await asyncio.sleep(0.1)
                done.set()

            await asyncio.gather(operator(), *(user(i) for i in range(32)))

    asyncio.run(main())
    assert len(results) >= 64
    assert all(status == 200 for status, _ in results), {s for s, _ in results}
    versions = {v for _, v in results}
    assert versions <= existed, versions - existed
    assert len(versions) >= 2  # requests really ran under patched weights too
