"""The harness modes on a tiny Llama: single, batch and sequential, MQuAKE-style multi-edit
records, and the model left exactly as it was."""

from __future__ import annotations

import pytest
import torch

from edit_serve.evaluation import EvalSettings, evaluate, record_from_dict
from tests.evaluation.conftest import CONFIG, METHOD, SIDE_MODULE_CONFIGS, TINY_ROWS


def run(lm, records, method=METHOD, config=CONFIG, **settings):
    weights = {k: v.clone() for k, v in lm.model.state_dict().items()}
    result = evaluate(lm.model, lm.tokenizer, lm.profile, method, records, config,
                      EvalSettings(fluency_tokens=4, progress=False, **settings))
    after = lm.model.state_dict()
    assert all(torch.equal(weights[k], after[k]) for k in weights), "the harness left the model changed"
    assert not any(m._forward_hooks for m in lm.model.modules()), "the harness left a side module attached"
    return result


@pytest.fixture(scope="module")
def records():
    return [record_from_dict(r) for r in TINY_ROWS]


def test_single_mode(tiny_llama, records):
    lm, _ = tiny_llama
    result = run(lm, records)
    assert (result["method"], result["mode"], result["n"], result["patches"], result["edits"]) == \
        (METHOD, "single", 3, 3, 3)
    assert len({row["patch"] for row in result["rows"]}) == 3
    assert result["reliability"] == 1.0 and result["pre"]["reliability"] == 0.0
    for key in ("generality", "locality", "portability", "fluency"):
        assert 0.0 <= result[key] <= 10.0
    assert result["seconds_per_edit"] > 0 and result["peak_memory_bytes"] >= result["baseline_memory_bytes"] > 0
    assert result["peak_memory_kind"] == "cpu_peak_rss"
    assert result["editor_config"]["lr"] == CONFIG["lr"] and result["editor_config"]["layers"] is None
    assert [row["id"] for row in result["rows"]] == [r.id for r in records]
    # both ways of scoring, per record and summarized; the unedited model has no locality figure
    for key in ("reliability_greedy", "generality_greedy", "locality_greedy", "portability_greedy"):
        assert 0.0 <= result[key] <= 1.0 and all(0.0 <= row[key] <= 1.0 for row in result["rows"])
    assert result["pre"]["reliability_greedy"] == 0.0 and "locality_greedy" not in result["pre"]
    assert result["settings"]["greedy"] is True


def test_greedy_scoring_can_be_turned_off(tiny_llama, records):
    lm, _ = tiny_llama
    result = run(lm, records[:1], greedy=False)
    assert result["reliability_greedy"] is None and result["locality_greedy"] is None
    assert result["reliability"] == 1.0


def test_batch_mode_makes_one_patch_per_k_records(tiny_llama, records):
    lm, _ = tiny_llama
    result = run(lm, records, mode="batch", batch_size=2)
    assert (result["patches"], result["batch_size"]) == (2, 2)
    patches = [row["patch"] for row in result["rows"]]
    assert patches[0] == patches[1] != patches[2]


def test_sequential_mode_scores_at_the_end_against_the_unedited_model(tiny_llama, records):
    """Each record's neighborhood prompt is the next record's edit prompt: edited one at a time,
    the next edit is not there when a record is scored; edited sequentially, every edit is applied
    at the end, so locality (against the UNEDITED model's predictions) must drop."""
    lm, _ = tiny_llama
    single = run(lm, records)
    sequential = run(lm, records, mode="sequential")
    assert sequential["patches"] == 3
    assert sequential["locality"] < single["locality"]
    assert sequential["rows"][0]["locality"] < single["rows"][0]["locality"]
    assert sequential["reliability"] > 0.5


def test_a_multi_edit_record_goes_into_one_patch(tiny_llama, records):
    lm, _ = tiny_llama
    case = record_from_dict({
        "prompt": TINY_ROWS[0]["prompt"], "subject": "Danielle Darrieux", "target_new": "English",
        "edits": [{k: TINY_ROWS[i][k] for k in ("prompt", "subject", "target_new")} for i in (0, 1)],
        "portability": [{"prompt": "Danielle Darrieux speaks", "target": "w9", "target_aliases": ["English"]}],
    })
    result = run(lm, [case])
    assert (result["patches"], result["edits"]) == (1, 2)
    assert len(result["rows"][0]["requests"]) == 2
    assert result["generality"] is None and result["locality"] is None



@pytest.mark.parametrize("mode", ["single", "sequential"])
def test_an_interrupted_evaluation_resumes(tiny_llama, records, tmp_path, mode, monkeypatch):
    """Every finished patch is recorded as it goes; a rerun skips it (sequential patches are
    re-applied, not recomputed), takes the unedited model's figures from the first run, and
    gives the same figures."""
    from edit_serve.evaluation import measure
    from edit_serve.evaluation.memory import host

    lm, _ = tiny_llama
    first = evaluate(lm.model, lm.tokenizer, lm.profile, METHOD, records[:2], CONFIG,
                     EvalSettings(mode=mode, fluency_tokens=0, progress=False), checkpoint=tmp_path / "progress")
    groups = (tmp_path / "progress" / "groups.jsonl").read_text().splitlines()
    (tmp_path / "progress" / "groups.jsonl").write_text(groups[0] + "\n")  # as if killed after the first patch
    weights = {k: v.clone() for k, v in lm.model.state_dict().items()}
    monkeypatch.setattr(measure, "reference", None)  # kept by the first run, not measured again
    again = evaluate(lm.model, lm.tokenizer, lm.profile, METHOD, records[:2], CONFIG,
                     EvalSettings(mode=mode, fluency_tokens=0, progress=False), checkpoint=tmp_path / "progress")
    assert all(torch.equal(weights[k], v) for k, v in lm.model.state_dict().items())
    assert again["resumed_patches"] == 1 and again["edits"] == 1
    assert again["hosts"] == {host("cpu"): 2}  # the machine that timed each patch, resumed ones included
    # the resumed patch is the recorded one; the recomputed one makes the same change (its id
    # also covers its creation second, so it is compared by what it does: the figures below)
    assert len(again["rows"]) == len(first["rows"]) and again["rows"][0]["patch"] == first["rows"][0]["patch"]
    for key in ("reliability", "generality", "locality"):
        assert again[key] == pytest.approx(first[key])
    if mode == "sequential":  # a longer stream over the same records extends the recorded one
        monkeypatch.undo()  # (and measures its longer set of records)
        longer = evaluate(lm.model, lm.tokenizer, lm.profile, METHOD, records, CONFIG,
                          EvalSettings(mode=mode, fluency_tokens=0, progress=False), checkpoint=tmp_path / "progress")
        assert longer["resumed_patches"] == 2 and longer["edits"] == 1 and longer["n"] == 3


@pytest.mark.parametrize("method", sorted(SIDE_MODULE_CONFIGS))
@pytest.mark.parametrize("mode, batch_size, patches", [("single", 1, 3), ("batch", 3, 1), ("sequential", 1, 3)])
def test_side_module_methods_in_every_mode(tiny_llama, records, method, mode, batch_size, patches):
    lm, _ = tiny_llama
    result = run(lm, records, method, SIDE_MODULE_CONFIGS[method], mode=mode, batch_size=batch_size)
    assert (result["method"], result["mode"], result["patches"], result["edits"]) == (method, mode, patches, 3)
    assert 0.0 <= result["reliability"] <= 1.0 and 0.0 <= result["locality"] <= 1.0


BATCH_CONFIG = {"stats_samples": 64, "stats_length": 16, "v_weight_decay": 1e-3, "clamp_norm_factor": 50.0,
                "layers": [1, 2], "mom2_update_weight": 10.0, "v_chunk": 1}
BATCH_SETTINGS = EvalSettings(mode="batch", batch_size=3, fluency_tokens=0, progress=False)


def interrupted_batch(lm, records, folder, monkeypatch) -> list:
    """Run a memit batch of the records (one v* chunk per record) with checkpoint `folder`,
    killed as its third v* chunk starts. Returns the list that gets an entry for every v* chunk
    made, from then on as well (later runs go through the same counter, killed no more)."""
    from editors import vstar

    monkeypatch.setenv("EDIT_SERVE_CACHE", str(folder.parent / "cache"))
    calls, optimize = [], vstar._optimize

    def killed_at_the_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as a kill in the middle of the patch
        return optimize(*args, **kwargs)

    monkeypatch.setattr(vstar, "_optimize", killed_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        evaluate(lm.model, lm.tokenizer, lm.profile, "memit", records, BATCH_CONFIG, BATCH_SETTINGS, checkpoint=folder)
    return calls


def test_a_batch_patch_interrupted_in_its_v_star_search_resumes_there(tiny_llama, records, tmp_path, monkeypatch):
    """A patch of many records keeps each finished v* chunk under the checkpoint: a rerun after
    a kill in the middle of the patch redoes only the missing chunks, gives the same figures,
    counts the kept chunks' time in the edit's, and the parts go once the patch is recorded."""
    from safetensors.torch import load_file, save_file

    lm, _ = tiny_llama
    folder = tmp_path / "progress"
    calls = interrupted_batch(lm, records, folder, monkeypatch)
    kept = sorted((folder / "parts").glob("vstar-*"))
    assert len(kept) == 2
    for path in kept:  # what they cost when made, made large enough to see in the total
        save_file(load_file(path), path, metadata={"seconds": "1000.0"})
    resumed = evaluate(lm.model, lm.tokenizer, lm.profile, "memit", records, BATCH_CONFIG, BATCH_SETTINGS,
                       checkpoint=folder)
    assert len(calls) == 4  # the third chunk only
    assert not (folder / "parts").exists()
    whole = evaluate(lm.model, lm.tokenizer, lm.profile, "memit", records, BATCH_CONFIG, BATCH_SETTINGS)
    for key in ("reliability", "generality", "locality"):
        assert resumed[key] == pytest.approx(whole[key])
    assert 2000 < resumed["edit_seconds_total"] < 2000 + 10 * whole["edit_seconds_total"]


def test_other_settings_start_the_checkpoint_over_but_keep_the_finished_v_star_parts(tiny_llama, records, tmp_path,
                                                                                     monkeypatch, caplog):
    """A rerun whose settings differ only after v* (here MEMIT's solve weight) starts the
    checkpoint over, takes the v* chunks an interrupted run finished, and gives the figures of
    a run that made them all itself."""
    lm, _ = tiny_llama
    folder = tmp_path / "progress"
    calls = interrupted_batch(lm, records, folder, monkeypatch)
    other = {**BATCH_CONFIG, "mom2_update_weight": 20.0}
    with caplog.at_level("WARNING"):
        resumed = evaluate(lm.model, lm.tokenizer, lm.profile, "memit", records, other, BATCH_SETTINGS,
                           checkpoint=folder)
    assert "starting over" in caplog.text
    assert len(calls) == 4  # the third chunk only
    whole = evaluate(lm.model, lm.tokenizer, lm.profile, "memit", records, other, BATCH_SETTINGS)
    for key in ("reliability", "generality", "locality"):
        assert resumed[key] == pytest.approx(whole[key])


def test_an_option_added_since_does_not_start_the_checkpoint_over_at_its_default(tiny_llama, records, tmp_path,
                                                                               monkeypatch, caplog):
    """A folder recorded before an option existed (its identity lacks it) goes on where the
    option is at its default, and starts over where the rerun sets it otherwise."""
    import json

    from edit_serve.evaluation.checkpoint import Checkpoint

    lm, _ = tiny_llama
    folder = tmp_path / "progress"
    interrupted_batch(lm, records, folder, monkeypatch)
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["config"]["spare_subjects"] == 0.0  # memit's default
    del meta["config"]["spare_subjects"], meta["settings"]["open_probe_tokens"]  # as if recorded before them
    (folder / "meta.json").write_text(json.dumps(meta))
    with caplog.at_level("WARNING"):
        evaluate(lm.model, lm.tokenizer, lm.profile, "memit", records, BATCH_CONFIG, BATCH_SETTINGS, checkpoint=folder)
    assert "starting over" not in caplog.text
    del meta["config"]["mom2_update_weight"]  # 10.0 here, not the default
    (folder / "meta.json").write_text(json.dumps(meta))
    (folder / "groups.jsonl").write_text("kept unless started over\n")
    identity = {**meta, "config": {**meta["config"], "spare_subjects": 0.0, "mom2_update_weight": 10.0}}
    Checkpoint(folder, identity, {"config": {"spare_subjects": 0.0, "mom2_update_weight": 200.0}})
    assert not (folder / "groups.jsonl").exists()


def test_a_batch_patch_killed_while_its_records_are_scored_resumes_the_scoring(tiny_llama, records, tmp_path,
                                                                               monkeypatch):
    """A batch patch of more records than are scored at once is kept before its scoring, with
    each slice's scores as it finishes: a rerun after a kill in the middle of the scoring applies
    the kept patch (no edit computed again), scores only the slices left, reports the kept
    patch's time and peak memory, and gives the figures of an uninterrupted run."""
    from editors import vstar
    from edit_serve.evaluation import harness, measure

    lm, _ = tiny_llama
    monkeypatch.setenv("EDIT_SERVE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(harness, "SCORE_SLICE", 1)
    folder = tmp_path / "progress"
    whole = evaluate(lm.model, lm.tokenizer, lm.profile, "memit", records, BATCH_CONFIG, BATCH_SETTINGS)
    scored, score = [], measure.score

    def killed_at_the_third_slice(scorer, records, locality, *args):
        if locality is not None:  # after the edit (the unedited model is scored with none)
            scored.append(len(records))
            if len(scored) == 3:
                raise KeyboardInterrupt  # as a kill in the middle of the scoring
        return score(scorer, records, locality, *args)

    monkeypatch.setattr(measure, "score", killed_at_the_third_slice)
    with pytest.raises(KeyboardInterrupt):
        evaluate(lm.model, lm.tokenizer, lm.profile, "memit", records, BATCH_CONFIG, BATCH_SETTINGS, checkpoint=folder)
    assert (folder / "pending.safetensors").is_file() and not (folder / "parts").exists()
    optimized = []
    monkeypatch.setattr(vstar, "_optimize", lambda *args, **kwargs: optimized.append(1))
    weights = {k: v.clone() for k, v in lm.model.state_dict().items()}
    resumed = evaluate(lm.model, lm.tokenizer, lm.profile, "memit", records, BATCH_CONFIG, BATCH_SETTINGS,
                       checkpoint=folder)
    assert all(torch.equal(weights[k], v) for k, v in lm.model.state_dict().items())
    assert not optimized and scored == [1, 1, 1, 1]  # the third slice again, nothing before it
    assert resumed["edits"] == 0 and resumed["peak_memory_bytes"] > 0 and resumed["edit_seconds_total"] == 0
    assert resumed["seconds_per_edit"] > 0 and resumed["hosts"] == whole["hosts"]
    for key in ("reliability", "generality", "locality", "portability"):
        assert resumed[key] == pytest.approx(whole[key])
    assert not (folder / "pending.json").exists() and not (folder / "pending.safetensors").exists()


def test_a_progress_line_cut_short_by_a_kill_does_not_hide_the_lines_written_after_it(tmp_path):
    """A kill while a progress line is written leaves it cut short (or without its newline): the
    next read drops it and mends the file, so that the lines a rerun appends are read."""
    from edit_serve.evaluation.checkpoint import _json_lines

    path = tmp_path / "groups.jsonl"
    for cut in ('{"group": 0}\n{"group": 1, "rec', '{"group": 0}'):
        path.write_text(cut)
        assert _json_lines(path) == [{"group": 0}]
        with open(path, "a") as fh:
            fh.write('{"group": 1}\n')
        assert _json_lines(path) == [{"group": 0}, {"group": 1}]


def test_an_evaluation_checks_every_records_requests_before_any_work(records):
    """Each patch's job takes its records' requests unchecked, so the evaluation's job checks
    them all first: a later record's rephrasings are refused for a method that does not take them."""
    import dataclasses

    from edit_serve.evaluation.harness import evaluation_job
    from editors import EditError

    request = records[1].requests[0]
    later = dataclasses.replace(records[1], requests=(dataclasses.replace(request, rephrasings=(request.prompt,)),))
    assert evaluation_job("rome", [records[0], later], {}).method == "rome"
    with pytest.raises(EditError, match="mend edits from the prompt alone"):
        evaluation_job("mend", [records[0], later], {})
