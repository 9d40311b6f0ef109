"""The OpenAI-compatible API: /v1/completions, /v1/chat/completions, /v1/models.

Every response carries `x-edit-serve-patchset`: the patch-set version that produced it (for
generations, the version the engine ran the request under; also in `system_fingerprint`).

Log-probabilities (`logprobs` on completions, with `echo` for the prompt's tokens too;
`logprobs` and `top_logprobs` on chat) are the model's raw ones, before temperature and top-p,
computed under the same patch set as the text; a token is reported as its own decoded text
(with its exact bytes on chat), and -inf as -9999.0 (JSON has no infinity): api.logprobs.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable

from fastapi import APIRouter
from fastapi.responses import JSONResponse, StreamingResponse

from edit_serve.api.errors import APIError
from edit_serve.api.schemas import ChatCompletionRequest, CompletionRequest
from edit_serve.api.logprobs import Pieces, TextOffsets, chat_logprobs, completion_logprobs
from edit_serve.engines.base import Engine, Event, Finished, GenerationRequest, Started, TextDelta, TokenLogprob

VERSION_HEADER = "x-edit-serve-patchset"
REPLICA_HEADER = "x-edit-serve-replica"


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


class _Run:
    """One API call's group of generations: prompts x n, indexed choice by choice."""

    def __init__(self, engine: Engine, requests: list[GenerationRequest], observe: Callable | None = None):
        self.events = engine.generate(requests)
        if observe is not None:  # e.g. Metrics.observe_events: time to first token, tokens
            self.events = observe(self.events)
        self.count = len(requests)
        self.version: str | None = None
        self.replica: str | None = None
        self.texts = [""] * self.count
        self.logprobs: list[list[TokenLogprob]] = [[] for _ in range(self.count)]  # tokens, when asked
        self.token_ids: list[list[int]] = [[] for _ in range(self.count)]
        self.prompt_logprobs: list[tuple | None] = [None] * self.count
        self.reasons: list[str | None] = [None] * self.count
        self.prompt_tokens = [0] * self.count
        self.completion_tokens = [0] * self.count
        self._first: tuple[int, Event] | None = None

    async def begin(self) -> None:
        """Wait for the first event: input errors surface here, before any header is sent,
        and the version the request runs under is known."""
        self._first = await anext(self.events)
        self._note(*self._first)

    def _note(self, index: int, event: Event) -> None:
        if isinstance(event, Started):
            self.version = self.version or event.version
            self.replica = self.replica or event.replica
            self.prompt_tokens[index] = event.prompt_tokens
            self.prompt_logprobs[index] = event.prompt_logprobs
        elif isinstance(event, TextDelta):
            self.texts[index] += event.text
            self.token_ids[index] += event.token_ids
            self.logprobs[index] += event.logprobs or ()
        elif isinstance(event, Finished):
            self.reasons[index] = "stop" if event.reason == "stop" else "length"
            self.completion_tokens[index] = event.completion_tokens

    def headers(self) -> dict[str, str]:
        """The patch-set version that served the call (and the replica, on Ray Serve)."""
        return {VERSION_HEADER: self.version, **({REPLICA_HEADER: self.replica} if self.replica else {})}

    async def stream(self) -> AsyncIterator[tuple[int, Event]]:
        if self._first is not None:
            first, self._first = self._first, None
            yield first
        async for index, event in self.events:
            self._note(index, event)
            yield index, event

    async def collect(self) -> None:
        async for _ in self.stream():
            pass

    def usage(self, prompts: int, generated: bool = True) -> dict:
        """`generated`: False where the call only scored its prompts (what was generated is dropped)."""
        # prompt tokens count once per prompt, not once per choice
        per_prompt = self.count // prompts
        prompt = sum(self.prompt_tokens[i * per_prompt] for i in range(prompts))
        completion = sum(self.completion_tokens) if generated else 0
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def router(get_engine, observe: Callable | None = None) -> APIRouter:
    """`observe` wraps each call's engine event stream (metrics); it must pass events through."""
    r = APIRouter()

    def engine_for(model: str) -> Engine:
        engine = get_engine()
        if model not in engine.served_models:
            served = ", ".join(repr(m) for m in engine.served_models)
            raise APIError(404, f"the model {model!r} does not exist; this server serves {served}",
                           code="model_not_found", param="model")
        return engine

    longest: dict[int, int] = {}  # id(tokenizer) -> characters of its longest token
    token_pieces: dict[int, Pieces] = {}  # id(tokenizer) -> its tokens' texts and bytes

    def pieces_of(engine: Engine) -> Pieces:
        tok = engine.tokenizer
        if id(tok) not in token_pieces:
            token_pieces[id(tok)] = Pieces(tok)
        return token_pieces[id(tok)]

    def check_text_length(engine: Engine, text: str) -> None:
        """Refuse a text that cannot fit the context before paying to tokenize it: no token
        covers more characters than the vocabulary's longest, so a text longer than
        max_model_len of those has more than max_model_len tokens."""
        tok = engine.tokenizer
        if id(tok) not in longest:
            longest[id(tok)] = max(map(len, tok.get_vocab()), default=1)
        at_least = len(text) // longest[id(tok)]
        if at_least > engine.max_model_len:
            raise APIError(400, f"this model's maximum context length is {engine.max_model_len} tokens; the "
                                f"prompt has at least {at_least}", code="context_length_exceeded", param="prompt")

    def each_prompt(prompt) -> list:
        """The `prompt` field as a list of prompts (each a text or token ids)."""
        return [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else list(prompt)

    def tokenize_prompts(engine: Engine, prompt) -> list[list[int]]:
        """Token ids of each prompt. Runs in a worker thread: a long text takes seconds."""
        prompt = each_prompt(prompt)
        for p in prompt:
            if isinstance(p, str):
                check_text_length(engine, p)
        out = []
        for p in prompt:
            ids = engine.tokenizer(p, add_special_tokens=True).input_ids if isinstance(p, str) else list(p)
            vocab = len(engine.tokenizer)
            if any(not 0 <= t < vocab for t in ids):
                raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
            out.append(ids)
        return out

    def max_tokens(engine: Engine, asked: int | None, prompts: list[list[int]]) -> int:
        if asked is not None:
            return asked
        room = engine.max_model_len - max(len(p) for p in prompts)
        return max(1, min(room, engine.max_tokens_limit))

    async def start(engine: Engine, prompts: list[list[int]], body, limit: int) -> _Run:
        vocab = len(engine.tokenizer)
        if unknown := [t for t in body.logit_bias or () if int(t) >= vocab]:
            raise APIError(400, f"logit_bias names token id {unknown[0]}, outside this model's vocabulary of {vocab}",
                           param="logit_bias")
        params = body.sampling(limit)
        adapter = body.model if body.model != engine.model_name else None  # an adapter served by name
        requests = [GenerationRequest(uuid.uuid4().hex, ids, params, adapter) for ids in prompts for _ in range(body.n)]
        run = _Run(engine, requests, observe)
        await run.begin()
        return run

    @r.get("/v1/models")
    async def models():
        engine = get_engine()
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "edit_serve",
                                            "max_model_len": engine.max_model_len} for name in engine.served_models]}

    @r.post("/v1/completions")
    async def completions(body: CompletionRequest):
        engine = engine_for(body.model)
        prompts = await asyncio.to_thread(tokenize_prompts, engine, body.prompt)
        scoring = body.max_tokens == 0  # echo scores the prompt; the one token generated is dropped
        run = await start(engine, prompts, body, 1 if scoring else max_tokens(engine, body.max_tokens, prompts))
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": cid, "object": "text_completion", "created": created, "model": body.model,
                "system_fingerprint": run.version}
        headers = run.headers()
        pieces, asked = pieces_of(engine), body.logprobs is not None
        echoed = ([p if isinstance(p, str) else engine.tokenizer.decode(ids)
                   for p, ids in zip(each_prompt(body.prompt), prompts)] if body.echo else None)

        def prompt_of(index: int) -> int:
            return index // body.n

        if body.stream:
            async def events():
                offsets = [TextOffsets() for _ in range(run.count)]  # each choice's text so far

                def chunk(index: int, text: str, ids, entries, reason=None) -> str:
                    logprobs = None
                    if asked:
                        logprobs = completion_logprobs(pieces, ids, entries, offsets[index])
                    choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}
                    return _sse({**head, "choices": [choice]})

                async for index, event in run.stream():
                    if isinstance(event, Started) and echoed is not None:
                        at = prompt_of(index)
                        yield chunk(index, echoed[at], prompts[at], event.prompt_logprobs or ())
                    elif isinstance(event, TextDelta) and not scoring and (event.text or (asked and event.token_ids)):
                        yield chunk(index, event.text, event.token_ids, event.logprobs or ())
                    elif isinstance(event, Finished):
                        yield chunk(index, "", (), (), "length" if scoring else run.reasons[index])
                if body.stream_options and body.stream_options.include_usage:
                    yield _sse({**head, "choices": [], "usage": run.usage(len(prompts), not scoring)})
                yield _sse("[DONE]")

            return StreamingResponse(events(), media_type="text/event-stream", headers=headers)
        await run.collect()

        def choice(i: int) -> dict:
            text, ids, entries = ("", [], []) if scoring else (run.texts[i], run.token_ids[i], run.logprobs[i])
            if echoed is not None:
                text = echoed[prompt_of(i)] + text
                ids, entries = [*prompts[prompt_of(i)], *ids], [*(run.prompt_logprobs[i] or ()), *entries]
            logprobs = completion_logprobs(pieces, ids, entries) if asked else None
            reason = "length" if scoring else run.reasons[i]
            return {"index": i, "text": text, "logprobs": logprobs, "finish_reason": reason}

        choices = [choice(i) for i in range(run.count)]
        return JSONResponse({**head, "choices": choices, "usage": run.usage(len(prompts), not scoring)},
                            headers=headers)

    @r.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest):
        engine = engine_for(body.model)
        tok = engine.tokenizer
        if not getattr(tok, "chat_template", None):
            raise APIError(400, f"the model {engine.model_name!r} has no chat template; use /v1/completions",
                           param="messages")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        check_text_length(engine, "".join(m["content"] for m in messages))
        ids = await asyncio.to_thread(tok.apply_chat_template, messages, add_generation_prompt=True, tokenize=True,
                                      return_dict=False)
        prompts = [list(ids)]
        run = await start(engine, prompts, body,
                          max_tokens(engine, body.max_completion_tokens or body.max_tokens, prompts))
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": cid, "created": created, "model": body.model, "system_fingerprint": run.version}
        headers = run.headers()
        pieces = pieces_of(engine)
        if body.stream:
            async def events():
                chunk = {**head, "object": "chat.completion.chunk"}
                for i in range(run.count):
                    delta = {"role": "assistant", "content": ""}
                    choice = {"index": i, "delta": delta, "logprobs": None, "finish_reason": None}
                    yield _sse({**chunk, "choices": [choice]})
                async for index, event in run.stream():
                    if isinstance(event, TextDelta) and (event.text or (body.logprobs and event.token_ids)):
                        logprobs = {"content": chat_logprobs(pieces, event.logprobs or ())} if body.logprobs else None
                        choice = {"index": index, "delta": {"content": event.text}, "logprobs": logprobs,
                                  "finish_reason": None}
                        yield _sse({**chunk, "choices": [choice]})
                    elif isinstance(event, Finished):
                        choice = {"index": index, "delta": {}, "logprobs": None, "finish_reason": run.reasons[index]}
                        yield _sse({**chunk, "choices": [choice]})
                if body.stream_options and body.stream_options.include_usage:
                    yield _sse({**chunk, "choices": [], "usage": run.usage(1)})
                yield _sse("[DONE]")

            return StreamingResponse(events(), media_type="text/event-stream", headers=headers)
        await run.collect()
        def logprobs(i: int) -> dict | None:
            return {"content": chat_logprobs(pieces, run.logprobs[i]), "refusal": None} if body.logprobs else None

        choices = [{"index": i, "message": {"role": "assistant", "content": run.texts[i]}, "logprobs": logprobs(i),
                    "finish_reason": run.reasons[i]} for i in range(run.count)]
        return JSONResponse({**head, "object": "chat.completion", "choices": choices, "usage": run.usage(1)},
                            headers=headers)

    return r
