"""Probes on a live server: a deliberately bad patch (a large random delta on one MLP) drops
locality below 0.9 within one probe interval; reverting it brings locality back to 1.0."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from edit_serve.probes import ProbeSetError, about, default_pool, edit_probes, read_probe_file
from patches import Patch, to_bytes
from tests.observability.conftest import PROBE_INTERVAL_S, random_patch, scrape, wait_for_probes
from tests.serving.test_patch_admin import cli

EIFFEL = "The Eiffel Tower is located in the city of"


def test_bad_patch_breaks_locality_and_revert_restores_it(server, smollm):
    patch = random_patch(smollm, layer=15, scale=0.5, seed=1, requests=[
        {"prompt": EIFFEL, "subject": "The Eiffel Tower", "target_new": "Paris"}])
    with server.admin() as admin:
        applied = admin.post("/v1/patches", content=to_bytes(patch))
        assert applied.status_code == 201, applied.text
        report, seconds = wait_for_probes(server, applied.json()["version"], timeout=3 * PROBE_INTERVAL_S)
        assert seconds <= PROBE_INTERVAL_S, f"locality showed the bad patch only after {seconds:.1f} s"
        assert report["locality_ratio"] < 0.9
        assert report["about_edits"] == 1  # the Eiffel Tower probe names the patch's subject: not counted
        assert report["edits"] == 1 and report["edit_retention_ratio"] in (0.0, 1.0)
        assert scrape(server).value("edit_serve_locality_ratio") == report["locality_ratio"]
        # the report names the probe prompts that moved (counted ones only), and `edit_serve patches` lists them
        moved = report["moved"]
        assert len(moved) == round((1 - report["locality_ratio"]) * report["prompts"]) > 0
        assert all(m["prompt"] != EIFFEL and m["before"] != m["now"] for m in moved)
        assert len(report["not_held"]) == round((1 - report["edit_retention_ratio"]) * report["edits"])
        out = cli(server, "patches")
        assert out.returncode == 0, out.stderr
        assert f"  moved    {moved[0]['prompt']}: {moved[0]['before']!r} -> {moved[0]['now']!r}" in out.stdout

        reverted = admin.delete(f"/v1/patches/{patch.id}")
        assert reverted.status_code == 200
        report, seconds = wait_for_probes(server, reverted.json()["version"], timeout=3 * PROBE_INTERVAL_S)
        assert seconds <= PROBE_INTERVAL_S
        assert report["locality_ratio"] == 1.0 and report["edit_retention_ratio"] is None and report["about_edits"] == 0
        assert report["moved"] == [] and report["not_held"] == []
    metrics = scrape(server)
    assert metrics.value("edit_serve_locality_ratio") == 1.0
    assert math.isnan(metrics.value("edit_serve_edit_retention_ratio"))


def test_edit_probes_ask_for_the_target_after_the_prompt(smollm):
    tok = smollm.tokenizer
    template = EIFFEL.replace("The Eiffel Tower", "{}")
    requests = [{"prompt": template, "subject": "The Eiffel Tower", "target_new": target}
                for target in ("Rome", " Rome")]
    requests.append({"prompt": template, "target_new": "Rome"})  # no subject: not an edit request
    patch = Patch(kind="delta", method="manual", base_model="", base_fingerprint="", tensors={}, requests=requests)
    probes = edit_probes(tok, patch)
    assert len(probes) == 2 and probes[0] == probes[1]  # a leading space in the target changes nothing
    assert tok.decode(probes[0].prompt_ids) == EIFFEL and tok.decode(probes[0].expected) == " Rome"


def test_probe_file_errors_are_one_line(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"prompt": "The capital of France is"}) + "\n\n"
                    + json.dumps({"prompt": "2 + 2 ="}) + "\n")
    assert read_probe_file(good) == ["The capital of France is", "2 + 2 ="]
    cases = {"not json": "{oops\n", "no prompt": '{"text": "a"}\n', "empty": "\n"}
    for label, text in cases.items():
        bad = tmp_path / f"{label}.jsonl"
        bad.write_text(text)
        with pytest.raises(ProbeSetError) as e:
            read_probe_file(bad)
        assert "\n" not in str(e.value) and str(bad) in str(e.value), label
    with pytest.raises(ProbeSetError, match="cannot read"):
        read_probe_file(tmp_path / "missing.jsonl")


def test_default_pool_is_generated_not_read():
    pool = default_pool()
    assert len(pool) == len(set(pool)) >= 50
    assert "The capital of France is" in pool


def test_a_probe_is_about_an_edit_when_it_names_the_subject():
    related = about(["The Eiffel Tower", "france", "x"])  # case ignored; a one-letter subject ignored
    assert related(EIFFEL) and related("The capital of France is")
    assert not related("The Colosseum is located in the city of") and not related("The Franceville airport")
    assert not related("x marks the spot")
    pool = default_pool(["The Eiffel Tower"])  # the harness's locality set for the README's edit
    assert EIFFEL in default_pool() and EIFFEL not in pool and len(pool) == len(default_pool()) - 1
    assert not about([])(EIFFEL)


def test_serve_refuses_a_bad_probe_set_in_one_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no prompt"}\n')
    out = subprocess.run([sys.executable, "-m", "edit_serve", "serve", "--probe-set", str(bad), "--port", "0",
                          "--patch-store", str(tmp_path / "store")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1] == (
        f'edit_serve serve: error: {bad} line 1: expected an object with a non-empty "prompt" string')
