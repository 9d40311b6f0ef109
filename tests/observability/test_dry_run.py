"""Dry runs on a live server (real SmolLM2, the default probe set): a deliberately bad patch
(a large random delta on one MLP) is reported as leaking, with the answers it would change,
while the served weights stay bit-identical and the served answers unchanged; a harmless patch
is reported clean; `"apply": false` in POST /v1/edits returns the report of the computed edit."""

from __future__ import annotations

from patches import save, to_bytes
from tests.observability.conftest import random_patch
from tests.serving.test_patch_admin import cli

EIFFEL = "The Eiffel Tower is located in the city of"
EDIT = {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": "Rome"}
PROMPTS = [EIFFEL, "The capital of France is", "The official language of Italy is", "One, two, three, four,"]


def served(server, names: list[str]) -> tuple[dict, list[tuple[str, str]], list]:
    with server.admin() as admin:
        digests = admin.get("/v1/weights/digest", params={"names": names}).json()["digests"]
        patches = admin.get("/v1/patches").json()["patches"]
    return digests, [server.complete(p) for p in PROMPTS], patches


def test_a_bad_patch_is_reported_and_changes_nothing(server, smollm, tmp_path):
    bad = random_patch(smollm, layer=10, scale=0.2, requests=[EDIT], seed=16)
    names = bad.targets
    before = served(server, names)
    with server.admin() as admin:
        r = admin.post("/v1/patches", params={"dry_run": "true"}, content=to_bytes(bad), timeout=600)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"] == bad.id and body["applied"] is False and body["version"] == "base"
    report = body["dry_run"]
    assert report["probe_prompts"] >= 8
    assert report["locality_ratio"] < 0.9 and report["probe_locality_ratio"] < 0.9, report
    assert len(report["changed"]) == round((1 - report["locality_ratio"]) * report["probe_prompts"])
    assert all(c["before"] != c["after"] and c["prompt"] for c in report["changed"])
    assert [e["target_new"] for e in report["edits"]] == ["Rome"] and report["edits"][0]["before"] is False
    assert served(server, names) == before  # weights bit-identical, answers and patch set unchanged

    # the CLI: one call, a readable report, nothing applied
    path = save(bad, tmp_path / "bad.safetensors")
    out = cli(server, "apply", "--dry-run", str(path))
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"dry run of {bad.id}") and "nothing applied" in out.stdout
    assert out.stdout.count("  changed  ") == len(report["changed"])
    assert served(server, names) == before


def test_a_harmless_patch_is_reported_clean(server, smollm):
    tiny = random_patch(smollm, layer=10, scale=1e-7, requests=[{**EDIT, "target_new": "Paris"}])
    with server.admin() as admin:
        report = admin.post("/v1/patches", params={"dry_run": "true"}, content=to_bytes(tiny), timeout=600).json()
    report = report["dry_run"]
    assert report["locality_ratio"] == 1.0 and report["probe_locality_ratio"] == 1.0 and report["changed"] == []
    assert report["edit_success"] == 1.0 and report["edits"][0]["before"] is True  # Paris already holds


def test_an_edit_without_apply_returns_its_dry_run(server):
    with server.admin() as admin:
        r = admin.post("/v1/edits", timeout=900, json={"method": "ft", "requests": [EDIT], "config": {"steps": 5},
                                                      "apply": False, "eval": False})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["applied"] is False and body["patch"]["method"] == "ft" and body["patch"]["active"] is False
        assert {"edits", "locality_ratio", "changed", "probe_locality_ratio"} <= set(body["dry_run"])
        # the default probe about the Eiffel Tower names the edit's subject: reported apart, not counted
        report = body["dry_run"]
        assert [c["prompt"] for c in report["about_edits"]] == [EIFFEL]
        assert EIFFEL not in [c["prompt"] for c in report["changed"]]
        assert admin.get("/v1/patches").json()["patches"] == []
        refused = admin.post("/v1/patches", params={"dry_run": "true"}, content=b"not a patch")
        assert refused.status_code == 400 and "\n" not in refused.json()["error"]["message"]


def test_measure_leaves_the_model_exactly_as_it_was(tmp_path):
    """edit_serve.dry_run.measure on a tiny random Llama: the patch is applied, measured and
    reverted bit for bit; requests that cannot be scored are skipped, not fatal."""
    import torch

    from edit_serve.dry_run import ProbePrompt, measure
    from patches import Patch, PatchStack
    from tests.conftest import load_tiny

    lm = load_tiny("llama-3-8b", tmp_path / "model")
    name = lm.profile.mlp_out(1) + ".weight"
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    stack = PatchStack(lm.model, base_model=lm.profile.name, architecture=lm.profile.architecture)
    delta = torch.randn(lm.model.get_parameter(name).shape, generator=torch.Generator().manual_seed(0)) * 5
    patch = stack.stamp(Patch(kind="delta", method="manual", base_model="", base_fingerprint="",
                              tensors={f"delta.{name}.full": delta},
                              requests=[{"prompt": "{} lives in", "subject": "a b", "target_new": "c"},
                                        {"prompt": "no subject here"}]))
    probes = [ProbePrompt("a b c d", None), ProbePrompt("e f g", None), ProbePrompt("e f a b", None)]
    report = measure(lm.model, lm.tokenizer, stack, patch, probes, answer_tokens=4)
    assert stack.ids == [] and all(torch.equal(v, before[k]) for k, v in lm.model.state_dict().items())
    assert [e["target_new"] for e in report["edits"]] == ["c"]  # the second request has no target: skipped
    # the probes naming the edit's subject "a b" are listed apart and not counted
    assert [c["prompt"] for c in report["about_edits"]] == ["a b c d", "e f a b"]
    assert report["probe_prompts"] == 1 and report["probe_locality_ratio"] is None
    assert report["locality_ratio"] == 1 - len(report["changed"]) and [c["prompt"] for c in report["changed"]] in (
        [], ["e f g"])


def test_a_stream_of_measurements_measures_each_patch_set_once(tmp_path, monkeypatch):
    """With a memo (an edit worker's), the patch set before an edit is not measured again when
    the measurement of the edit before it measured it as its "after": the second report's
    "before" figures are the first one's "after", and only the new state is scored. The live
    edits' retention counts the edits already applied, and `lost` names an edit the next patch
    undoes."""
    import torch

    from edit_serve.dry_run import Measured, ProbePrompt, measure
    from edit_serve.evaluation.scoring import Scorer
    from patches import Patch, PatchStack
    from tests.conftest import load_tiny

    lm = load_tiny("llama-3-8b", tmp_path / "model")
    name = lm.profile.mlp_out(1) + ".weight"
    stack = PatchStack(lm.model, base_model=lm.profile.name, architecture=lm.profile.architecture)
    scored: list[int] = []
    top1 = Scorer._top1  # what the model computes (Scorer.top1 answers from the memo where it can)
    monkeypatch.setattr(Scorer, "_top1", lambda self, pairs, forced: scored.append(len(pairs)) or top1(
        self, pairs, forced))

    def patch(seed: int, scale: float, request: dict) -> Patch:
        delta = torch.randn(lm.model.get_parameter(name).shape, generator=torch.Generator().manual_seed(seed))
        return stack.stamp(Patch(kind="delta", method="manual", base_model="", base_fingerprint="",
                                 tensors={f"delta.{name}.full": delta * scale}, requests=[request]))

    probes = [ProbePrompt("e f g", None), ProbePrompt("w1 w2 w3", None)]
    memo = Measured(stack)
    first = patch(0, 0.01, {"prompt": "{} lives in", "subject": "a b", "target_new": "c"})
    one = measure(lm.model, lm.tokenizer, stack, first, probes, answer_tokens=4, memo=memo)
    assert one["retained_edits"] == 0 and one["retention"] is None and scored == [1, 1]
    stack.apply(first)
    scored.clear()
    second = patch(1, 50.0, {"prompt": "{} works in", "subject": "w5 w6", "target_new": "w7"})
    two = measure(lm.model, lm.tokenizer, stack, second, probes, answer_tokens=4, memo=memo)
    # before: only its own request is new (the first's was scored as the first's "after"); after: both
    assert scored == [1, 2]
    assert two["retained_edits"] == 1 and two["retention_before"] == float(one["edits"][0]["after"])
    if one["edits"][0]["after"] and not two["retention"]:
        assert two["lost"] == [{"prompt": "a b lives in", "target_new": "c"}]
    again = measure(lm.model, lm.tokenizer, stack, second, probes, answer_tokens=4, memo=memo)
    assert scored == [1, 2] and {k: v for k, v in again.items() if k != "seconds"} == {
        k: v for k, v in two.items() if k != "seconds"}  # the same patch on the same set: nothing scored again


def test_a_compaction_is_measured_without_generating_its_edits_answers(tmp_path, monkeypatch):
    """A compaction's requests are the edits it replaces: measured as retention (teacher-forced),
    not answered greedily, so only the probes are generated, before and after."""
    import torch

    from edit_serve.dry_run import ProbePrompt, measure
    from edit_serve.evaluation.scoring import Scorer
    from patches import Patch, PatchStack
    from patches.compact import compact
    from tests.conftest import load_tiny

    lm = load_tiny("llama-3-8b", tmp_path / "model")
    name = lm.profile.mlp_out(1) + ".weight"
    stack = PatchStack(lm.model, base_model=lm.profile.name, architecture=lm.profile.architecture)
    generated: list[int] = []
    greedy = Scorer._greedy
    monkeypatch.setattr(Scorer, "_greedy", lambda self, prompts, forced, n: generated.append(len(prompts)) or greedy(
        self, prompts, forced, n))
    old = []
    for seed, request in enumerate([{"prompt": "{} lives in", "subject": "a b", "target_new": "c"},
                                    {"prompt": "{} works in", "subject": "w5 w6", "target_new": "w7"}]):
        delta = torch.randn(lm.model.get_parameter(name).shape, generator=torch.Generator().manual_seed(seed))
        old.append(stack.stamp(Patch(kind="delta", method="manual", base_model="", base_fingerprint="",
                                     tensors={f"delta.{name}.full": delta * 0.01}, requests=[request])))
        stack.apply(old[-1])
    merged = stack.stamp(compact(old, {name: lm.model.get_parameter(name).shape}))
    probes = [ProbePrompt("e f g", None), ProbePrompt("w1 w2 w3", None)]
    report = measure(lm.model, lm.tokenizer, stack, merged, probes, answer_tokens=4, replaces=[p.id for p in old])
    assert generated == [2, 2]  # the probes, before and after; not the two edits' prompts
    assert report["retained_edits"] == 2 and report["retention"] is not None
    assert [e["answer"] for e in report["edits"]] == [None, None] and len(report["edits"]) == 2


def test_a_dry_run_compares_the_answer_line_not_the_next_paragraph():
    """What follows the answer's line break (the next paragraph a small model starts) is not
    the answer: a patch that only changes it leaves locality alone (seen on the README's tour:
    " Washington.\\n\\nThe first president of" -> " Washington.\\n\\nThe first female president")."""
    from edit_serve.dry_run import _answer

    assert _answer(" Washington.\n\nThe first president of") == _answer(" Washington.\n\nThe first female president")
    assert _answer("\n\nParis, France") == "Paris, France" and _answer("\n\nRome, Italy") != "Paris, France"
    assert _answer(" five, six, seven, eight") == "five, six, seven, eight"
