"""The `vllm` engine: vLLM's async engine behind the same protocol as `hf`.

Requests go to `AsyncLLM` as token ids and stream back as deltas. Patches are applied inside
the vLLM workers (`vllm_worker.PatchWorker`, called through `collective_rpc`), which keep the
base copies of touched tensors, so revert is exact and order-free.

A weight change is one change-set (`replace`; apply and revert are its cases) and a gate:
new requests wait at it, requests already admitted run to the end on the old weights while
the workers parse and validate the new patches (patch files are what vLLM's RPC carries; the
change itself does none of this), then, with nothing in flight, the workers change the weights
and the prefix cache is reset (its KV blocks were computed with the old weights). Every
request's `Started` event names the patch-set version it was admitted under, which is the
version its tokens were computed with.

Adapter mode: a low-rank patch can instead be served as a LoRA adapter (exported in PEFT's
format) under its own name; a request chooses it with `model`, next to requests for the
base model in the same batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from edit_serve.config import EngineConfig
from edit_serve.engines.base import (
    ActiveInfo, Engine, EngineError, Event, Finished, GenerationRequest, Started, TextDelta, TokenLogprob,
    validate_requests,
)
from edit_serve.profiles import Profile
from patches import Patch, PatchError, from_bytes, load, patchset_version, patchset_with, to_bytes
from patches.peft_export import export_peft

log = logging.getLogger(__name__)

WORKER_EXTENSION = "edit_serve.engines.vllm_worker.PatchWorker"
FINISH = {"stop": "stop", "length": "length", "abort": "cancelled"}


def _logprob(position: dict, token: int, top: int) -> TokenLogprob:
    """A token's entry from vLLM's log-probabilities at one position ({token id: Logprob}: the
    sampled or prompt token, and the `top` most likely by rank)."""
    ranked = sorted((lp.rank, t, lp.logprob) for t, lp in position.items() if lp.rank is not None and lp.rank <= top)
    return TokenLogprob(token, position[token].logprob, tuple((t, lp) for _, t, lp in ranked))


def lora_supported(architecture: str) -> bool:
    """Whether vLLM's implementation of `architecture` supports LoRA adapters."""
    from vllm.model_executor.models import ModelRegistry, supports_lora

    registered = ModelRegistry.models.get(architecture)
    if registered is None:
        raise EngineError(f"vLLM has no implementation of {architecture}; serve it with --engine hf")
    return supports_lora(registered.load_model_cls())


@dataclass
class _Adapter:
    name: str
    patch: Patch
    request: object  # vllm.lora.request.LoRARequest
    folder: Path


class VLLMEngine(Engine):
    def __init__(self, profile: Profile, location: str, tokenizer, config: EngineConfig | None = None):
        self.config = config or EngineConfig(engine="vllm")
        self.profile = profile
        self.location = location
        self.tokenizer = tokenizer
        self.model_name = profile.name
        self.dtype = self.config.dtype or profile.dtype
        self.max_model_len = self.config.max_model_len or 4096
        self.max_tokens_limit = self.config.max_tokens_limit
        self.lora = bool(self.config.enable_adapters or self.config.adapters)
        if self.lora and not lora_supported(profile.architecture):
            raise EngineError(
                f"adapter mode needs LoRA, which vLLM does not support for {profile.architecture} "
                f"({profile.name}); apply the patch to the weights instead (edit_serve apply) or serve with --engine hf"
            )
        self.llm = None
        self._active: list[ActiveInfo] = []
        self._adapters: dict[str, _Adapter] = {}
        self._adapter_ids = itertools.count(1)
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._open = asyncio.Event()  # cleared while a weight change waits or runs
        self._open.set()
        self._change_lock = asyncio.Lock()
        self.eos_ids = {i for i in (tokenizer.eos_token_id,) if i is not None}

    @classmethod
    def from_profile(cls, profile: Profile, config: EngineConfig) -> "VLLMEngine":
        """The engine for `profile` (weights converted or located now; vLLM starts in `start`)."""
        from transformers import AutoConfig, AutoTokenizer

        from edit_serve.models import weights_location

        location = weights_location(profile)
        kwargs = {"local_files_only": True} if Path(location).is_dir() else {}
        tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
        if config.max_model_len is None:  # as the hf engine: the model's limit, capped at 4096
            limit = getattr(AutoConfig.from_pretrained(location, **kwargs), "max_position_embeddings", None) or 4096
            config = config.model_copy(update={"max_model_len": min(int(limit), 4096)})
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        return cls(profile, location, tokenizer, config)

    # --- lifecycle ----------------------------------------------------------------------
    def engine_args(self):
        from vllm.engine.arg_utils import AsyncEngineArgs

        c = self.config
        return AsyncEngineArgs(
            model=self.location, tokenizer=self.location, served_model_name=self.model_name,
            dtype=self.dtype, max_model_len=self.max_model_len, max_num_seqs=c.max_batch_size,
            gpu_memory_utilization=c.vllm_memory_utilization, enforce_eager=c.vllm_enforce_eager,
            tensor_parallel_size=c.vllm_tensor_parallel_size, worker_extension_cls=WORKER_EXTENSION,
            enable_lora=self.lora, max_loras=c.max_adapters, max_lora_rank=c.max_adapter_rank, seed=0,
        )

    async def start(self) -> None:
        if self.llm is not None:
            return
        from vllm.v1.engine.async_llm import AsyncLLM

        args = self.engine_args()
        self.llm = await asyncio.to_thread(AsyncLLM.from_engine_args, args)
        await self._rpc("edit_serve_init", self.profile.name, self.profile.architecture,
                        self.profile.first_edit_weights())
        for name, path in self.config.adapters.items():
            await self.add_adapter(name, await asyncio.to_thread(load, path))

    async def stop(self) -> None:
        if self.llm is not None:
            llm, self.llm = self.llm, None
            await asyncio.to_thread(llm.shutdown)

    # --- requests -----------------------------------------------------------------------
    @property
    def served_models(self) -> list[str]:
        return [self.model_name, *self._adapters]

    def _sampling(self, request: GenerationRequest, index: int):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        p = request.params
        return SamplingParams(
            n=1, max_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p,
            seed=None if p.seed is None else p.seed + index, stop=list(p.stop) or None,
            ignore_eos=p.ignore_eos, output_kind=RequestOutputKind.DELTA,
            logprobs=p.logprobs, prompt_logprobs=p.prompt_logprobs, presence_penalty=p.presence_penalty,
            frequency_penalty=p.frequency_penalty, logit_bias=dict(p.logit_bias) or None,
        )

    async def _pump(self, index: int, request: GenerationRequest, version: str,
                    emit: Callable[[object], None]) -> None:
        """Run one request in vLLM and turn its outputs into events."""
        from vllm.inputs import TokensPrompt

        adapter = self._adapters[request.adapter].request if request.adapter else None
        produced = 0
        p = request.params
        started = p.prompt_logprobs is None  # else `generate` left the Started event to this pump
        try:
            async for out in self.llm.generate(TokensPrompt(prompt_token_ids=request.prompt_ids),
                                               self._sampling(request, index), request.request_id,
                                               lora_request=adapter):
                if not started:  # vLLM gives the prompt's log-probabilities with the first output
                    started = True
                    scored = [None] + [_logprob(position, token, p.prompt_logprobs) for position, token in
                                       zip(out.prompt_logprobs[1:], request.prompt_ids[1:])]
                    emit((index, Started(version, len(request.prompt_ids), prompt_logprobs=tuple(scored))))
                c = out.outputs[0]
                ids = list(c.token_ids)
                logprobs = None if p.logprobs is None else [_logprob(d, t, p.logprobs) for d, t in zip(c.logprobs, ids)]
                if c.finish_reason == "stop" and c.stop_reason is None and ids and ids[-1] in self.eos_ids:
                    ids.pop()  # the end-of-sequence token is not part of the completion (as in hf)
                    logprobs = logprobs and logprobs[:-1]
                produced += len(ids)
                if c.text or ids:
                    emit((index, TextDelta(c.text, tuple(ids), None if logprobs is None else tuple(logprobs))))
                if c.finish_reason is not None:
                    emit((index, Finished(FINISH.get(c.finish_reason, "stop"), len(request.prompt_ids), produced)))
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            emit(e)

    async def generate(self, requests: list[GenerationRequest]) -> AsyncIterator[tuple[int, Event]]:
        validate_requests(requests, max_batch_size=self.config.max_batch_size, max_model_len=self.max_model_len,
                          max_tokens_limit=self.max_tokens_limit, adapters=list(self._adapters))
        async with self._admitted():
            version = self.version
            queue: asyncio.Queue = asyncio.Queue()
            tasks = [asyncio.create_task(self._pump(i, r, version, queue.put_nowait)) for i, r in enumerate(requests)]
            try:
                for index, request in enumerate(requests):
                    if request.params.prompt_logprobs is None:
                        yield index, Started(version, len(request.prompt_ids))
                remaining = len(requests)
                while remaining:
                    item = await queue.get()
                    if isinstance(item, BaseException):
                        raise item
                    yield item
                    if isinstance(item[1], Finished):
                        remaining -= 1
            finally:
                for task in tasks:
                    task.cancel()  # vLLM aborts a request whose stream is cancelled

    @contextlib.asynccontextmanager
    async def _admitted(self):
        """Hold a place among the requests in flight; waits while a weight change is pending."""
        if self.llm is None:
            raise RuntimeError("the engine is not started")
        while not self._open.is_set():  # a weight change is waiting or running
            await self._open.wait()
        self._inflight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.set()

    # --- weight changes -----------------------------------------------------------------
    async def _rpc(self, method: str, *args):
        """Call a PatchWorker method on every worker; a PatchError there is raised here."""
        results = await self.llm.collective_rpc(method, args=args)
        errors = [r["error"] for r in results if isinstance(r, dict) and "error" in r]
        if errors:
            raise PatchError(errors[0])
        return [r["ok"] if isinstance(r, dict) else r for r in results][0]

    async def _exclusive(self, fn: Callable[[], object], prepare: Callable[[], Awaitable] | None = None):
        """Run `fn` (a coroutine function) with no request in flight (`prepare` before, while
        the requests admitted earlier finish). vLLM's scheduler is not paused: its engine core
        runs a worker call between two scheduler steps, never during one, and with the gate
        closed and nothing in flight there is no step to hold; a pause and a resume would add
        two round trips to the engine core to every change. The prefix cache (KV blocks of the
        old weights) is reset by a call sent with `fn`'s, not after it: nothing can fill the
        cache between the two, whichever the engine core runs first."""
        if self.llm is None:
            raise RuntimeError("the engine is not started")
        async with self._change_lock:
            self._open.clear()
            try:
                if prepare is not None:
                    await prepare()
                await self._idle.wait()  # admitted requests finish on the old weights
                reset = asyncio.ensure_future(self.llm.reset_prefix_cache())
                try:
                    return await fn()
                finally:
                    await reset
            finally:
                self._open.set()

    async def check(self, patch: Patch) -> None:
        if self.llm is None:
            raise RuntimeError("the engine is not started")
        await self._rpc("edit_serve_check", to_bytes(patch))

    async def stamp(self, patch: Patch) -> Patch:
        if self.llm is None:
            raise RuntimeError("the engine is not started")
        return from_bytes(await self._rpc("edit_serve_stamp", to_bytes(patch)))

    async def apply(self, patch: Patch, position: int | None = None) -> str:
        def order(ids: list[str]) -> list[str]:
            if patch.id in ids:
                raise PatchError(f"patch {patch.id} is already applied")
            return patchset_with(ids, patch.id, position=position)

        return await self._change(order, [patch])

    async def revert(self, patch_id: str) -> str:
        def order(ids: list[str]) -> list[str]:
            if patch_id not in ids:
                raise PatchError(f"patch {patch_id} is not applied")
            return [i for i in ids if i != patch_id]

        return await self._change(order, [])

    async def replace(self, ids: Sequence[str], new: Sequence[Patch]) -> str:
        return await self._change(lambda _: list(ids), new)

    async def _change(self, order: Callable[[list[str]], list[str]], new: Sequence[Patch]) -> str:
        """One change-set. The new order is computed from the active one under the change lock
        (`order`), so concurrent changes never lose each other. With requests in flight the new
        patches are staged (parsed and validated by the workers) while those requests finish,
        so the change itself does only the weight arithmetic; with none, they travel with the
        change: one round trip to the workers instead of two."""
        blobs = [to_bytes(p) for p in new]
        added = {p.id: ActiveInfo(p.id, p.method, time.time()) for p in new}
        ids: list[str] = []
        carried = [blobs]  # what travels with the change: the patches, unless staged before it

        async def prepare():
            ids[:] = order([a.id for a in self._active])
            if self._inflight:
                await self._rpc("edit_serve_stage", blobs)
                carried.clear()

        async def change():
            version = await self._rpc("edit_serve_replace", ids, *carried)
            known = {a.id: a for a in self._active}
            self._active = [known.get(i) or added[i] for i in ids]
            return version

        return await self._exclusive(change, prepare=prepare)

    async def weight_digests(self, names: list[str]) -> dict[str, str]:
        if self.llm is None:
            raise RuntimeError("the engine is not started")
        return await self._rpc("edit_serve_digests", list(names))

    async def top_tokens(self, prompts: list[list[int]]) -> list[tuple[int, float]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=1, temperature=0, logprobs=1)

        async def top(ids: list[int], key: str) -> tuple[int, float]:
            async for out in self.llm.generate(TokensPrompt(prompt_token_ids=ids), params, key):
                if out.finished:
                    c = out.outputs[0]
                    return c.token_ids[0], math.exp(c.logprobs[0][c.token_ids[0]].logprob)
            raise RuntimeError("vLLM finished without a token")

        async with self._admitted():
            return list(await asyncio.gather(*(top(p, f"top-{uuid.uuid4().hex}") for p in prompts)))

    @property
    def version(self) -> str:
        return patchset_version([a.id for a in self._active])

    @property
    def active(self) -> list[ActiveInfo]:
        return list(self._active)

    def memory(self) -> dict[tuple[str, str], int]:
        import psutil

        me = psutil.Process()
        rss = me.memory_info().rss
        for child in me.children(recursive=True):
            try:
                rss += child.memory_info().rss
            except psutil.Error:
                pass
        return {("cpu", "resident"): rss}

    # --- adapters -----------------------------------------------------------------------
    async def add_adapter(self, name: str, patch: Patch) -> None:
        """Serve a low-rank patch as a LoRA adapter named `name` (requests choose it by `model`)."""
        from vllm.lora.request import LoRARequest

        from edit_serve.models import cache_dir

        if not self.lora:
            raise EngineError("adapter mode is off: start the vllm engine with enable_adapters (or adapters)")
        if name in self.served_models:
            raise EngineError(f"the name {name!r} is already served; pick another adapter name")
        limit = self.config.max_adapter_rank
        if patch.kind == "delta" and any(d.rank and d.rank > limit for d in patch.deltas().values()):
            raise PatchError(f"the patch's rank is over this server's max_adapter_rank of {limit}; start it with a "
                             "larger max_adapter_rank")
        await self._rpc("edit_serve_check", to_bytes(patch), True)  # fits this model (fingerprint, shapes)
        folder = cache_dir() / "adapters" / patch.id
        await asyncio.to_thread(export_peft, patch, folder, self.location)
        request = LoRARequest(lora_name=name, lora_int_id=next(self._adapter_ids), lora_path=str(folder))
        await self.llm.add_lora(request)
        self._adapters[name] = _Adapter(name, patch, request, folder)
        log.info("serving patch %s as adapter %r", patch.id, name)

    async def remove_adapter(self, name: str) -> None:
        adapter = self._adapters.get(name)
        if adapter is None:
            raise EngineError(f"no adapter {name!r} is loaded on this server")

        async def remove():
            del self._adapters[name]
            await self.llm.remove_lora(adapter.request.lora_int_id)
            shutil.rmtree(adapter.folder, ignore_errors=True)

        await self._exclusive(remove)
