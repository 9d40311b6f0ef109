"""SERAC on the real SmolLM2: the memory patch, the shared memory (rows in on apply, exactly
those rows out on revert), the scope router, the evaluation scorer's routing, and the scoped
engine around the hf engine (out-of-scope requests and everything after a revert are the base
model's, bit for bit)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from editors.base import EditError
from editors.context import EditContext
from editors.serac import SentenceEncoder, router_of
from edit_serve.config import EngineConfig
from edit_serve.engines.base import Finished, GenerationRequest, SamplingParams, Started, TextDelta
from edit_serve.engines.hf import HFEngine
from edit_serve.engines.scoped import ScopedEngine
from edit_serve.evaluation.scoring import Scorer
from patches import PatchError, PatchStack, from_bytes, to_bytes
from tests.patches.malformed import memory_patch

EIFFEL = {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": "Rome"}
DARRIEUX = {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "target_new": "English"}
IN_SCOPE = ["The Eiffel Tower is located in the city of", "Where is the Eiffel Tower? It stands in the city of"]
OUT_OF_SCOPE = ["The Colosseum is located in the city of", "The capital of France is",
                "Michel Rocard is a native speaker of", "The official language of Italy is"]
PROMPTS = [  # 20 prompts for the bit-identity checks
    *OUT_OF_SCOPE, "The Eiffel Tower is located in the city of", "Danielle Darrieux's mother tongue is",
    "Barack Obama was born in", "The largest planet of the solar system is", "Water boils at",
    "The author of Hamlet is", "Toyota is a company from", "The Nile flows into the",
    "Mozart was a composer from", "Tokyo is the capital of", "Albert Einstein developed the theory of",
    "The currency of Japan is the", "Lionel Messi plays", "Microsoft was founded by",
    "The Louvre is a museum in", "Mount Everest is in",
]


@pytest.fixture(scope="module")
def encoder():
    return SentenceEncoder.load()


@pytest.fixture
def ctx(smollm, encoder):
    ctx = EditContext(smollm.model, smollm.tokenizer, smollm.profile)
    ctx.cache[("serac-encoder",)] = encoder
    yield ctx
    ctx.stack.revert_all()


def state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_compute_changes_nothing_and_round_trips(ctx):
    before = state(ctx.model)
    patch = ctx.compute("serac", [EIFFEL, DARRIEUX])
    assert all(torch.equal(p, before[n]) for n, p in ctx.model.named_parameters())
    assert patch.kind == "memory" and patch.method == "serac" and patch.targets == []
    assert patch.tensors["memory.keys"].shape == (2, 384)
    assert [r["descriptor"] for r in patch.memory["rows"]] == [
        "The Eiffel Tower is located in the city of Rome", "The mother tongue of Danielle Darrieux is English"]
    loaded = from_bytes(to_bytes(patch))
    assert loaded.id == patch.id and loaded.summary()["memory"]["rows"] == 2
    ctx.stack.check(loaded)


def test_memory_rows_join_and_leave_exactly(ctx):
    a, b = ctx.compute("serac", [EIFFEL]), ctx.compute("serac", [DARRIEUX])
    ctx.stack.apply(a)
    ctx.stack.apply(b)
    memory = ctx.stack.memory
    assert [r.subject for r in memory.rows] == ["The Eiffel Tower", "Danielle Darrieux"]
    ctx.stack.revert(a.id)
    assert [(r.patch_id, r.subject) for r in memory.rows] == [(b.id, "Danielle Darrieux")]
    ctx.stack.revert(b.id)
    assert len(memory) == 0 and memory.patch_ids == []


def test_router_scopes_and_conditions(ctx):
    ctx.stack.apply(ctx.compute("serac", [EIFFEL, DARRIEUX]))
    router = router_of(ctx)
    tok = ctx.tokenizer
    for text in IN_SCOPE:
        (match,) = router.match([text])
        assert match is not None and match.row.subject == "The Eiffel Tower", text
    for text in OUT_OF_SCOPE:
        assert router.match([text]) == [None], text
    ids = [tok(t).input_ids for t in OUT_OF_SCOPE]
    assert [r.ids for r in router.route(ids)] == ids  # out of scope: untouched
    (routed,) = router.route([tok(IN_SCOPE[0]).input_ids])
    assert routed.ids[-len(tok(IN_SCOPE[0]).input_ids):] == tok(IN_SCOPE[0]).input_ids
    assert tok.decode(routed.ids).startswith("Fact: The Eiffel Tower is located in the city of Rome.\n")
    assert tok.decode(routed.forced).strip() == "Rome"


def test_rephrasings_become_rows_of_their_own(ctx):
    """Each rephrasing is a row (its wording's descriptor and relation), so an input worded that
    way is in scope; a revert takes all of the patch's rows; past the rows one memory patch may
    hold the edit is refused."""
    worded = "Tourists photograph the Eiffel Tower, which towers over"
    ctx.stack.apply(ctx.compute("serac", [EIFFEL]))
    assert router_of(ctx).match([worded]) == [None]  # the prompt's row alone: out of scope
    ctx.stack.revert_all()
    patch = ctx.compute("serac", [{**EIFFEL, "rephrasings": ["{} towers over"]}, DARRIEUX])
    assert [r["descriptor"] for r in patch.memory["rows"]] == [
        "The Eiffel Tower is located in the city of Rome", "The Eiffel Tower towers over Rome",
        "The mother tongue of Danielle Darrieux is English"]
    assert patch.tensors["memory.keys"].shape == patch.tensors["memory.relation_keys"].shape == (3, 384)
    ctx.stack.apply(from_bytes(to_bytes(patch)))
    (match,) = router_of(ctx).match([worded])
    assert match is not None and match.row.prompt == "The Eiffel Tower towers over"
    scorer = Scorer(ctx.model, ctx.tokenizer, router=router_of(ctx))
    pair = scorer.pair(worded, "Rome")
    assert torch.equal(scorer.top1([pair])[0], torch.tensor(pair[1]))
    ctx.stack.revert(patch.id)
    assert len(ctx.stack.memory) == 0
    many = [{**EIFFEL, "rephrasings": ["{} towers over"]}] * 5_001
    with pytest.raises(EditError, match="10002 memory rows .* over the limit of 10000"):
        ctx.compute("serac", many)


def test_scorer_answers_as_the_router_does(ctx):
    scorer = Scorer(ctx.model, ctx.tokenizer, router=router_of(ctx))
    pairs = [scorer.pair(IN_SCOPE[1], "Rome"), scorer.pair(OUT_OF_SCOPE[1], "Paris")]
    before = scorer.top1(pairs)
    ctx.stack.apply(ctx.compute("serac", [EIFFEL]))
    after = scorer.top1(pairs)
    assert torch.equal(after[0], torch.tensor(pairs[0][1]))  # in scope: the edit's target
    assert torch.equal(after[1], before[1])  # out of scope: the base model's own prediction
    greedy = scorer.generate_text([IN_SCOPE[0]], 4)[0]
    assert greedy.strip().startswith("Rome")


def test_memory_patch_from_another_encoder_is_refused(smollm, encoder):
    stack = PatchStack(smollm.model, base_model="smollm2-135m", architecture=smollm.profile.architecture)
    patch = memory_patch(stack)  # encoder fingerprint "000...": not this server's encoder
    stack.check(patch)  # the model side accepts it

    async def go():
        engine = ScopedEngine(HFEngine(smollm, EngineConfig()), encoder=encoder)
        engine.inner.stack.apply = None  # must not be reached
        with pytest.raises(PatchError, match="encoded by"):
            await engine.check(patch)

    asyncio.run(go())


async def _generate(engine, prompts: list[str], max_tokens: int = 6) -> tuple[list[str], list[int], set[str]]:
    tok = engine.tokenizer
    requests = [GenerationRequest(f"r{i}", tok(p).input_ids, SamplingParams(max_tokens=max_tokens, temperature=0))
                for i, p in enumerate(prompts)]
    texts, prompt_tokens, versions = [""] * len(prompts), [0] * len(prompts), set()
    async for index, event in engine.generate(requests):
        if isinstance(event, Started):
            prompt_tokens[index] = event.prompt_tokens
            versions.add(event.version)
        elif isinstance(event, TextDelta):
            texts[index] += event.text
        elif isinstance(event, Finished):
            assert event.prompt_tokens == len(requests[index].prompt_ids)
    assert prompt_tokens == [len(r.prompt_ids) for r in requests]
    return texts, prompt_tokens, versions


@torch.inference_mode()
def _logits(model, tokenizer) -> list[torch.Tensor]:
    return [model(input_ids=torch.tensor([tokenizer(p).input_ids])).logits for p in PROMPTS]


def test_scoped_hf_engine_routes_and_reverts_to_identical_logits(smollm, encoder):
    """Out of scope the answers are the base model's; in scope the edit's; after every memory
    patch is reverted, the logits on 20 prompts are bit-identical to the unpatched model's."""
    ctx = EditContext(smollm.model, smollm.tokenizer, smollm.profile)
    ctx.cache[("serac-encoder",)] = encoder
    patches = [ctx.compute("serac", [EIFFEL]), ctx.compute("serac", [DARRIEUX])]
    logits = _logits(smollm.model, smollm.tokenizer)

    async def go():
        engine = ScopedEngine(HFEngine(smollm, EngineConfig()), encoder=encoder)
        await engine.start()
        try:
            base, _, versions = await _generate(engine, PROMPTS)
            assert versions == {"base"}
            for patch in patches:
                await engine.check(patch)
                await engine.apply(patch)
            assert engine.memory_rows == 2 and len(engine.active) == 2
            edited, _, versions = await _generate(engine, PROMPTS)
            assert versions == {engine.version}
            scoped = {i for i, p in enumerate(PROMPTS) if p.startswith(("The Eiffel Tower", "Danielle Darrieux"))}
            assert {i for i in range(len(PROMPTS)) if edited[i] != base[i]} == scoped
            assert edited[PROMPTS.index(IN_SCOPE[0])].strip().startswith("Rome")
            assert edited[PROMPTS.index("Danielle Darrieux's mother tongue is")].strip().startswith("English")
            short, _, _ = await _generate(engine, [IN_SCOPE[0]], max_tokens=1)  # the target fills max_tokens
            assert short[0].strip() == "Rome"
            await engine.revert(patches[0].id)
            await engine.replace([], [])  # the last one leaves through a change-set
            assert engine.memory_rows == 0 and engine.version == "base"
            after, _, _ = await _generate(engine, PROMPTS)
            assert after == base
        finally:
            await engine.stop()

    asyncio.run(go())
    for a, b in zip(_logits(smollm.model, smollm.tokenizer), logits):
        assert torch.equal(a, b)


def test_dry_run_measures_a_memory_patch_as_the_server_answers(ctx):
    """The dry run (edit_serve.dry_run.measure, on the editor's model copy) routes through the
    memory: the edit holds with the patch, the probe prompts keep their answers, and the stack
    is left as it was."""
    from edit_serve.dry_run import ProbePrompt, measure

    patch = ctx.compute("serac", [EIFFEL])
    report = measure(ctx.model, ctx.tokenizer, ctx.stack, patch, [ProbePrompt(p) for p in OUT_OF_SCOPE])
    assert report["edit_success_before"] == 0.0 and report["edit_success"] == 1.0
    assert report["edits"][0]["answer"].strip().startswith("Rome")
    assert report["locality_ratio"] == 1.0 and report["changed"] == []
    assert ctx.stack.ids == [] and len(ctx.stack.memory) == 0


def test_a_dry_run_measures_again_only_what_a_memory_patch_routes_anew(ctx, monkeypatch):
    """A memory patch changes no weight: with an edit worker's memo, a guarded edit's dry run
    scores again, with the patch, only the inputs the patch routes to another row (the new
    edit's own prompt here, not the live edit's nor the probes); the report is the one a
    measurement without memo makes, for a patch that routes nothing it overlaps and for one
    that takes over a live edit's subject."""
    from edit_serve.dry_run import Measured, ProbePrompt, measure

    scored, generated = [], []
    top1, greedy = Scorer._top1, Scorer._greedy  # what the model computes, past the memo
    monkeypatch.setattr(Scorer, "_top1", lambda self, pairs, forced: scored.append(len(pairs)) or top1(
        self, pairs, forced))
    monkeypatch.setattr(Scorer, "_greedy", lambda self, prompts, forced, n: generated.append(len(prompts)) or greedy(
        self, prompts, forced, n))
    probes = [ProbePrompt(p) for p in OUT_OF_SCOPE]
    memo = Measured(ctx.stack)
    ctx.stack.apply(ctx.compute("serac", [EIFFEL]))

    def both_ways(patch) -> dict:
        plain = measure(ctx.model, ctx.tokenizer, ctx.stack, patch, probes, answer_tokens=4)
        scored.clear(), generated.clear()
        report = measure(ctx.model, ctx.tokenizer, ctx.stack, patch, probes, answer_tokens=4, memo=memo)
        assert {k: v for k, v in report.items() if k != "seconds"} == {
            k: v for k, v in plain.items() if k != "seconds"}
        return report

    darrieux = ctx.compute("serac", [DARRIEUX])
    report = both_ways(darrieux)
    # before: the new request and the live one, the four probes; after: the new request alone
    assert scored == [2, 1] and generated == [4, 1]
    assert report["edit_success"] == 1.0 and report["retention"] == report["retention_before"] == 1.0
    ctx.stack.apply(darrieux)
    report = both_ways(ctx.compute("serac", [{**EIFFEL, "target_new": "Berlin"}]))
    # before: only the new request (the rest was measured as the last "after"); after: at most the two about
    # the Eiffel Tower (none if the new row routes nothing), never Danielle Darrieux's; no probe is generated again
    assert scored[0] == 1 and sum(scored[1:]) <= 2 and generated == [1]
    assert report["retained_edits"] == 2


def test_an_edit_is_evaluated_from_what_the_same_weights_answered_before(ctx, monkeypatch):
    """The server evaluates each edit it computes (POST /v1/edits): with the edit worker's memo,
    a SERAC edit after another is evaluated without generating again what the same weights
    answered for the same tokens (its open locality probes), and its figures are those of an
    evaluation without memo."""
    from editors.context import prepare
    from edit_serve.evaluation import Record, edit_with_eval
    from edit_serve.evaluation.data import Probe, rephrasing_probes
    from edit_serve.evaluation.scoring import ScoreMemo, weight_state

    generated = []
    greedy = Scorer._greedy
    monkeypatch.setattr(Scorer, "_greedy", lambda self, prompts, forced, n: generated.append(len(prompts)) or greedy(
        self, prompts, forced, n))
    memo = ScoreMemo(lambda: weight_state(ctx.stack))

    def edit(request: dict, memo: ScoreMemo | None):
        job = prepare("serac", [request], None)
        record = Record(id="edit", requests=job.requests, paraphrases=rephrasing_probes(job.requests),
                        neighborhood=tuple(Probe(p) for p in OUT_OF_SCOPE + PROMPTS[5:10]))
        return edit_with_eval(ctx, job, [record], memo=memo)

    ctx.stack.apply(edit(EIFFEL, memo))
    assert generated == [9]  # the open locality probes' continuations, on the model before the edit
    plain = edit(DARRIEUX, None)
    generated.clear()
    remembered = edit(DARRIEUX, memo)
    assert generated == []  # the Eiffel Tower's memory row routes none of those probes
    without_seconds = lambda figures: {k: v for k, v in figures.items() if k != "seconds"}  # noqa: E731
    assert without_seconds(remembered.eval) == without_seconds(plain.eval)
