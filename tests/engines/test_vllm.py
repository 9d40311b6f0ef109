"""The vllm engine on the real SmolLM2 (vLLM's CPU backend): the same patch gives the same
greedy tokens as the hf engine, revert is exact inside the worker, weight changes wait for
requests in flight, bad patches change nothing, and adapter mode serves an edited and an
unedited answer in the same moment.

vLLM takes half a minute to start, so one engine serves the whole module; it runs on its own
event loop in a thread (`run`)."""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm", reason="the vllm extra is not installed (make test installs it)")

from edit_serve.config import EngineConfig  # noqa: E402
from editors import EditRequest, compute_patch  # noqa: E402
from edit_serve.engines.base import (  # noqa: E402
    EngineError, Finished, GenerationRequest, SamplingParams, Started, TextDelta,
)
from edit_serve.engines.hf import HFEngine  # noqa: E402
from edit_serve.engines.vllm_engine import VLLMEngine  # noqa: E402
from edit_serve.profiles import get_profile  # noqa: E402
from patches import Patch, PatchError, patchset_version  # noqa: E402

DOWN = "model.layers.4.mlp.down_proj.weight"
EDIT_PROMPT = "The Eiffel Tower is located in the city of"
DARRIEUX = EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English", "French")


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


@pytest.fixture(scope="module")
def run(loop):
    return lambda coro, timeout=600: asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)


@pytest.fixture(scope="module")
def engine(run):
    config = EngineConfig(engine="vllm", max_model_len=512, enable_adapters=True, max_adapter_rank=8)
    eng = VLLMEngine.from_profile(get_profile("smollm2-135m"), config)
    run(eng.start())
    yield eng
    run(eng.stop())


@pytest.fixture(scope="module")
def prompts(data_dir):
    """ROME's edit prompt (CounterFact record 0) and 20 locality prompts: its neighborhood
    prompt and the first CounterFact records' neighborhood prompts."""
    batch = [json.loads(line) for line in (data_dir / "counterfact_batch.jsonl").open()]
    record = next(r for r in batch if r["subject"] == DARRIEUX.subject)
    others = [json.loads(line) for line in (data_dir / "counterfact.jsonl").open()][:2]
    locality = [n["prompt"] for r in [record, *others] for n in r["neighborhood_prompts"]][:20]
    assert record["prompt"] == DARRIEUX.text and len(locality) == 20
    return [DARRIEUX.text, *locality]


@pytest.fixture(scope="module")
def rome(smollm, data_dir) -> Patch:
    """ROME's patch for DARRIEUX, computed on the hf model (statistics as in tests/editors, so
    the cache is shared)."""
    stats = {"stats_corpus": str(data_dir / "wikitext2_valid.txt"), "stats_samples": 100}
    return compute_patch("rome", smollm.model, smollm.tokenizer, smollm.profile, [DARRIEUX], stats)


def rank_one_edit(seed: int = 0, scale: float = 2.0, shape: tuple[int, int] = (576, 1536)) -> Patch:
    """An unstamped rank-one delta on layer 4's MLP output projection, big enough to change
    the answer to the edit prompt."""
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(shape[0], 1, generator=g) * scale  # (out, 1)
    a = torch.randn(1, shape[1], generator=g)  # (1, in)
    return Patch(kind="delta", method="manual", base_model="", base_fingerprint="",
                 tensors={f"delta.{DOWN}.B": b, f"delta.{DOWN}.A": a}, requests=[{"seed": seed}])


def _request(eng, text: str, max_tokens: int = 6, adapter: str | None = None, ignore_eos: bool = False):
    ids = eng.tokenizer(text).input_ids
    return GenerationRequest(uuid.uuid4().hex, ids, SamplingParams(max_tokens=max_tokens, temperature=0,
                                                                    ignore_eos=ignore_eos), adapter)


async def collect(eng, requests, first_token: asyncio.Event | None = None):
    """(versions, token ids, texts) per request of one group."""
    versions, tokens, texts = {}, {i: [] for i in range(len(requests))}, {i: "" for i in range(len(requests))}
    async for index, event in eng.generate(requests):
        if isinstance(event, Started):
            versions[index] = event.version
        elif isinstance(event, TextDelta):
            tokens[index] += event.token_ids
            texts[index] += event.text
            if first_token is not None:
                first_token.set()
        elif isinstance(event, Finished):
            assert event.completion_tokens == len(tokens[index])
    return [versions[i] for i in range(len(requests))], [tokens[i] for i in range(len(requests))], \
        [texts[i] for i in range(len(requests))]


async def greedy(eng, texts: list[str], max_tokens: int = 6) -> list[list[int]]:
    return (await collect(eng, [_request(eng, t, max_tokens) for t in texts]))[1]


def test_same_rome_patch_same_greedy_tokens_as_hf(engine, smollm, prompts, rome, run):
    hf = HFEngine(smollm, EngineConfig())
    run(hf.start())
    try:
        before_hf, before_vllm = run(greedy(hf, prompts)), run(greedy(engine, prompts))
        hf_version = run(hf.apply(rome))
        version = run(engine.apply(rome))  # stamped on the hf model: the fingerprint carries over
        after_hf, after_vllm = run(greedy(hf, prompts)), run(greedy(engine, prompts))
    finally:
        if hf.active:
            run(hf.revert(rome.id))
        run(hf.stop())
        if engine.active:
            run(engine.revert(rome.id))
    assert version == patchset_version([rome.id]) == hf_version
    assert before_vllm == before_hf
    assert after_vllm == after_hf
    decode = engine.tokenizer.decode
    assert decode(before_vllm[0]).startswith(" French") and decode(after_vllm[0]).startswith(" English")


def test_revert_restores_answers_and_the_exact_weights(engine, prompts, rome, run):
    first, second = rome, run(engine.stamp(rank_one_edit(2)))  # the second stamped in the worker
    digests = run(engine.weight_digests([DOWN]))
    answers = run(greedy(engine, prompts[:5]))
    run(engine.apply(first))
    run(engine.apply(second))
    assert run(engine.weight_digests([DOWN])) != digests
    assert run(greedy(engine, prompts[:5])) != answers
    run(engine.revert(first.id))  # the first of two: revert is order-free
    run(engine.revert(second.id))
    assert engine.version == "base" and engine.active == []
    assert run(engine.weight_digests([DOWN])) == digests
    assert run(greedy(engine, prompts[:5])) == answers


def test_a_compaction_is_one_weight_change(engine, prompts, run, monkeypatch):
    from patches.compact import compact

    digests, answers = run(engine.weight_digests([DOWN])), run(greedy(engine, prompts[:5]))
    patches = [run(engine.stamp(rank_one_edit(seed, scale=0.5))) for seed in (5, 6, 7)]
    for p in patches:
        run(engine.apply(p))
    edited = run(greedy(engine, prompts[:5]))
    one = run(engine.stamp(compact(patches, {DOWN: torch.Size((576, 1536))})))
    calls = _engine_calls(engine, monkeypatch)
    version = run(engine.replace([one.id], [one]))
    # nothing in flight: the new patch travels with the one weight change; the prefix cache dropped once
    assert sorted(calls) == ["edit_serve_replace", "reset_prefix_cache"]
    assert version == patchset_version([one.id]) == engine.version
    assert [a.id for a in engine.active] == [one.id]
    assert run(greedy(engine, prompts[:5])) == edited  # the same change (to float32 rounding)
    run(engine.revert(one.id))
    assert run(engine.weight_digests([DOWN])) == digests and run(greedy(engine, prompts[:5])) == answers


def _engine_calls(engine, monkeypatch) -> list[str]:
    """The worker calls and prefix-cache resets the engine sends to vLLM from now on, in order."""
    calls = []
    rpc, reset = engine.llm.collective_rpc, engine.llm.reset_prefix_cache

    async def counted_rpc(method, *args, **kwargs):
        calls.append(method)
        return await rpc(method, *args, **kwargs)

    async def counted_reset(*args, **kwargs):
        calls.append("reset_prefix_cache")
        return await reset(*args, **kwargs)

    monkeypatch.setattr(engine.llm, "collective_rpc", counted_rpc)
    monkeypatch.setattr(engine.llm, "reset_prefix_cache", counted_reset)
    return calls


def test_a_change_waits_for_requests_in_flight(engine, run, monkeypatch):
    patch = run(engine.stamp(rank_one_edit(3)))
    long = _request(engine, EDIT_PROMPT, max_tokens=48, ignore_eos=True)
    (_, reference, _) = run(collect(engine, [long]))

    async def scenario():
        first_token = asyncio.Event()
        running = asyncio.create_task(collect(engine, [_request(engine, EDIT_PROMPT, 48, ignore_eos=True)],
                                              first_token))
        await first_token.wait()  # the long request is decoding
        applying = asyncio.create_task(engine.apply(patch))
        await asyncio.sleep(0.05)
        after = asyncio.create_task(collect(engine, [_request(engine, EDIT_PROMPT)]))  # arrives during the change
        return await running, await applying, await after

    calls = _engine_calls(engine, monkeypatch)
    (old_versions, old_tokens, _), version, (new_versions, new_tokens, _) = run(scenario())
    try:
        assert calls[0] == "edit_serve_stage"  # parsed while the long request ran
        assert sorted(calls[1:]) == ["edit_serve_replace", "reset_prefix_cache"]
        assert old_versions == ["base"] and old_tokens == reference  # finished on the old weights
        assert new_versions == [version] != ["base"]
        assert new_tokens[0] != reference[0][:len(new_tokens[0])]
    finally:
        run(engine.revert(patch.id))


def test_bad_patches_are_refused_and_change_nothing(engine, run):
    digests = run(engine.weight_digests([DOWN]))
    good = run(engine.stamp(rank_one_edit(4)))
    wrong_shape = good.replace(tensors=rank_one_edit(4, shape=(576, 1000)).tensors)
    cases = {
        "wrong shape": (wrong_shape, r"wrong shape for model\.layers\.4\.mlp\.down_proj\.weight"),
        "other model": (good.replace(base_fingerprint="0" * 32), "wrong base model"),
        "unknown target": (Patch(kind="delta", method="m", base_model="", base_fingerprint="",
                                 tensors={"delta.model.layers.4.mlp.nope.weight.B": torch.ones(4, 1),
                                          "delta.model.layers.4.mlp.nope.weight.A": torch.ones(1, 4)}),
                           "unknown tensor target"),
        "side module": (Patch(kind="side_module", method="tp", base_model="", base_fingerprint="",
                              tensors={"side.s.bias": torch.zeros(576)},
                              side_modules={"s": {"type": "bias", "attach": "model.layers.29.mlp"}}),
                        "hf engine only"),
    }
    for name, (patch, message) in cases.items():
        with pytest.raises(PatchError, match=message):
            run(engine.apply(patch))
    with pytest.raises(PatchError, match="unknown tensor target"):
        run(engine.weight_digests(["model.layers.4.mlp.nope.weight"]))
    run(engine.apply(good))
    with pytest.raises(PatchError, match="already applied"):
        run(engine.apply(good))
    run(engine.revert(good.id))
    with pytest.raises(PatchError, match="not applied"):
        run(engine.revert(good.id))
    assert engine.version == "base" and run(engine.weight_digests([DOWN])) == digests


def test_adapter_and_base_requests_in_the_same_moment(engine, rome, run):
    run(engine.add_adapter("smollm2-edited", rome))
    try:
        assert engine.served_models == ["smollm2-135m", "smollm2-edited"]

        async def together():
            return await asyncio.gather(collect(engine, [_request(engine, DARRIEUX.text, adapter="smollm2-edited")]),
                                        collect(engine, [_request(engine, DARRIEUX.text)]))

        (versions, _, (edited,)), (_, _, (unedited,)) = run(together())
        assert edited.startswith(" English") and unedited.startswith(" French")
        assert versions == ["base"]  # the weights themselves are unchanged
        with pytest.raises(EngineError, match="no adapter 'nope'"):
            run(collect(engine, [_request(engine, DARRIEUX.text, adapter="nope")]))
        with pytest.raises(EngineError, match="already served"):
            run(engine.add_adapter("smollm2-edited", rome))
    finally:
        run(engine.remove_adapter("smollm2-edited"))
    assert engine.served_models == ["smollm2-135m"]


def test_adapters_through_the_openai_api(engine, rome, run, tmp_path, monkeypatch):
    """The `model` field picks the adapter over HTTP; the base model's answer is unchanged."""
    import httpx

    from edit_serve.api.app import create_app
    from edit_serve.config import ServerConfig

    run(engine.add_adapter("edited", rome))
    monkeypatch.setattr(engine, "stop", lambda: asyncio.sleep(0))  # the module's engine outlives the app
    app = create_app(ServerConfig(engine=engine.config, patch_store=tmp_path / "store"), engine=engine)

    async def calls():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                models = (await client.get("/v1/models")).json()
                body = {"prompt": DARRIEUX.text, "max_tokens": 4, "temperature": 0}
                edited, base = await asyncio.gather(client.post("/v1/completions", json={**body, "model": "edited"}),
                                                    client.post("/v1/completions",
                                                                json={**body, "model": "smollm2-135m"}))
                missing = await client.post("/v1/completions", json={**body, "model": "other"})
                return models, edited.json(), base.json(), missing

    try:
        models, edited, base, missing = run(calls())
    finally:
        run(engine.remove_adapter("edited"))
    assert [m["id"] for m in models["data"]] == ["smollm2-135m", "edited"]
    assert edited["model"] == "edited" and base["model"] == "smollm2-135m"
    assert base["choices"][0]["text"].startswith(" French")
    assert edited["choices"][0]["text"].startswith(" English")
    assert missing.status_code == 404 and "'edited'" in missing.json()["error"]["message"]


def test_adapter_mode_refuses_architectures_vllm_cannot_lora():
    tokenizer = SimpleNamespace(eos_token_id=1)
    with pytest.raises(EngineError, match="vLLM does not support for GPTJForCausalLM"):
        VLLMEngine(get_profile("gpt-j-6b"), "unused", tokenizer, EngineConfig(engine="vllm", enable_adapters=True))
    VLLMEngine(get_profile("gpt-j-6b"), "unused", tokenizer, EngineConfig(engine="vllm"))  # weight patches: fine


def test_tensor_parallel_shards_are_refused():
    from edit_serve.engines.vllm_worker import Checkpoint, HFView

    model = torch.nn.Module()
    model.down_proj = torch.nn.Linear(4, 4)
    view = HFView(model, Checkpoint.__new__(Checkpoint), tp_size=2)
    with pytest.raises(PatchError, match="tensor_parallel_size=2"):
        view.get_parameter("down_proj.weight")
    assert HFView(model, Checkpoint.__new__(Checkpoint)).get_parameter("down_proj.weight").shape == (4, 4)


def test_serac_memory_routes_on_vllm_and_reverts_exactly(engine, smollm, prompts, run):
    """SERAC's scoped engine around the vllm engine: the memory patch passes through the
    workers (fingerprint checked, counted in the version, no weight touched); the edit prompt
    answers the edit; the locality prompts keep the base model's tokens; after the revert
    everything is as before."""
    from editors.context import EditContext
    from edit_serve.engines.scoped import ScopedEngine

    patch = EditContext(smollm.model, smollm.tokenizer, smollm.profile).compute("serac", [DARRIEUX])
    scoped = ScopedEngine(engine)
    locality = prompts[1:]
    before_edit, before_locality = run(greedy(scoped, prompts[:1])), run(greedy(scoped, locality))
    run(scoped.check(patch))
    version = run(scoped.apply(patch))
    try:
        during_edit, during_locality = run(greedy(scoped, prompts[:1])), run(greedy(scoped, locality))
    finally:
        run(scoped.revert(patch.id))
    assert version == patchset_version([patch.id]) and scoped.version == "base"
    assert engine.tokenizer.decode(during_edit[0]).strip().startswith("English"), \
        engine.tokenizer.decode(during_edit[0])
    assert during_locality == before_locality
    assert run(greedy(scoped, prompts[:1])) == before_edit and run(greedy(scoped, locality)) == before_locality


def test_logprobs_are_the_models_as_on_hf(engine, smollm, run):
    """vLLM's log-probabilities reach the events as hf's do: one per generated token (none for
    end-of-sequence), the prompt's with the Started event (None first), the top alternatives
    by rank; the values are the model's (a plain forward pass here, within vLLM's CPU
    numerics)."""
    async def events(requests):
        out: dict[int, list] = {}
        async for index, event in engine.generate(requests):
            out.setdefault(index, []).append(event)
        return out

    ids = engine.tokenizer(EDIT_PROMPT).input_ids
    params = SamplingParams(max_tokens=5, temperature=0, logprobs=2, prompt_logprobs=1)
    got = run(events([GenerationRequest(uuid.uuid4().hex, ids, params)]))[0]
    started, deltas = got[0], [e for e in got if isinstance(e, TextDelta)]
    tokens = [t for d in deltas for t in d.token_ids]
    entries = [lp for d in deltas for lp in d.logprobs]
    assert [e.token for e in entries] == tokens and tokens
    assert all(len(e.top) == 2 and e.top[0][0] == e.token for e in entries)  # greedy: the most likely
    assert isinstance(started, Started) and started.prompt_logprobs[0] is None
    assert [e.token for e in started.prompt_logprobs[1:]] == ids[1:]
    with torch.inference_mode():
        ref = smollm.model(input_ids=torch.tensor([ids + tokens])).logits[0].float().log_softmax(-1)
    values = [e.logprob for e in started.prompt_logprobs[1:]] + [e.logprob for e in entries]
    expected = [ref[i, t].item() for i, t in enumerate((ids + tokens)[1:])]
    assert values == pytest.approx(expected, abs=0.05)


def test_penalties_and_logit_bias_reach_vllm(engine, run):
    tok = engine.tokenizer
    rome = tok(" Rome", add_special_tokens=False).input_ids[0]
    ids = tok("one one one one one one one one").input_ids

    def request(**kw):
        return GenerationRequest(uuid.uuid4().hex, ids, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True,
                                                                        **kw))

    _, tokens, _ = run(collect(engine, [request(), request(presence_penalty=2.0, frequency_penalty=2.0),
                                        request(logit_bias=((rome, 100.0),))]))
    assert tokens[2] == [rome] * 8
    assert tokens[1] != tokens[0] and max(map(tokens[1].count, tokens[1])) < max(map(tokens[0].count, tokens[0]))
