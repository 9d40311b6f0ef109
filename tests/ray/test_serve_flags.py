"""`edit_serve serve --ray` walks every `serve` flag: each one changes what the Ray Serve
application receives (the whole engine and probe configuration travels to the replicas and
the editor) or is refused in one line. No cluster needed: this checks the arguments the CLI
hands to `edit_serve.ray_serve.run`, and that a replica rebuilds the same configuration."""

from __future__ import annotations

import argparse
import json

import pytest

from edit_serve import cli
from edit_serve.ray_serve import RayAppArgs


@pytest.fixture
def values(tmp_path) -> dict[str, list[str]]:
    """A non-default value for every `serve` flag (a new flag must be added here)."""
    probes = tmp_path / "probes.jsonl"
    probes.write_text(json.dumps({"prompt": "The capital of France is"}) + "\n")
    editor = tmp_path / "mend.safetensors"  # the configuration checks only that the file exists
    editor.write_bytes(b"")
    return {
        "--model": ["gpt-j-6b"], "--weights": ["EleutherAI/gpt-j-6b"], "--engine": ["vllm"],
        "--dtype": ["bfloat16"], "--device": ["cuda:0"], "--host": ["0.0.0.0"], "--port": ["9001"],
        "--patch-store": [str(tmp_path / "other-store")], "--max-batch-size": ["8"], "--max-model-len": ["256"],
        "--vllm-memory-utilization": ["0.5"], "--adapter": [f"eiffel={tmp_path / 'eiffel.safetensors'}"],
        "--enable-adapters": [], "--probe-interval": ["5"], "--probe-set": [str(probes)], "--no-probes": [],
        "--probe-edits": ["8"],
        "--replicas": ["3"], "--ray-address": ["auto"], "--gpus-per-replica": ["1"], "--editor-gpus": ["1"],
        "--log-level": ["debug"], "--editor-checkpoint": [f"mend={editor}"], "--warm-editor": [],
    }


def serve_parser() -> argparse.ArgumentParser:
    sub = argparse.ArgumentParser().add_subparsers()
    cli.add_serve(sub)
    return sub.choices["serve"]


def plan(argv: list[str]) -> tuple[dict, str, int, str | None]:
    """What `serve --ray ARGV` hands to ray_serve.run: the app's arguments, host, port, address."""
    args = serve_parser().parse_args(["--ray", *argv])
    config = cli.serve_config(args)
    ray_args = cli.ray_app_args(args, config)
    # a replica parses the dumped arguments again: it must see the embedded server's configuration
    replica = RayAppArgs(**ray_args.model_dump())
    assert replica.engine_config() == config.engine
    probes = replica.probe_config()
    assert (probes.enabled, probes.interval_s, probes.probe_set, probes.edits_per_run) == \
        (config.probes.enabled, config.probes.interval_s, config.probes.probe_set, config.probes.edits_per_run)
    assert replica.log_level == config.log_level and replica.warm_editor == config.warm_editor
    return ray_args.model_dump(mode="json"), config.host, config.port, args.ray_address


def test_every_serve_flag_reaches_the_ray_application(values, tmp_path):
    flags = {o for a in serve_parser()._actions for o in a.option_strings} - {"-h", "--help", "--ray"}
    assert flags == set(values), f"flags without a test value: {sorted(flags - set(values))}"
    base = ["--patch-store", str(tmp_path / "store")]
    default = plan(base)
    for flag, value in values.items():
        given = plan([*base, flag, *value]) if flag != "--patch-store" else plan([flag, *value])
        assert given != default, f"serve --ray ignores {flag}"


def test_engine_flags_travel_whole(values, tmp_path):
    argv = ["--patch-store", str(tmp_path / "store"), "--engine", "vllm", "--max-model-len", "256",
            "--vllm-memory-utilization", "0.5", "--adapter", values["--adapter"][0], "--enable-adapters",
            "--probe-set", values["--probe-set"][0]]
    app, *_ = plan(argv)
    engine = app["engine"]
    assert (engine["engine"], engine["max_model_len"], engine["vllm_memory_utilization"]) == ("vllm", 256, 0.5)
    assert engine["adapters"] == {"eiffel": str(tmp_path / "eiffel.safetensors")} and engine["enable_adapters"]
    assert app["probe_set"] == values["--probe-set"][0]
    app, *_ = plan(["--patch-store", str(tmp_path / "store"), "--editor-checkpoint", values["--editor-checkpoint"][0]])
    assert app["engine"]["editors"] == {"mend": str((tmp_path / "mend.safetensors").resolve())}


@pytest.mark.parametrize("flag,value", [("--replicas", "2"), ("--ray-address", "auto"),
                                        ("--gpus-per-replica", "1"), ("--editor-gpus", "0.5")])
def test_ray_only_flags_without_ray_are_refused_in_one_line(flag, value, tmp_path, capsys):
    assert cli.main(["serve", "--patch-store", str(tmp_path), flag, value]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"edit_serve serve: error: {flag} only apply with --ray"


def test_bad_values_are_refused_in_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    for argv, says in ((["--replicas", "0"], "replicas"), (["--probe-set", str(bad)], "bad.jsonl"),
                       (["--vllm-memory-utilization", "2"], "vllm_memory_utilization")):
        assert cli.main(["serve", "--ray", "--patch-store", str(tmp_path), *argv]) == 1
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and says in err, err


def test_serve_config_files_give_engine_fields_flat_or_nested(tmp_path):
    flat = RayAppArgs(patch_store=str(tmp_path), model="smollm2-135m", engine="vllm", max_model_len=256,
                      adapters={"a": "/x.safetensors"})
    nested = RayAppArgs(patch_store=str(tmp_path), engine={"engine": "vllm", "model": "smollm2-135m",
                                                          "max_model_len": 256, "adapters": {"a": "/x.safetensors"}})
    assert flat.engine == nested.engine and flat.engine.max_model_len == 256 and flat.model == "smollm2-135m"
    with pytest.raises(ValueError, match="both flat and under engine"):
        RayAppArgs(patch_store=str(tmp_path), model="a", engine={"model": "b"})
    with pytest.raises(ValueError, match="max_tokens_limitt"):
        RayAppArgs(patch_store=str(tmp_path), engine={"max_tokens_limitt": 1})
