"""`edit_serve eval`, `edit` and `stats`: one-line errors on bad input, and the happy paths on
a tiny Llama (its profile passed as a file)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edit_serve.cli import main
from patches import load
from tests.evaluation.conftest import CONFIG, METHOD, SIDE_MODULE_CONFIGS, TINY_ROWS


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("args, fragment", [
    (["eval", "--method", "no-such-method", "--data", "DATA", "-o", "OUT"], "unknown editing method 'no-such-method'"),
    (["eval", "--method", METHOD, "--data", "TMP/missing.jsonl", "-o", "OUT"], "no such data file"),
    (["eval", "--method", METHOD, "--data", "DATA", "--config", "{bad", "-o", "OUT"], "--config is not valid JSON"),
    (["eval", "--method", METHOD, "--data", "DATA", "--config", "[1]", "-o", "OUT"],
     "--config is neither a JSON object"),
    (["eval", "--method", METHOD, "--data", "DATA", "--config", '{"nope": 1}', "-o", "OUT"], "has no setting nope"),
    (["eval", "--method", METHOD, "--data", "DATA", "--model", "no-such-profile", "-o", "OUT"],
     "unknown model profile"),
    (["edit", "--method", METHOD, "--prompt", "x", "-o", "OUT"], "an edit needs --prompt, --subject and --target"),
    (["edit", "--method", METHOD, "--prompt", "Paris is", "--subject", "Rome", "--target", "x", "-o", "OUT"],
     "contains neither '{}' nor the subject"),
    (["edit", "--method", METHOD, "--data", "DATA", "--prompt", "p", "-o", "OUT"], "either --data or --prompt"),
    (["edit", "--method", METHOD, "--prompt", "{} is in", "--subject", "Rome", "--target", "x",
      "--rephrasing", "Paris lies in", "-o", "OUT"], "'Paris lies in' contains neither '{}' nor the subject"),
    (["edit", "--method", "ke", "--prompt", "{} is in", "--subject", "Rome", "--target", "x",
      "--rephrasing", "{} lies in", "-o", "OUT"], "ke edits from the prompt alone and does not take rephrasings"),
    (["edit", "--method", METHOD, "--prompt", "{} is in", "--subject", "Rome", "--target", "x"],
     "name the patch file to write (-o FILE), or compute the edit on a running server (--server)"),
    (["edit", "--method", METHOD, "--prompt", "{} is in", "--subject", "Rome", "--target", "x", "--dry-run",
      "-o", "OUT"],
     "--dry-run needs --server"),
    (["edit", "--server", "http://127.0.0.1:9", "--method", METHOD, "--prompt", "{} is in", "--subject", "Rome",
      "--target", "x", "--dry-run", "-o", "OUT"], "either -o FILE"),
    (["edit", "--server", "http://127.0.0.1:9", "--method", METHOD, "--prompt", "{} is in", "--subject", "Rome",
      "--target", "x", "--device", "cuda"], "--device: for an edit computed here"),
    (["edit", "--server", "http://127.0.0.1:9", "--method", METHOD, "--prompt", "{} is in", "--subject", "Rome",
      "--target", "x", "--model", "TMP/other.toml"], "--model: for an edit computed here"),
    (["stats", "--layers", "1", "--corpus", "TMP/missing.txt"], "--corpus"),
])
def test_bad_input_is_one_line_and_non_zero(capsys, tmp_path, tiny_data, args, fragment):
    places = {"DATA": str(tiny_data), "OUT": str(tmp_path / "out.json"), "TMP": str(tmp_path)}
    args = [places.get(a, a.replace("TMP", str(tmp_path))) for a in args]
    code, out, err = run_cli(capsys, *args)
    assert code == 1
    assert fragment in err and err.count("\n") == 1 and err.startswith(f"edit_serve {args[0]}: error:")
    assert not (tmp_path / "out.json").exists()


def test_argument_errors_exit_2(capsys, tiny_data, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["eval", "--method", METHOD, "--data", str(tiny_data), "--n", "0", "-o", str(tmp_path / "o.json")])
    assert e.value.code == 2 and "must be at least 1" in capsys.readouterr().err


def test_help_of_every_editing_command(capsys):
    from editors import list_editors

    for command in ("edit", "eval", "stats", "train"):
        with pytest.raises(SystemExit) as e:
            main([command, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert f"usage: edit_serve {command}" in out
        if command in ("edit", "eval"):  # --method lists what the registry holds
            listed = " ".join(out.split("editing method:")[1].split("--config")[0].split())
            assert listed == ", ".join(list_editors()) and "rome" in listed


def test_eval_writes_the_result_and_prints_a_table(capsys, tmp_path, tiny_llama, tiny_data):
    _, profile_file = tiny_llama
    out = tmp_path / "result.json"
    code, stdout, err = run_cli(capsys, "eval", "--method", METHOD, "--data", tiny_data, "--n", 2, "--batch", 2,
                                "--model", profile_file, "--config", json.dumps(CONFIG), "--fluency-tokens", 2,
                                "--no-progress", "-o", out)
    assert code == 0, err
    result = json.loads(out.read_text())
    for key in ("method", "n", "reliability", "generality", "locality", "portability", "fluency",
                "seconds_per_edit", "peak_memory_bytes", "rows"):
        assert key in result
    assert (result["n"], result["mode"], result["patches"], len(result["rows"])) == (2, "batch", 1, 2)
    assert result["data"] == str(tiny_data) and result["model"] == "tiny-llama"
    assert "reliability" in stdout and "seconds per edit" in stdout
    assert "free greedy answer" in stdout and "reliability_greedy" in result and "locality_greedy" in result["rows"][0]


def test_edit_writes_a_patch_with_its_own_eval(capsys, tmp_path, tiny_llama):
    _, profile_file = tiny_llama
    row = TINY_ROWS[0]
    out = tmp_path / "edit.safetensors"
    code, stdout, err = run_cli(capsys, "edit", "--method", METHOD, "--prompt", row["prompt"],
                                "--subject", row["subject"],
                                "--target", row["target_new"], "--paraphrase", row["paraphrase_prompts"][0],
                                "--neighborhood", "Laurent Cars was employed in",
                                "--neighborhood", "the capital of France is",
                                "--model", profile_file, "--config", json.dumps(CONFIG), "-o", out)
    assert code == 0, err
    patch = load(out)
    assert patch.method == METHOD and patch.requests == [{"prompt": row["prompt"], "subject": row["subject"],
                                                           "target_new": row["target_new"]}]
    assert patch.eval["reliability"] == 1.0 and patch.eval["pre"]["reliability"] == 0.0
    assert "generality" in patch.eval and patch.eval["locality_probes"] == 2
    assert 0.0 <= patch.eval["locality"] <= 1.0
    assert f"patch {patch.id}" in stdout and "reliability 1.000" in stdout


def test_stats_computes_and_caches(capsys, tmp_path, monkeypatch, tiny_llama, data_dir):
    _, profile_file = tiny_llama
    monkeypatch.setenv("EDIT_SERVE_CACHE", str(tmp_path / "cache"))
    args = ["stats", "--layers", 1, 2, "--corpus", data_dir / "wikitext2_valid.txt", "--samples", 4, "--length", 8,
            "--model", profile_file]
    code, stdout, err = run_cli(capsys, *args)
    assert code == 0, err
    files = [line.split(": ", 1)[1] for line in stdout.splitlines()]
    assert len(files) == 2 and all((tmp_path / "cache") in Path(f).parents and Path(f).is_file() for f in files)
    code, again, _ = run_cli(capsys, *args)
    assert code == 0 and again == stdout


@pytest.mark.parametrize("method", ["t-patcher", "calinet"])
def test_edit_writes_a_side_module_patch(capsys, tmp_path, tiny_llama, method):
    _, profile_file = tiny_llama
    row = TINY_ROWS[0]
    out = tmp_path / "edit.safetensors"
    code, _, err = run_cli(capsys, "edit", "--method", method, "--prompt", row["prompt"], "--subject", row["subject"],
                           "--target", row["target_new"], "--rephrasing", "Everyone knows that {} is",
                           "--model", profile_file, "--config", json.dumps(SIDE_MODULE_CONFIGS[method]), "-o", out)
    assert code == 0, err
    patch = load(out)
    assert (patch.kind, patch.method) == ("side_module", method) and patch.side_modules
    assert patch.requests[0]["rephrasings"] == ["Everyone knows that {} is"]
    assert 0.0 <= patch.eval["generality"] <= 1.0  # no --paraphrase: measured on the rephrasing


@pytest.mark.parametrize("args, fragment", [
    (["train", "--method", "rome", "--data", "DATA", "-o", "TMP/e.safetensors"], "'rome' is not a trained editor"),
    (["train", "--method", "mend", "--data", "TMP/missing.jsonl", "-o", "TMP/e.safetensors"], "is not a file"),
    (["train", "--method", "mend", "--data", "DATA", "-o", "DATA"], "exists; pass --resume"),
    (["train", "--method", "mend", "--data", "DATA", "--exclude", "DATA", "-o", "TMP/e.safetensors"],
     "no training records left"),
    (["edit", "--method", "mend", "--editor", "TMP/missing.safetensors", "--prompt", "{} is", "--subject", "x",
      "--target", "y", "-o", "TMP/p.safetensors"], "no such checkpoint file"),
])
def test_bad_train_input_is_one_line(capsys, tmp_path, tiny_data, args, fragment):
    places = {"DATA": str(tiny_data)}
    args = [places.get(a, a.replace("TMP", str(tmp_path))) for a in args]
    code, _, err = run_cli(capsys, *args)
    assert code == 1
    assert fragment in err and err.count("\n") == 1 and err.startswith(f"edit_serve {args[0]}: error:")


def test_train_then_edit_with_the_cached_editor_then_resume(capsys, tmp_path, monkeypatch, tiny_llama, tiny_data):
    _, profile_file = tiny_llama
    monkeypatch.setenv("EDIT_SERVE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "mend.safetensors"
    train = ["train", "--method", "mend", "--data", tiny_data, "--model", profile_file,
             "--val-size", 1, "--val-every", 2,
             "--config", '{"rank": 8, "init_lr": 0.01}', "--no-progress", "-o", out]
    code, stdout, err = run_cli(capsys, *train, "--steps", 2)
    assert code == 0, err
    assert f"wrote {out}: mend editor for tiny-llama" in stdout and "2 steps" in stdout
    row = TINY_ROWS[0]
    patch_file = tmp_path / "p.safetensors"
    code, stdout, err = run_cli(capsys, "edit", "--method", "mend", "--prompt", row["prompt"],
                                "--subject", row["subject"],
                                "--target", row["target_new"], "--model", profile_file, "--no-eval", "-o", patch_file)
    assert code == 0, err
    assert load(patch_file).method == "mend"
    code, stdout, err = run_cli(capsys, *train, "--steps", 4, "--resume")
    assert code == 0, err
    assert "4 steps" in stdout
