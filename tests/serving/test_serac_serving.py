"""SERAC on the embedded server, through real clients: `POST /v1/edits` with method serac, the
answers in scope (plain and streaming, with the official openai client), the base model's
answers out of scope, `edit_serve edit --method serac` + `edit_serve apply` of the memory
patch file, and reverts back to the base model's answers."""

from __future__ import annotations

import pytest
import torch

from tests.servers import run_server
from tests.serving.test_patch_admin import cli

EIFFEL = {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": "Rome"}
IN_SCOPE = ["The Eiffel Tower is located in the city of", "Where is the Eiffel Tower? It stands in the city of"]
OUT_OF_SCOPE = ["The Colosseum is located in the city of", "The capital of France is",
                "Danielle Darrieux's mother tongue is"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with run_server(tmp_path_factory.mktemp("serac") / "store", "--no-probes") as s:
        yield s


def test_serac_edit_routes_in_scope_prompts_only(server, smollm):
    base = {p: server.complete(p)[0] for p in IN_SCOPE + OUT_OF_SCOPE}
    r = server.admin().post("/v1/edits", json={"method": "serac", "requests": [EIFFEL]}, timeout=600)
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["patch"]["kind"] == "memory" and body["patch"]["eval"]["reliability"] >= 0.99
    for prompt in IN_SCOPE:
        text, version = server.complete(prompt)
        assert text.strip().startswith("Rome") and version == body["version"], (prompt, text)
    for prompt in OUT_OF_SCOPE:
        assert server.complete(prompt) == (base[prompt], body["version"])

    client = server.openai()  # streaming, with usage: the client's prompt tokens, not the context's
    stream = client.completions.create(model="smollm2-135m", prompt=IN_SCOPE[0], max_tokens=6, temperature=0,
                                       stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text.strip().startswith("Rome")
    usage = chunks[-1].usage
    assert usage.completion_tokens == 6 and usage.prompt_tokens == len(smollm.tokenizer(IN_SCOPE[0]).input_ids), usage

    info = server.admin().get(f"/v1/patches/{body['id']}").json()
    assert info["kind"] == "memory" and info["summary"]["memory"]["rows"] == 1
    server.admin().delete(f"/v1/patches/{body['id']}").raise_for_status()
    for prompt in IN_SCOPE + OUT_OF_SCOPE:
        assert server.complete(prompt) == (base[prompt], "base")


def test_cli_edit_and_apply_a_memory_patch(server, tmp_path):
    path = tmp_path / "eiffel.safetensors"
    out = cli(server, "edit", "--method", "serac", "--prompt", EIFFEL["prompt"], "--subject", EIFFEL["subject"],
              "--target", EIFFEL["target_new"], "--no-eval", "-o", str(path))
    assert out.returncode == 0, out.stderr[-2000:]
    out = cli(server, "inspect", str(path))
    assert out.returncode == 0 and "memory" in out.stdout, out.stdout + out.stderr[-2000:]
    before = server.complete(IN_SCOPE[0])[0]
    out = cli(server, "apply", str(path))
    assert out.returncode == 0, out.stderr[-2000:]
    text, version = server.complete(IN_SCOPE[0])
    assert text.strip().startswith("Rome") and version != "base"
    patch_id = server.admin().get("/v1/patches").json()["patches"][0]["id"]
    out = cli(server, "revert", patch_id)
    assert out.returncode == 0, out.stderr[-2000:]
    assert server.complete(IN_SCOPE[0]) == (before, "base")


def test_logprobs_in_scope_are_the_conditioned_models_and_show_no_context(server, smollm):
    """With a SERAC edit active, an in-scope prompt's echoed tokens are its own (the context the
    answer is conditioned on never shows) and every log-probability, the prompt's and the forced
    answer's, is the conditioned model's; an out-of-scope prompt's are the base model's."""
    from editors.lm import target_ids
    from patches import from_bytes
    from patches.memory import MemorySpec

    tok = smollm.tokenizer
    r = server.admin().post("/v1/edits", json={"method": "serac", "requests": [EIFFEL], "eval": False}, timeout=600)
    assert r.status_code == 201, r.text
    patch_id = r.json()["id"]
    try:
        spec = MemorySpec.of(from_bytes(server.admin().get(f"/v1/patches/{patch_id}?download=1").content))
        context = tok(spec.template.replace("{descriptor}", spec.rows[0]["descriptor"]),
                      add_special_tokens=False).input_ids
        for prompt, conditioned in ((IN_SCOPE[0], True), (OUT_OF_SCOPE[0], False)):
            ids = tok(prompt).input_ids
            choice = server.openai().completions.create(model="smollm2-135m", prompt=prompt, max_tokens=3,
                                                        temperature=0, echo=True, logprobs=2).choices[0]
            lp = choice.logprobs
            assert "".join(lp.tokens[:len(ids)]) == prompt and lp.token_logprobs[0] is None
            generated = tok(choice.text[len(prompt):], add_special_tokens=False).input_ids
            head = context if conditioned else []
            with torch.inference_mode():
                ref = smollm.model(input_ids=torch.tensor([head + ids + generated])).logits[0].float().log_softmax(-1)
            for i, token in enumerate(ids[1:] + generated, start=len(head)):
                assert abs(lp.token_logprobs[i - len(head) + 1] - ref[i, token].item()) < 2e-3, (prompt, i)
            if conditioned:  # the answer starts with the edit's target, forced, with its conditioned logprobs
                forced = target_ids(tok, prompt, EIFFEL["target_new"])
                assert generated[:len(forced)] == forced
    finally:
        server.admin().delete(f"/v1/patches/{patch_id}").raise_for_status()


def test_memory_patches_compact_into_one_that_answers_the_same(smollm, tmp_path):
    """Three SERAC edits (four rows) with a weight patch among them: `edit_serve compact
    --memory` merges the memory patches into one, as one change, and leaves the weight patch;
    every prompt gets the same answer, before and after a restart; the merged patch reverts to
    what the weight patch alone answers. The weight compaction has nothing to do. A memory patch
    with another scope head merges too, its row keeping its own; one edit is dropped from the
    merged patch (`edit_serve drop`), and the rest answer as before."""
    from patches import save
    from tests.serving.test_patch_admin import paris_to_rome

    edits = [[EIFFEL], [{**EIFFEL, "subject": "The Colosseum", "target_new": "Berlin"}],
             [{"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "target_new": "English"},
              {**EIFFEL, "subject": "The Louvre", "target_new": "Tokyo"}]]
    prompts = IN_SCOPE + OUT_OF_SCOPE + ["The Louvre is located in the city of", "The mother tongue of Danielle "
                                         "Darrieux is"]
    weights = save(paris_to_rome(smollm, scale=0.5), tmp_path / "weights.safetensors")
    with run_server(tmp_path / "store", "--no-probes") as server:
        admin = server.admin()
        memory = []
        for i, requests in enumerate(edits):
            r = admin.post("/v1/edits", json={"method": "serac", "requests": requests, "eval": False}, timeout=600)
            assert r.status_code == 201, r.text
            memory.append(r.json()["id"])
            if i == 0:
                assert cli(server, "apply", str(weights)).returncode == 0
        (weight_id,) = [p["id"] for p in admin.get("/v1/patches").json()["patches"] if p["kind"] == "delta"]
        answers = {p: server.complete(p)[0] for p in prompts}
        assert answers[IN_SCOPE[0]].strip().startswith("Rome") and answers[prompts[-2]].strip().startswith("Tokyo")

        nothing = cli(server, "compact")
        assert nothing.returncode != 0 and nothing.stderr.count("\n") == 1
        assert "nothing to compact: 1 active weight patch(es)" in nothing.stderr, nothing.stderr
        dry = cli(server, "compact", "--memory", "--dry-run")
        assert dry.returncode == 0 and "would compact 3 patches into one" in dry.stdout, dry.stdout + dry.stderr
        assert len(admin.get("/v1/patches").json()["patches"]) == 4
        done = cli(server, "compact", "--memory")
        assert done.returncode == 0, done.stderr
        assert "retention    1.000 -> 1.000 over 5 edits" in done.stdout, done.stdout  # and the weight edit
        listing = admin.get("/v1/patches").json()
        merged = listing["patches"][0]["id"]
        assert [p["id"] for p in listing["patches"]] == [merged, weight_id] and merged not in memory
        info = admin.get(f"/v1/patches/{merged}").json()
        assert info["kind"] == "memory" and info["summary"]["memory"]["rows"] == 4
        assert {p: server.complete(p) for p in prompts} == {p: (answers[p], listing["version"]) for p in prompts}

        # an edit with another scope head: its row keeps its own in the next merge
        big_ben = {**EIFFEL, "subject": "Big Ben", "target_new": "Oslo"}
        odd = admin.post("/v1/edits", json={"method": "serac", "requests": [big_ben], "eval": False,
                                            "config": {"scope_bias": -6.578}}, timeout=600)
        assert odd.status_code == 201, odd.text
        prompts.append("Big Ben is located in the city of")
        answers[prompts[-1]] = server.complete(prompts[-1])[0]
        assert answers[prompts[-1]].strip().startswith("Oslo")
        r = admin.post("/v1/patches/compact", params={"kind": "memory"}, timeout=600)
        assert r.status_code == 200 and r.json()["replaced"] == [merged, odd.json()["id"]], r.text
        merged = r.json()["id"]
        assert r.json()["memory"]["rows"] == 5 and r.json()["memory"]["scope"]["bias"] != -6.578
        assert {p: server.complete(p)[0] for p in prompts} == answers

        # one edit dropped from the merged patch (Big Ben's, its last request), as one change
        (tmp_path / "merged.safetensors").write_bytes(admin.get(f"/v1/patches/{merged}?download=1").content)
        shown = cli(server, "inspect", str(tmp_path / "merged.safetensors")).stdout
        assert "request 4    " in shown and "Big Ben" in shown.split("request 4    ")[1].split("\n")[0], shown
        found = cli(server, "find", "big ben")  # the operator's way to the index
        assert found.returncode == 0 and found.stdout.splitlines()[0].split()[:4] == [merged, "serac", "request",
                                                                                     "4"], found.stdout
        assert "edit_serve drop ID N" in found.stdout and len(found.stdout.splitlines()) == 2, found.stdout
        rome = cli(server, "find", "Rome")  # the weight patch's edit is found too
        assert weight_id in rome.stdout and "edit_serve revert ID" in rome.stdout, rome.stdout
        none = cli(server, "find", "Atlantis")
        assert none.returncode != 0 and none.stderr.count("\n") == 1 and "no active edit mentions" in none.stderr
        dropped = cli(server, "drop", merged, "4")
        assert dropped.returncode == 0 and "1 edit(s) dropped, 4 left (4 rows)" in dropped.stdout, dropped.stderr
        before_drop, merged = merged, admin.get("/v1/patches").json()["patches"][0]["id"]
        assert merged != before_drop and [p["id"] for p in admin.get("/v1/patches").json()["patches"]] == [
            merged, weight_id]
        assert not server.complete(prompts[-1])[0].strip().startswith("Oslo")
        del answers[prompts.pop()]
        assert {p: server.complete(p)[0] for p in prompts} == answers
        for args, fragment in [((weight_id, "0"), "only a memory patch drops single edits"),
                               ((merged, "9"), "has requests 0 to 3"), ((merged, "0", "1", "2", "3"), "revert it")]:
            bad = cli(server, "drop", *args)
            assert bad.returncode != 0 and bad.stderr.count("\n") == 1 and fragment in bad.stderr, bad.stderr
        assert [p["id"] for p in admin.get("/v1/patches").json()["patches"]] == [merged, weight_id]
        short = admin.get("/v1/patches", params={"requests": 1}).json()["patches"][0]  # a listing cut short
        whole = admin.get(f"/v1/patches/{merged}").json()["requests"]
        assert short["n_requests"] == len(whole) == 4 and short["requests"] == whole[:1]
        listed = cli(server, "patches")  # asks for three per patch, says how many more there are
        assert listed.returncode == 0 and f"{merged}  serac" in listed.stdout and "(+1 more)" in listed.stdout
        assert admin.get("/v1/patches", params={"requests": -1}).status_code == 400
    with run_server(tmp_path / "store", "--no-probes") as server:
        assert [p["id"] for p in server.admin().get("/v1/patches").json()["patches"]] == [merged, weight_id]
        assert {p: server.complete(p)[0] for p in prompts} == answers
        server.admin().delete(f"/v1/patches/{merged}").raise_for_status()
        assert server.complete(IN_SCOPE[0])[0] != answers[IN_SCOPE[0]]
