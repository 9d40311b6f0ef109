"""The hf engine's scheduler on the real SmolLM2: prefill in chunks gives the same greedy
tokens as one pass, `n` copies of a prompt are prefilled once, and a short request that
arrives while a long one runs finishes first instead of waiting for it."""

from __future__ import annotations

import asyncio
import time

import pytest

from edit_serve.config import EngineConfig
from edit_serve.engines.base import Finished, GenerationRequest, SamplingParams, TextDelta
from edit_serve.engines.hf import HFEngine

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


@pytest.mark.parametrize("chunk", [16, 256])
def test_every_request_of_many_concurrent_groups_finishes(smollm, chunk):
    ids = [smollm.tokenizer(p).input_ids for p in PROMPTS]

    async def many(engine: HFEngine):
        return await asyncio.gather(*(complete(engine, [ids[i % 3]], max_tokens=3 + i % 4) for i in range(12)))

    results = run_engine(smollm, many, prefill_chunk_tokens=chunk, max_batch_size=8)
    assert len(results) == 12 and all(r[0] for r in results)
    assert all(results[i][0].startswith(results[i % 3][0][:5]) for i in range(12))
