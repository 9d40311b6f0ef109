"""POST /v1/edits with a trained editor (MEND): the server uses the checkpoint named in its
configuration (`serve --editor-checkpoint mend=FILE`) or in the request's config, and refuses a
missing or foreign checkpoint in one line. The checkpoints here are untrained networks made for
the embedded model (or stamped with another model's fingerprint): the test is about wiring,
tests/editors covers training and edit quality."""

from __future__ import annotations

import subprocess
import sys

import pytest

from editors.context import EditContext
from editors.mend import MENDNet, MENDNetConfig
from editors.trained import save_editor
from patches import from_bytes
from tests.servers import run_server

REQUEST = {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": "Rome"}


def _checkpoint(smollm, path, fingerprint=None):
    ctx = EditContext.from_loaded(smollm)
    layers = [27, 28, 29]
    shapes = {smollm.profile.mlp_out(x): tuple(smollm.model.get_parameter(smollm.profile.mlp_out(x) + ".weight").shape)
              for x in layers}
    net = MENDNet(MENDNetConfig(rank=8, init_lr=1e-3), shapes)
    return save_editor(net, path, base_model=smollm.profile.name if fingerprint is None else "another-model",
                       fingerprint=fingerprint or ctx.fingerprint, layers=layers)


@pytest.fixture(scope="module")
def checkpoints(smollm, tmp_path_factory):
    folder = tmp_path_factory.mktemp("editors")
    return {"own": _checkpoint(smollm, folder / "mend.safetensors"),
            "foreign": _checkpoint(smollm, folder / "foreign.safetensors", fingerprint="0123456789abcdef0123")}


@pytest.fixture(scope="module")
def server(checkpoints, tmp_path_factory):
    with run_server(tmp_path_factory.mktemp("trained-edits") / "store", "--no-probes",
                    "--editor-checkpoint", f"mend={checkpoints['own']}") as s:
        yield s


def test_mend_edit_uses_the_configured_checkpoint(server, checkpoints):
    r = server.admin().post("/v1/edits", json={"method": "mend", "requests": [REQUEST], "eval": False}, timeout=600)
    assert r.status_code == 201, r.text
    patch = from_bytes(server.admin().get(f"/v1/patches/{r.json()['id']}", params={"download": 1}).content)
    assert patch.method == "mend" and patch.config["editor"] == str(checkpoints["own"])
    assert sorted(patch.targets) == [f"model.layers.{x}.mlp.down_proj.weight" for x in (27, 28, 29)]
    server.admin().delete(f"/v1/patches/{r.json()['id']}").raise_for_status()


@pytest.mark.parametrize("which, fragment", [("foreign", "was trained for another-model"),
                                             ("missing", "no editor checkpoint at"),
                                             ("elsewhere", "outside the server's editor folders")])
def test_foreign_missing_or_outside_checkpoints_are_refused_in_one_line(server, checkpoints, tmp_path, which, fragment):
    """A request may name a checkpoint only in the configured checkpoints' folder or the cache."""
    path = {"foreign": checkpoints["foreign"], "missing": checkpoints["own"].parent / "nowhere.safetensors",
            "elsewhere": tmp_path / "mend.safetensors"}[which]
    r = server.admin().post("/v1/edits", json={"method": "mend", "requests": [REQUEST],
                                               "config": {"editor": str(path)}},
                            timeout=600)
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert fragment in message and "\n" not in message
    assert server.admin().get("/v1/patches").json()["patches"] == []


def test_serve_refuses_a_missing_configured_checkpoint(tmp_path):
    r = subprocess.run([sys.executable, "-m", "edit_serve", "serve", "--editor-checkpoint",
                        f"mend={tmp_path / 'nowhere.safetensors'}"], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "no mend checkpoint at" in lines[0], r.stderr
