"""The hf engine's scheduler on the real SmolLM2: prefill in chunks gives the same greedy
tokens as one pass, `n` copies of a prompt are prefilled once, and a short request that
arrives while a long one runs finishes first instead of waiting for it."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from edit_serve.config import EngineConfig
from edit_serve.engines.base import EngineError, Finished, GenerationRequest, SamplingParams, Started, TextDelta
from edit_serve.engines.hf import HFEngine, prompt_logprobs

PROMPTS = ["The Eiffel Tower is located in the city of", "The official language of Italy is",
           "Danielle Darrieux's mother tongue is"]


async def complete(engine: HFEngine, ids: list[list[int]], max_tokens: int = 8, n: int = 1) -> list[str]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    requests = [GenerationRequest(f"r{i}-{j}", p, params) for i, p in enumerate(ids) for j in range(n)]
    texts = [""] * len(requests)
    async for index, event in engine.generate(requests):
        if isinstance(event, TextDelta):
            texts[index] += event.text
    return texts


def run_engine(smollm, coro_fn, **config):
    async def main():
        engine = HFEngine(smollm, EngineConfig(**config))
        await engine.start()
        try:
            return await coro_fn(engine)
        finally:
            await engine.stop()

    return asyncio.run(main())


def test_start_prepares_the_first_edits_weights_and_leaves_them_exact(smollm, monkeypatch):
    from patches import stack as stack_module

    names = smollm.profile.first_edit_weights()
    assert names == [f"model.layers.{i}.mlp.down_proj.weight" for i in (3, 4, 5, 6, 7)]  # rome's and memit's
    before = {n: smollm.model.get_parameter(n).detach().clone() for n in names}

    async def stamp(engine):
        assert all(torch.equal(smollm.model.get_parameter(n), before[n]) for n in names) and not engine.stack.ids
        digested = []
        monkeypatch.setattr(stack_module, "tensor_digest", lambda name, tensor: digested.append(name))
        engine.stack.base_fingerprint(names)  # what the first ROME or MEMIT patch's check needs: made at start
        return digested

    assert run_engine(smollm, stamp) == []


def test_chunked_prefill_gives_the_same_greedy_tokens(smollm):
    tok = smollm.tokenizer
    # prompts of different lengths, so chunks cut through left padding
    ids = [tok(("Some context. " * k) + p).input_ids for k, p in zip((0, 7, 3), PROMPTS)]
    whole = run_engine(smollm, lambda e: complete(e, ids), prefill_chunk_tokens=65536)
    chunked = run_engine(smollm, lambda e: complete(e, ids), prefill_chunk_tokens=16)
    assert chunked == whole
    assert "Paris" in whole[0]


def test_n_copies_are_prefilled_once_and_agree(smollm):
    ids = [smollm.tokenizer(PROMPTS[0]).input_ids, smollm.tokenizer(PROMPTS[1]).input_ids]
    texts = run_engine(smollm, lambda e: complete(e, ids, n=3), prefill_chunk_tokens=16)
    assert texts[:3] == [texts[0]] * 3 and texts[3:] == [texts[3]] * 3 and texts[0] != texts[3]
    alone = run_engine(smollm, lambda e: complete(e, ids[:1]))
    assert texts[0] == alone[0]


def test_a_short_request_does_not_wait_for_a_long_one(smollm):
    long_prompt = smollm.tokenizer("The history of the city begins with " * 40).input_ids  # ~320 tokens
    short_prompt = smollm.tokenizer(PROMPTS[0]).input_ids

    async def race(engine: HFEngine) -> list[str]:
        finished: list[str] = []

        async def go(name: str, ids: list[int], n: int, max_tokens: int):
            params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
            requests = [GenerationRequest(f"{name}{j}", ids, params) for j in range(n)]
            done = 0
            async for _, event in engine.generate(requests):
                done += isinstance(event, Finished)
            finished.append(name)

        long_task = asyncio.create_task(go("long", long_prompt, 4, 24))
        await asyncio.sleep(0.05)  # the long request is in the engine first
        started = time.perf_counter()
        await go("short", short_prompt, 1, 4)
        assert time.perf_counter() - started < 60
        await long_task
        return finished

    assert run_engine(smollm, race, prefill_chunk_tokens=64) == ["short", "long"]


def test_a_long_prompt_scored_for_echo_takes_turns(smollm):
    """A prompt of ~1,500 tokens whose log-probabilities are asked for (echo) is scored a chunk
    a turn: a short request that arrives while it is scored finishes before its scores are
    out (scored in one pass, they would come before the short request even started)."""
    long_prompt = smollm.tokenizer("The history of the city begins with " * 190).input_ids
    short_prompt = smollm.tokenizer(PROMPTS[0]).input_ids
    order: list[str] = []

    async def race(engine: HFEngine) -> list[str]:
        async def go(name: str, ids: list[int], params: SamplingParams):
            async for _, event in engine.generate([GenerationRequest(name, ids, params)]):
                if name == "echo" and isinstance(event, Started):
                    order.append("echo scored")
                    assert len(event.prompt_logprobs) == len(ids)
            order.append(f"{name} finished")

        echo = asyncio.create_task(go("echo", long_prompt, SamplingParams(max_tokens=1, temperature=0,
                                                                          prompt_logprobs=1)))
        await asyncio.sleep(0.2)  # the long prompt is being scored
        await go("short", short_prompt, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
        await echo
        return order

    assert run_engine(smollm, race, prefill_chunk_tokens=64, batch_wait_ms=0) == [
        "short finished", "echo scored", "echo finished"]


@pytest.mark.parametrize("chunk", [16, 256])
def test_every_request_of_many_concurrent_groups_finishes(smollm, chunk):
    ids = [smollm.tokenizer(p).input_ids for p in PROMPTS]

    async def many(engine: HFEngine):
        return await asyncio.gather(*(complete(engine, [ids[i % 3]], max_tokens=3 + i % 4) for i in range(12)))

    results = run_engine(smollm, many, prefill_chunk_tokens=chunk, max_batch_size=8)
    assert len(results) == 12 and all(r[0] for r in results)
    assert all(results[i][0].startswith(results[i % 3][0][:5]) for i in range(12))


def _reference(smollm, ids: list[int]) -> torch.Tensor:
    """(len(ids), V) log-probabilities of one unpadded forward pass over `ids`."""
    with torch.inference_mode():
        return smollm.model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)


async def _events(engine: HFEngine, requests: list[GenerationRequest]) -> dict[int, list]:
    out: dict[int, list] = {}
    async for index, event in engine.generate(requests):
        out.setdefault(index, []).append(event)
    return out


def test_logprobs_are_the_models_own(smollm):
    """Each generated token's log-probability and top alternatives are those of one plain
    forward pass over prompt + completion, in a batch beside another prompt (left padding),
    for a greedy and a sampled request; the prompt's, chunked or not, likewise."""
    tok = smollm.tokenizer
    ids = [tok(PROMPTS[0]).input_ids, tok("Some context. " * 5 + PROMPTS[1]).input_ids]
    requests = [GenerationRequest("g", ids[0], SamplingParams(max_tokens=6, temperature=0, logprobs=3,
                                                               prompt_logprobs=2, ignore_eos=True)),
                GenerationRequest("s", ids[1], SamplingParams(max_tokens=6, temperature=1.0, seed=3, logprobs=0,
                                                               ignore_eos=True))]
    events = run_engine(smollm, lambda e: _events(e, requests))
    for index, request in enumerate(requests):
        deltas = [e for e in events[index] if isinstance(e, TextDelta)]
        tokens = [t for d in deltas for t in d.token_ids]
        entries = [lp for d in deltas for lp in d.logprobs]
        assert len(tokens) == 6 and [e.token for e in entries] == tokens
        ref = _reference(smollm, request.prompt_ids + tokens)
        top = request.params.logprobs
        for position, entry in enumerate(entries, start=len(request.prompt_ids) - 1):
            assert abs(entry.logprob - ref[position, entry.token].item()) < 1e-3
            assert len(entry.top) == top
            assert [t for t, _ in entry.top] == ref[position].topk(top).indices.tolist() if top else entry.top == ()
    greedy = [lp for d in events[0] if isinstance(d, TextDelta) for lp in d.logprobs]
    assert all(e.top[0] == (e.token, e.logprob) for e in greedy)  # greedy takes the most likely token
    started = events[0][0]
    ref = _reference(smollm, ids[0])
    assert started.prompt_logprobs[0] is None and len(started.prompt_logprobs) == len(ids[0])
    for position, entry in enumerate(started.prompt_logprobs[1:]):
        assert entry.token == ids[0][position + 1] and len(entry.top) == 2
        assert abs(entry.logprob - ref[position, entry.token].item()) < 1e-3
    with torch.inference_mode():
        chunked, whole = (prompt_logprobs(smollm.model, ids[1], 2, chunk=c) for c in (4, 256))
    assert [e and (e.token, e.top[0][0]) for e in chunked] == [e and (e.token, e.top[0][0]) for e in whole]
    assert max(abs(a.logprob - b.logprob) for a, b in zip(chunked[1:], whole[1:])) < 1e-3
    assert events[1][0].prompt_logprobs is None  # not asked


def test_logprobs_out_of_range_are_refused(smollm):
    request = GenerationRequest("r", smollm.tokenizer(PROMPTS[0]).input_ids, SamplingParams(logprobs=21))
    with pytest.raises(EngineError, match="logprobs must be between 0 and 20"):
        run_engine(smollm, lambda e: _events(e, [request]))


def test_logprobs_on_an_encoder_decoder_model(tmp_path):
    """T5's generated tokens have log-probabilities; its prompt, read by the encoder, has none
    to give: asking for them is refused in one line."""
    from tests.conftest import load_tiny

    t5 = load_tiny("t5-xl", tmp_path / "t5")
    ids = t5.tokenizer("the capital of France is").input_ids
    ok = GenerationRequest("ok", ids, SamplingParams(max_tokens=3, temperature=0, logprobs=1, ignore_eos=True))
    events = run_engine(t5, lambda e: _events(e, [ok]))[0]
    entries = [lp for e in events if isinstance(e, TextDelta) for lp in e.logprobs]
    assert len(entries) == 3 and all(e.top[0] == (e.token, e.logprob) for e in entries)
    echo = GenerationRequest("echo", ids, SamplingParams(max_tokens=3, prompt_logprobs=0))
    with pytest.raises(EngineError, match="encoder-decoder") as refused:
        run_engine(t5, lambda e: _events(e, [echo]))
    assert "\n" not in str(refused.value)


def test_penalties_and_logit_bias_shape_the_choice_exactly(smollm):
    """Greedy decoding under presence and frequency penalties and a logit bias picks, at each
    step, the argmax of the model's logits less the penalties on the tokens generated so far,
    plus the bias (a reference loop of plain forward passes); the reported log-probabilities
    stay the raw ones. A bias of 100 forces its token."""
    tok = smollm.tokenizer
    ids = tok("one one one one one one one one").input_ids
    one = tok(" one", add_special_tokens=False).input_ids[0]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, presence_penalty=1.5,
                            frequency_penalty=0.7, logit_bias=((one, -3.0),), logprobs=0)
    forced = tok(" Rome", add_special_tokens=False).input_ids[0]
    requests = [GenerationRequest("p", ids, params),
                GenerationRequest("f", ids, SamplingParams(max_tokens=3, temperature=0, logit_bias=((forced, 100.0),))),
                GenerationRequest("plain", ids, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))]
    events = run_engine(smollm, lambda e: _events(e, requests))
    got = [[t for e in events[i] if isinstance(e, TextDelta) for t in e.token_ids] for i in range(3)]
    expected, counts = [], torch.zeros(smollm.model.config.vocab_size)
    for _ in range(8):
        raw = _reference(smollm, ids + expected)[-1]
        logits = raw.clone()
        logits[one] -= 3.0
        logits -= 0.7 * counts + 1.5 * (counts > 0)
        expected.append(int(logits.argmax()))
        counts[expected[-1]] += 1
    assert got[0] == expected and got[0] != got[2]
    reported = [lp for e in events[0] if isinstance(e, TextDelta) for lp in e.logprobs]
    assert abs(reported[0].logprob - _reference(smollm, ids)[-1, expected[0]].item()) < 1e-3  # raw, not shaped
    assert got[1] == [forced] * 3
