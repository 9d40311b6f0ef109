"""The scoped engine: SERAC's routing around any engine (`hf`, `vllm`, a Ray Serve replica).

It wraps an engine and keeps the edit memory of the active memory patches (patches.memory).
A request whose prompt is in the scope of a memory row (editors.serac.ScopeRouter: the scope
classifier on all-MiniLM-L6-v2) is answered by the same engine with the row's context put in
front of its tokens (the counterfactual answerer: the served model conditioned on the edit);
every other request, and every request while the memory is empty, goes to the wrapped engine
exactly as it came (same tokens, same parameters), so its output is the base model's.

Memory patches pass through the wrapped engine too (it checks the base fingerprint and counts
them in the patch-set version, and the patch log, compaction and Ray broadcast treat them as
any patch); they change no weight there. A change that adds or removes memory rows waits for
the requests being routed to be admitted, and new requests wait for it, so the version a
response names is the memory it was routed with.

In answer mode "target" (editors.serac) an in-scope answer starts with the edit's target: it is
streamed first, and the wrapped engine continues from the conditioned prompt followed by it
(`max_tokens` counts both; stop strings apply to the continuation only).

What is exact: out-of-scope requests (bit-identical to the wrapped engine). In-scope requests
stream normally; `usage.prompt_tokens` counts the client's prompt, not the context. Their
log-probabilities are those of the model that answers them, the conditioned one, and never
show the context: a prompt's entries are those of its own tokens (the first, as always, has
none), and the forced start of an answer in mode "target" gets the log-probabilities the
conditioned model gives those tokens (the wrapped engine scores them as prompt tokens).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING

from edit_serve.engines.base import (
    ActiveInfo, Engine, EngineError, Event, Finished, GenerationRequest, SamplingParams, Started, TextDelta,
)
from patches import Patch, PatchError
from patches.memory import MAX_ROWS, EditMemory, MemorySpec

if TYPE_CHECKING:
    from editors.serac import Routed

log = logging.getLogger(__name__)

#: rows all active memory patches may hold together (as many as one patch may: compaction
#: merges them into one)
DEFAULT_MAX_MEMORY_ROWS = MAX_ROWS


class ScopedEngine(Engine):
    def __init__(self, inner: Engine, max_memory_rows: int = DEFAULT_MAX_MEMORY_ROWS, encoder=None):
        self.inner = inner
        self.max_memory_rows = max_memory_rows
        self.edit_memory = EditMemory()
        self._patches: dict[str, Patch] = {}  # active memory patches
        self._encoder = encoder  # a SentenceEncoder, or None: loaded with the first memory patch
        self._router = None
        self._routing = 0  # requests between routing and admission
        self._admitted = asyncio.Condition()
        self._open = True  # False while a memory change waits or runs
        self._change_lock = asyncio.Lock()

    # --- the wrapped engine's identity --------------------------------------------------
    def __getattr__(self, name):  # tokenizer, model_name, stack, run_exclusive, adapters, ...
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    @property
    def tokenizer(self):
        return self.inner.tokenizer

    @property
    def model_name(self) -> str:
        return self.inner.model_name

    @property
    def max_model_len(self) -> int:
        return self.inner.max_model_len

    @property
    def max_tokens_limit(self) -> int:
        return self.inner.max_tokens_limit

    @property
    def served_models(self) -> list[str]:
        return self.inner.served_models

    @property
    def version(self) -> str:
        return self.inner.version

    @property
    def active(self) -> list[ActiveInfo]:
        return self.inner.active

    async def start(self) -> None:
        await self.inner.start()

    async def stop(self) -> None:
        await self.inner.stop()

    def memory(self) -> dict[tuple[str, str], int]:
        return self.inner.memory()

    async def top_tokens(self, prompts: list[list[int]]) -> list[tuple[int, float]]:
        return await self.inner.top_tokens(prompts)

    async def weight_digests(self, names: list[str]) -> dict[str, str]:
        return await self.inner.weight_digests(names)

    async def stamp(self, patch: Patch) -> Patch:
        return await self.inner.stamp(patch)

    # --- routing ------------------------------------------------------------------------
    def _encoder_loaded(self):
        if self._encoder is None:
            from editors.base import EditError
            from editors.serac import SentenceEncoder

            try:
                self._encoder = SentenceEncoder.load()
            except EditError as e:  # the encoder package is missing: the patch cannot be served here
                raise PatchError(str(e)) from None
        return self._encoder

    @property
    def router(self):
        if self._router is None:
            from editors.serac import ScopeRouter

            self._router = ScopeRouter(self.edit_memory, self.inner.tokenizer, self._encoder_loaded)
        return self._router

    @property
    def memory_rows(self) -> int:
        return len(self.edit_memory)

    async def generate(self, requests: list[GenerationRequest]) -> AsyncIterator[tuple[int, Event]]:
        async with self._admitted:
            await self._admitted.wait_for(lambda: self._open)
            self._routing += 1
        counted = True
        try:
            if not len(self.edit_memory):  # nothing to route: the requests go on exactly as they came
                routed, routes = requests, [None] * len(requests)
            else:
                routed, routes = await asyncio.to_thread(self._route, requests)
            events = self.inner.generate(routed)
            try:
                async for index, event in events:
                    if counted:
                        counted = False
                        await self._release()
                    route = routes[index]
                    head = route.forced if route is not None else []
                    if isinstance(event, Started):  # the client's prompt, not the context
                        yield index, _as_asked(event, requests[index], route)
                        if head:
                            yield index, self._forced_start(event, requests[index].params, route)
                        continue
                    prompt = len(requests[index].prompt_ids)
                    if head and len(head) >= requests[index].params.max_tokens:  # the target filled max_tokens
                        if isinstance(event, Finished):
                            yield index, Finished("length", prompt, len(head))
                        continue
                    if isinstance(event, Finished):
                        event = Finished(event.reason, prompt, event.completion_tokens + len(head))
                    yield index, event
            finally:
                await events.aclose()
        finally:
            if counted:
                await self._release()

    def _route(self, requests: list[GenerationRequest]) -> tuple[list[GenerationRequest], list[Routed | None]]:
        """The requests as the wrapped engine runs them, and how each in-scope one was routed
        (its `forced` start cut to max_tokens; None: out of scope)."""
        out, routes = [], []
        for request, routed in zip(requests, self.router.route([r.prompt_ids for r in requests])):
            if routed.match is None:
                out.append(request)
                routes.append(None)
                continue
            p = request.params
            head = routed.forced[:p.max_tokens]
            ids = routed.ids + head
            left = max(1, p.max_tokens - len(head))
            if len(ids) + left > self.max_model_len:
                raise EngineError(
                    f"the prompt is in the scope of an edit whose context makes it {len(ids)} tokens; with "
                    f"max_tokens {p.max_tokens} that is over this model's context of "
                    f"{self.max_model_len} tokens (shorten the prompt or max_tokens)")
            params = dataclasses.replace(p, max_tokens=left, prompt_logprobs=_scored_prompt(p, head))
            out.append(dataclasses.replace(request, prompt_ids=ids, params=params))
            routes.append(dataclasses.replace(routed, forced=head))
        return out, routes

    def _forced_start(self, started: Started, params: SamplingParams, route: Routed) -> TextDelta:
        """The answer's forced start as the first text, with the log-probabilities the
        conditioned model gives it (the last entries of the wrapped request's prompt)."""
        head = route.forced
        logprobs = None
        if params.logprobs is not None:
            logprobs = tuple(lp.limited(params.logprobs) for lp in started.prompt_logprobs[-len(head):])
        return TextDelta(self.inner.tokenizer.decode(head), tuple(head), logprobs)

    async def _release(self) -> None:
        async with self._admitted:
            self._routing -= 1
            self._admitted.notify_all()

    @contextlib.asynccontextmanager
    async def _memory_change(self):
        """New requests wait; the ones being routed are admitted first; then the change."""
        async with self._change_lock:
            async with self._admitted:
                self._open = False
                await self._admitted.wait_for(lambda: self._routing == 0)
            try:
                yield
            finally:
                async with self._admitted:
                    self._open = True
                    self._admitted.notify_all()

    # --- patches ------------------------------------------------------------------------
    def _check_memory(self, patch: Patch, extra_rows: int = 0) -> None:
        spec = MemorySpec.of(patch)
        encoder = self._encoder_loaded()
        if spec.encoder != encoder.name or spec.dim != encoder.dim or spec.encoder_fingerprint != encoder.fingerprint:
            raise PatchError(
                f"the memory patch's rows were encoded by {spec.encoder} (width {spec.dim}, fingerprint "
                f"{spec.encoder_fingerprint}); this server's encoder is {encoder.name} (width {encoder.dim}, "
                f"fingerprint {encoder.fingerprint}): recompute the edit on this server")
        config = getattr(getattr(self.inner, "model", None), "config", None)
        if "target" in spec.modes and getattr(config, "is_encoder_decoder", False):
            raise PatchError("a memory patch in answer mode 'target' needs a decoder-only model; this one is "
                             "encoder-decoder (make the edit with answer 'condition')")
        rows = len(self.edit_memory) + extra_rows + len(spec.rows)
        if rows > self.max_memory_rows:
            raise PatchError(f"the edit memory would hold {rows} rows, over this server's limit of "
                             f"{self.max_memory_rows} (revert some memory patches first)")

    async def check(self, patch: Patch) -> None:
        await self.inner.check(patch)
        if patch.kind == "memory":
            await asyncio.to_thread(self._check_memory, patch)

    async def apply(self, patch: Patch, position: int | None = None) -> str:
        if patch.kind != "memory":
            return await self.inner.apply(patch, position)
        await self.check(patch)  # the model's checks first, as `check` makes them
        async with self._memory_change():
            version = await self.inner.apply(patch, position)
            self.edit_memory.add(patch)
            self._patches[patch.id] = patch
            log.debug("memory patch %s: %d rows in the edit memory", patch.id, len(self.edit_memory))
            return version

    async def revert(self, patch_id: str) -> str:
        if patch_id not in self._patches:
            return await self.inner.revert(patch_id)
        async with self._memory_change():
            version = await self.inner.revert(patch_id)
            self.edit_memory.remove(patch_id)
            del self._patches[patch_id]
            return version

    async def replace(self, ids: Sequence[str], new: Sequence[Patch]) -> str:
        added = [p for p in new if p.kind == "memory"]
        removed = [i for i in self._patches if i not in ids]
        if not added and not removed:
            return await self.inner.replace(ids, new)
        rows = sum(len(self._patches[i].memory["rows"]) for i in removed)
        for patch in added:
            await asyncio.to_thread(self._check_memory, patch, -rows)
            rows -= len(patch.memory["rows"])
        async with self._memory_change():
            version = await self.inner.replace(ids, new)
            for patch_id in removed:
                self.edit_memory.remove(patch_id)
                del self._patches[patch_id]
            for patch in added:
                self.edit_memory.add(patch)
                self._patches[patch.id] = patch
            return version


def _scored_prompt(params: SamplingParams, head: list[int]) -> int | None:
    """How many alternatives the wrapped request scores its prompt with: what the client asked
    for its prompt, and for a forced start (scored as the end of that prompt) its logprobs."""
    asked = [k for k in (params.prompt_logprobs, params.logprobs if head else None) if k is not None]
    return max(asked, default=None)


def _as_asked(started: Started, request: GenerationRequest, route: Routed | None) -> Started:
    """The wrapped engine's Started event as the client's request sees it: its own prompt's
    length and log-probabilities (none for the context, nor for the forced start)."""
    top = request.params.prompt_logprobs
    scored = None
    if top is not None:
        scored = started.prompt_logprobs
        if route is not None:
            own = route.original(scored[:len(route.ids)])
            scored = (None, *(lp.limited(top) for lp in own[1:]))
    return dataclasses.replace(started, prompt_tokens=len(request.prompt_ids), prompt_logprobs=scored)


def scoped(engine: Engine, max_memory_rows: int = DEFAULT_MAX_MEMORY_ROWS) -> ScopedEngine:
    return engine if isinstance(engine, ScopedEngine) else ScopedEngine(engine, max_memory_rows)
