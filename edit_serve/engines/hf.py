"""The `hf` engine: transformers on CPU or GPU, with dynamic batching.

One worker thread owns the model. Requests queue up; the worker takes up to
`max_batch_size` of them (waiting `batch_wait_ms` for more to join), prefills them together
(left-padded) and decodes them step by step with a shared KV cache, each row with its own
sampling parameters; finished rows leave the batch. Patch operations are queued too and run
only between batches, so a request never sees weights change under it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import torch

from edit_serve.config import EngineConfig
from edit_serve.engines.base import (
    ActiveInfo, Engine, Event, Finished, GenerationRequest, Started, TextDelta, validate_requests,
)
from edit_serve.engines.detok import TextStream
from edit_serve.models import LoadedModel
from patches import Patch, PatchStack
from patches.fingerprint import exact_digest

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Failed:
    error: BaseException


@dataclass(eq=False)
class _Slot:
    """One request in flight."""

    request: GenerationRequest
    index: int
    emit: Callable[[object], None]
    stream: TextStream
    generator: torch.Generator | None
    cancelled: bool = False
    produced: int = 0
    pending_ids: list[int] = field(default_factory=list)


class _DecoderOnly:
    """Prefill and decode for causal LMs (left padding, explicit positions)."""

    def __init__(self, model, pad_id: int):
        self.model, self.pad_id = model, pad_id
        self.keep = {"logits_to_keep": 1}

    def _pad(self, prompts: list[list[int]], left: bool) -> torch.Tensor:
        """(B, T) token ids padded to the longest prompt; sets `self.mask` (B, T)."""
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            span = slice(width - len(p), width) if left else slice(0, len(p))
            ids[i, span] = torch.tensor(p)
            mask[i, span] = 1
        self.mask = mask.to(self.model.device)
        return ids.to(self.model.device)

    def prefill(self, prompts: list[list[int]]) -> torch.Tensor:
        ids = self._pad(prompts, left=True)
        pos = (self.mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
        out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=pos,
                         use_cache=True, **self.keep)
        self.cache, self.pos = out.past_key_values, pos[:, -1]
        return out.logits[:, -1].float()  # (B, V)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.mask = torch.cat([self.mask, self.mask.new_ones((self.mask.shape[0], 1))], dim=1)
        self.pos = self.pos + 1
        out = self.model(input_ids=tokens[:, None], attention_mask=self.mask,
                         position_ids=self.pos[:, None], past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values
        return out.logits[:, -1].float()

    def select(self, rows: torch.Tensor) -> None:
        self.cache.batch_select_indices(rows)
        self.mask, self.pos = self.mask[rows], self.pos[rows]


class _EncoderDecoder(_DecoderOnly):
    """Prefill (encoder + first decoder step) and decode for seq2seq models such as T5."""

    def prefill(self, prompts: list[list[int]]) -> torch.Tensor:
        ids = self._pad(prompts, left=False)
        device = self.model.device
        self.encoded = self.model.get_encoder()(input_ids=ids, attention_mask=self.mask)
        start = self.model.config.decoder_start_token_id
        self.cache = None
        return self.step(torch.full((len(prompts),), start, dtype=torch.long, device=device))

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        out = self.model(encoder_outputs=self.encoded, attention_mask=self.mask,
                         decoder_input_ids=tokens[:, None], past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values
        return out.logits[:, -1].float()

    def select(self, rows: torch.Tensor) -> None:
        self.cache.batch_select_indices(rows)
        self.mask = self.mask[rows]
        self.encoded.last_hidden_state = self.encoded.last_hidden_state[rows]


def sample(logits: torch.Tensor, slots: list[_Slot]) -> list[int]:
    """Next token per row: greedy where temperature is 0, else temperature + top-p sampling
    with the request's own generator (seeded when the request gave a seed)."""
    tokens = logits.argmax(-1)  # (B,)
    for j, slot in enumerate(slots):
        p = slot.request.params
        if p.greedy:
            continue
        row = logits[j] / p.temperature  # (V,)
        if p.top_p < 1.0:
            sorted_logits, order = row.sort(descending=True)
            probs = sorted_logits.softmax(-1)
            drop = probs.cumsum(-1) - probs > p.top_p  # keep the smallest set reaching top_p
            sorted_logits[drop] = float("-inf")
            row = torch.full_like(row, float("-inf")).scatter(0, order, sorted_logits)
        tokens[j] = torch.multinomial(row.softmax(-1), 1, generator=slot.generator)[0]
    return tokens.tolist()


class HFEngine(Engine):
    def __init__(self, loaded: LoadedModel, config: EngineConfig | None = None):
        self.config = config or EngineConfig()
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.profile = loaded.profile
        self.model_name = loaded.profile.name
        self.stack = PatchStack(self.model, base_model=self.profile.name, architecture=self.profile.architecture)
        limit = getattr(self.model.config, "max_position_embeddings", None) or 4096
        self.max_model_len = self.config.max_model_len or min(int(limit), 4096)
        self.max_tokens_limit = self.config.max_tokens_limit
        self.eos_ids = self._eos_ids()
        pad = self.tokenizer.pad_token_id
        stepper = _EncoderDecoder if self.model.config.is_encoder_decoder else _DecoderOnly
        self._stepper = lambda: stepper(self.model, pad if pad is not None else 0)
        self._waiting: deque[list[_Slot]] = deque()  # groups of slots
        self._controls: deque[tuple[Callable[[], object], concurrent.futures.Future]] = deque()
        self._cv = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.busy_seconds = 0.0

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        gen = getattr(self.model, "generation_config", None)
        for source in (getattr(gen, "eos_token_id", None), self.tokenizer.eos_token_id):
            if isinstance(source, int):
                ids.add(source)
            elif source:
                ids.update(source)
        return ids

    # --- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="hf-engine", daemon=True)
            self._thread.start()

    async def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30)
            self._thread = None

    # --- requests -----------------------------------------------------------------------
    def validate(self, requests: list[GenerationRequest]) -> None:
        validate_requests(requests, max_batch_size=self.config.max_batch_size, max_model_len=self.max_model_len,
                          max_tokens_limit=self.max_tokens_limit)

    def _slot(self, request: GenerationRequest, index: int, emit: Callable) -> _Slot:
        generator = None
        if not request.params.greedy:
            generator = torch.Generator(device=self.model.device)
            if request.params.seed is not None:
                generator.manual_seed(request.params.seed + index)
            else:
                generator.seed()
        return _Slot(request, index, emit, TextStream(self.tokenizer, request.params.stop), generator)

    async def generate(self, requests: list[GenerationRequest]) -> AsyncIterator[tuple[int, Event]]:
        self.validate(requests)
        if self._thread is None:
            raise RuntimeError("the engine is not started")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        slots = []
        for index, request in enumerate(requests):
            emit = (lambda i: lambda e: loop.call_soon_threadsafe(queue.put_nowait, (i, e)))(index)
            slots.append(self._slot(request, index, emit))
        with self._cv:
            self._waiting.append(slots)  # a group runs in one batch, under one version
            self._cv.notify_all()
        remaining = len(slots)
        try:
            while remaining:
                index, event = await queue.get()
                if isinstance(event, _Failed):
                    raise event.error
                yield index, event
                if isinstance(event, Finished):
                    remaining -= 1
        finally:
            for slot in slots:
                slot.cancelled = True  # a client that went away frees its rows at the next step

    # --- patches ------------------------------------------------------------------------
    async def _control(self, fn: Callable[[], object]):
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cv:
            self._controls.append((fn, future))
            self._cv.notify_all()
        return await asyncio.wrap_future(future)

    async def check(self, patch: Patch) -> None:
        await asyncio.to_thread(self.stack.check, patch)

    async def stamp(self, patch: Patch) -> Patch:
        return await asyncio.to_thread(self.stack.stamp, patch)

    async def apply(self, patch: Patch, position: int | None = None) -> str:
        return await self._control(lambda: self.stack.apply(patch, position))

    async def revert(self, patch_id: str) -> str:
        return await self._control(lambda: self.stack.revert(patch_id))

    async def weight_digests(self, names: list[str]) -> dict[str, str]:
        return await self._control(lambda: {n: exact_digest(self.stack.parameter(n)) for n in names})

    async def run_exclusive(self, fn: Callable[[], object]):
        """Run `fn` in the worker between batches (no forward pass runs meanwhile)."""
        return await self._control(fn)

    async def top_tokens(self, prompts: list[list[int]]) -> list[tuple[int, float]]:
        @torch.inference_mode()
        def top() -> list[tuple[int, float]]:
            probs = self._stepper().prefill(prompts).softmax(-1)  # (B, V)
            p, ids = probs.max(-1)  # (B,)
            return list(zip(ids.tolist(), p.tolist()))

        return await self.run_exclusive(top)

    @property
    def version(self) -> str:
        return self.stack.version

    @property
    def active(self) -> list[ActiveInfo]:
        return [ActiveInfo(a.patch.id, a.patch.method, a.applied_at) for a in self.stack.active]

    def memory(self) -> dict[tuple[str, str], int]:
        device = self.model.device
        if device.type == "cuda":
            return {(str(device), "allocated"): torch.cuda.memory_allocated(device),
                    (str(device), "reserved"): torch.cuda.memory_reserved(device)}
        import psutil

        return {("cpu", "resident"): psutil.Process().memory_info().rss}

    # --- the worker ---------------------------------------------------------------------
    def _run(self) -> None:
        wait = self.config.batch_wait_ms / 1000
        while True:
            with self._cv:
                while not (self._controls or self._waiting or self._stopping):
                    self._cv.wait()
                if self._stopping:
                    break
                control = self._controls.popleft() if self._controls else None
                if control is None and wait and sum(map(len, self._waiting)) < self.config.max_batch_size:
                    self._cv.wait(wait)  # let concurrent arrivals join this batch
                    control = self._controls.popleft() if self._controls else None
                batch: list[_Slot] = []
                while (control is None and self._waiting
                       and len(batch) + len(self._waiting[0]) <= self.config.max_batch_size):
                    batch.extend(self._waiting.popleft())
            if control is not None:
                fn, future = control
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn())
                    except BaseException as e:  # noqa: BLE001 - handed to the caller
                        future.set_exception(e)
            elif batch:
                started = time.perf_counter()
                try:
                    self._run_batch(batch)
                except BaseException as e:  # noqa: BLE001 - every request of the batch learns it
                    log.exception("batch of %d failed", len(batch))
                    for slot in batch:
                        slot.emit(_Failed(e))
                self.busy_seconds += time.perf_counter() - started
        self._fail_all(RuntimeError("the engine stopped"))

    def _fail_all(self, error: BaseException) -> None:
        with self._cv:
            pending = [slot for group in self._waiting for slot in group]
            self._waiting = deque()
            controls, self._controls = list(self._controls), deque()
        for slot in pending:
            slot.emit(_Failed(error))
        for _, future in controls:
            future.set_exception(error)

    def _finish(self, slot: _Slot, reason: str) -> None:
        rest = slot.stream.flush() if reason != "cancelled" else ""
        if rest or slot.pending_ids:
            slot.emit(TextDelta(rest, tuple(slot.pending_ids)))
        slot.emit(Finished(reason, len(slot.request.prompt_ids), slot.produced))

    @torch.inference_mode()
    def _run_batch(self, batch: list[_Slot]) -> None:
        version = self.stack.version
        slots = [s for s in batch if not s.cancelled]
        for slot in slots:
            slot.emit(Started(version, len(slot.request.prompt_ids)))
        if not slots:
            return
        stepper = self._stepper()
        logits = stepper.prefill([s.request.prompt_ids for s in slots])
        while slots:
            tokens = sample(logits, slots)
            keep = []
            for j, (slot, token) in enumerate(zip(slots, tokens)):
                reason = None
                if slot.cancelled:
                    reason = "cancelled"
                elif token in self.eos_ids and not slot.request.params.ignore_eos:
                    reason = "stop"
                else:
                    slot.produced += 1
                    slot.pending_ids.append(token)
                    text = slot.stream.push(token)
                    if text:
                        slot.emit(TextDelta(text, tuple(slot.pending_ids)))
                        slot.pending_ids.clear()
                    if slot.stream.stopped:
                        reason = "stop"
                    elif slot.produced >= slot.request.params.max_tokens:
                        reason = "length"
                if reason:
                    self._finish(slot, reason)
                else:
                    keep.append(j)
            if not keep:
                return
            if len(keep) < len(slots):
                rows = torch.tensor(keep, device=logits.device)
                stepper.select(rows)
                slots = [slots[j] for j in keep]
                tokens = [tokens[j] for j in keep]
            logits = stepper.step(torch.tensor(tokens, device=logits.device))
