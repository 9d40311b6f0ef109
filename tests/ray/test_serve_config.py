"""The Serve config files (k8s/serve-config.yaml and the RayService's serveConfigV2) validate
against Ray Serve's own schema and build the application's arguments."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

pytest.importorskip("ray", reason="Ray Serve is part of the test install (pip install '.[ray]')")

from ray.serve.schema import ServeDeploySchema  # noqa: E402

from edit_serve.ray_serve import RayAppArgs, app_builder  # noqa: E402

K8S = Path(__file__).resolve().parents[2] / "k8s"


def configs() -> dict[str, dict]:
    rayservice = yaml.safe_load((K8S / "rayservice.yaml").read_text())
    return {"serve-config.yaml": yaml.safe_load((K8S / "serve-config.yaml").read_text()),
            "rayservice.yaml": yaml.safe_load(rayservice["spec"]["serveConfigV2"])}


@pytest.mark.parametrize("name", ["serve-config.yaml", "rayservice.yaml"])
def test_serve_config_is_valid(name, tmp_path):
    config = ServeDeploySchema.model_validate(configs()[name])
    (app,) = config.applications
    assert app.import_path == "edit_serve.ray_serve:app_builder"
    args = RayAppArgs(**{"patch_store": str(tmp_path), **app.args})
    built = app_builder(args.model_dump())  # the application graph builds (no cluster needed)
    assert built is not None


def test_unknown_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="replica_count"):
        RayAppArgs(patch_store=str(tmp_path), replica_count=2)
