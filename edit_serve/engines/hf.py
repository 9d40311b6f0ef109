"""The `hf` engine: transformers on CPU or GPU, with dynamic batching.

One worker thread owns the model. Requests queue up as groups (the prompts x n of one API
call); the worker starts a batch from the waiting groups (waiting `batch_wait_ms` for more to
join when it is idle) and runs several batches at once, one forward pass a turn, each turn to
the batch that has had the least compute time so far (a new batch starts level with the
least-served one), so concurrent batches share the compute evenly whatever their size. A turn
is a prefill chunk of at most `prefill_chunk_tokens` tokens (an eighth of that while other
batches wait), or one decode step of every row. A long request is thus cut into short turns,
and a short one that arrives while it runs is served beside it instead of after it. Identical
prompts of a group (`n` > 1) are prefilled once. Each row samples with its own parameters;
finished rows leave their batch. A request's logit_bias and presence and frequency penalties
(on the tokens it has generated, as vLLM counts them) shape its row before sampling.

A request may ask for log-probabilities: each sampled token's under the model's raw
distribution (log-softmax of the logits, before temperature and top-p) with its most likely
alternatives, and its prompt tokens', computed when its batch starts by a pass of its own over
the prompt, under the weights the batch runs on. That pass takes turns like a prefill (a chunk
of positions a turn, at most 256), so a long prompt with `echo` does not hold the other batches.

Patch operations are queued too; once one is waiting no new batch starts, and it runs as soon
as the running batches finish, so a request never sees weights change under it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import sys
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

import torch

from edit_serve.config import EngineConfig
from edit_serve.engines.base import (
    ActiveInfo, Engine, EngineError, Event, Finished, GenerationRequest, Started, TextDelta, TokenLogprob,
    validate_requests,
)
from edit_serve.engines.detok import TextStream
from edit_serve.engines.verify import VerifyPass
from edit_serve.models import LoadedModel
from editors.lm import eos_ids, output_head
from patches import Patch, PatchStack
from patches.fingerprint import exact_digest
from patches.stack import prepare

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
    pending_logprobs: list[TokenLogprob] | None = None  # a list when the request asked for logprobs
    counts: torch.Tensor | None = None  # (V,) times each token was generated (for the penalties)

    def delta(self, text: str) -> TextDelta:
        """The pending tokens as one event (and their log-probabilities), then none pending."""
        logprobs = None if self.pending_logprobs is None else tuple(self.pending_logprobs)
        event = TextDelta(text, tuple(self.pending_ids), logprobs)
        self.pending_ids.clear()
        if self.pending_logprobs is not None:
            self.pending_logprobs.clear()
        return event


class _DecoderOnly:
    """Prefill (in chunks) and decode for causal LMs (left padding, explicit positions).

    `begin(prompts)` plans the prefill; `prefill_chunk(tokens)` runs the next columns of it
    (at most `tokens` token positions over all rows) and returns the last logits once the
    prompts are done, else None; then `step` decodes. Identical prompts are prefilled once
    and their KV-cache rows copied."""

    def __init__(self, model, pad_id: int):
        self.model, self.pad_id = model, pad_id
        self.keep = {"logits_to_keep": 1}

    def begin(self, prompts: list[list[int]]) -> None:
        unique = {tuple(p): i for i, p in reversed(list(enumerate(prompts)))}  # prompt -> first row
        firsts = sorted(unique.values())
        row_of = {tuple(prompts[r]): j for j, r in enumerate(firsts)}
        self._expand = None if len(firsts) == len(prompts) else torch.tensor([row_of[tuple(p)] for p in prompts])
        self._ids = self._pad([prompts[r] for r in firsts], left=True)  # (U, W); sets self.mask
        self._full_mask = self.mask
        self._pos = (self.mask.cumsum(-1) - 1).clamp(min=0)  # (U, W)
        self._done, self.cache = 0, None

    @property
    def prefilled(self) -> bool:
        return self._done == self._ids.shape[1]

    def prefill_chunk(self, tokens: int) -> torch.Tensor | None:
        rows, width = self._ids.shape
        end = width if rows * width <= tokens else min(width, self._done + max(1, tokens // rows))
        start, self._done = self._done, end
        out = self.model(input_ids=self._ids[:, start:end], attention_mask=self._full_mask[:, :end],
                         position_ids=self._pos[:, start:end], past_key_values=self.cache, use_cache=True,
                         **self.keep)
        self.cache = out.past_key_values
        if end < width:
            return None
        self.mask, self.pos = self._full_mask, self._pos[:, -1]
        logits = out.logits[:, -1].float()  # (U, V)
        if self._expand is not None:  # copy the rows of repeated prompts
            self.select(self._expand.to(logits.device))
            logits = logits[self._expand.to(logits.device)]
        return logits

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
        """The whole prefill in one pass: (B, V) logits of the last position."""
        self.begin(prompts)
        return self.prefill_chunk(sys.maxsize)

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
    """Prefill (encoder + first decoder step, in one turn) and decode for seq2seq models
    such as T5."""

    def begin(self, prompts: list[list[int]]) -> None:
        self._prompts = prompts

    @property
    def prefilled(self) -> bool:
        return self._prompts is None

    def prefill_chunk(self, tokens: int) -> torch.Tensor:
        prompts, self._prompts = self._prompts, None
        return self.prefill(prompts)

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


def token_logprobs(logprobs: torch.Tensor, tokens: torch.Tensor, top: int) -> list[TokenLogprob]:
    """Each row's token with its log-probability and the `top` most likely tokens of the row.
    `logprobs`: (N, V) log-probabilities; `tokens`: (N,) ids."""
    chosen = logprobs.gather(1, tokens[:, None])[:, 0].tolist()
    if top:
        values, ids = logprobs.topk(top, dim=-1)
        alternatives = [tuple(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    else:
        alternatives = [()] * len(chosen)
    return [TokenLogprob(t, lp, alt) for t, lp, alt in zip(tokens.tolist(), chosen, alternatives)]


#: the most prompt positions one pass of PromptScores scores (its logits: positions x vocabulary)
SCORE_CHUNK = 256


class PromptScores:
    """Every prompt token's log-probability given the tokens before it (None for the first),
    computed `advance(positions)` positions at a time, so a long prompt never holds (length x
    vocabulary) logits and its scoring can take turns beside other batches."""

    def __init__(self, model, ids: list[int], top: int):
        self.model, self.top = model, top
        self.tokens = torch.tensor([ids], device=model.device)
        self.scored: list[TokenLogprob | None] = [None]
        self._cache = None

    @property
    def done(self) -> bool:
        return len(self.scored) == self.tokens.shape[1]

    def advance(self, positions: int = SCORE_CHUNK) -> bool:
        """Score the next positions (at most SCORE_CHUNK); True once every token is scored."""
        start = len(self.scored) - 1
        end = min(self.tokens.shape[1] - 1, start + min(positions, SCORE_CHUNK))  # inputs start..end-1 predict
        if end > start:  # tokens start+1..end
            result = self.model(input_ids=self.tokens[:, start:end], past_key_values=self._cache, use_cache=True)
            self._cache = result.past_key_values
            self.scored += token_logprobs(result.logits[0].float().log_softmax(-1), self.tokens[0, start + 1:end + 1],
                                          self.top)
        return self.done


def prompt_logprobs(model, ids: list[int], top: int, chunk: int = SCORE_CHUNK) -> tuple[TokenLogprob | None, ...]:
    """PromptScores of `ids` in one go."""
    scores = PromptScores(model, ids, top)
    while not scores.advance(chunk):
        pass
    return tuple(scores.scored)


def shaped(logits: torch.Tensor, slots: list[_Slot]) -> torch.Tensor:
    """The logits as the requests' logit_bias and penalties make them (a copy where any
    request asks; the raw logits stay what log-probabilities report)."""
    rows = [j for j, slot in enumerate(slots) if slot.request.params.shapes_logits]
    if not rows:
        return logits
    logits = logits.clone()
    for j in rows:
        slot, p = slots[j], slots[j].request.params
        if p.logit_bias:
            ids, bias = zip(*p.logit_bias)
            logits[j, list(ids)] += torch.tensor(bias, device=logits.device)
        if p.presence_penalty or p.frequency_penalty:
            if slot.counts is None:
                slot.counts = torch.zeros(logits.shape[-1], device=logits.device)
            logits[j] -= p.frequency_penalty * slot.counts + p.presence_penalty * (slot.counts > 0)
    return logits


def sample(logits: torch.Tensor, slots: list[_Slot]) -> list[int]:
    """Next token per row: greedy where temperature is 0, else temperature + top-p sampling
    with the request's own generator (seeded when the request gave a seed), from the logits
    as the request's logit_bias and penalties shape them."""
    logits = shaped(logits, slots)
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
        self.verify_pass = VerifyPass(
            self.model, [self.profile.layer(i) for i in range(self.profile.num_layers)],
            self.profile.modules.final_norm, output_head(self.model),
            self.tokenizer("The capital of France is", add_special_tokens=True).input_ids,
            lambda ids: self._stepper().prefill([ids]))
        self.stack = PatchStack(self.model, base_model=self.profile.name, architecture=self.profile.architecture,
                                verify=self.verify_pass)
        limit = getattr(self.model.config, "max_position_embeddings", None) or 4096
        self.max_model_len = self.config.max_model_len or min(int(limit), 4096)
        self.max_tokens_limit = self.config.max_tokens_limit
        self.eos_ids = eos_ids(self.model, self.tokenizer)
        pad = self.tokenizer.pad_token_id
        stepper = _EncoderDecoder if self.model.config.is_encoder_decoder else _DecoderOnly
        self._stepper = lambda: stepper(self.model, pad if pad is not None else 0)
        self._waiting: deque[list[_Slot]] = deque()  # groups of slots
        self._controls: deque[tuple[Callable[[], object], concurrent.futures.Future]] = deque()
        self._cv = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.busy_seconds = 0.0

    # --- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        if self._thread is None:
            self.verify_pass.prepare()
            prepare(self.stack, self.profile.first_edit_weights())  # the first edit's apply is not slower
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
        if self.model.config.is_encoder_decoder and any(r.params.prompt_logprobs is not None for r in requests):
            raise EngineError(f"the model {self.model_name!r} is encoder-decoder: its prompt tokens have no "
                              "log-probabilities (echo with logprobs needs a decoder-only model)")

    def _slot(self, request: GenerationRequest, index: int, emit: Callable) -> _Slot:
        generator = None
        if not request.params.greedy:
            generator = torch.Generator(device=self.model.device)
            if request.params.seed is not None:
                generator.manual_seed(request.params.seed + index)
            else:
                generator.seed()
        return _Slot(request, index, emit, TextStream(self.tokenizer, request.params.stop), generator,
                      pending_logprobs=None if request.params.logprobs is None else [])

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

    async def replace(self, ids: Sequence[str], new: Sequence[Patch]) -> str:
        return await self._control(lambda: self.stack.replace(ids, new))

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
        running: list[_Batch] = []  # one forward pass per turn, to the batch served least so far
        while True:
            control, groups = None, []
            with self._cv:
                while not (self._controls or self._waiting or running or self._stopping):
                    self._cv.wait()
                if self._stopping:
                    break
                if self._controls:
                    if not running:  # a change waits for the running batches, and stops new ones
                        control = self._controls.popleft()
                elif self._waiting:
                    if not running and wait and sum(map(len, self._waiting)) < self.config.max_batch_size:
                        self._cv.wait(wait)  # idle: let concurrent arrivals join this batch
                    if not self._controls:
                        groups = self._admit(sum(len(b.slots) for b in running))
            if control is not None:
                fn, future = control
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn())
                    except BaseException as e:  # noqa: BLE001 - handed to the caller
                        future.set_exception(e)
                continue
            started = time.perf_counter()
            with torch.inference_mode():
                if groups:
                    try:
                        batch = _Batch(self, groups)
                        # it starts level with the least-served running batch (not at zero, which
                        # would let a stream of newcomers starve a batch that has run for long)
                        batch.served = min((b.served for b in running), default=0.0)
                        running.append(batch)
                    except BaseException as e:  # noqa: BLE001 - every request of the batch learns it
                        _fail([s for g in groups for s in g], e)
                if running:
                    batch = min(running, key=lambda b: b.served)
                    turn = time.perf_counter()
                    try:
                        done = batch.advance(shared=len(running) > 1)
                    except BaseException as e:  # noqa: BLE001
                        _fail(batch.slots, e)
                        done = True
                    batch.served += time.perf_counter() - turn
                    if done:
                        running.remove(batch)
            self.busy_seconds += time.perf_counter() - started
        self._fail_all(RuntimeError("the engine stopped"))

    def _admit(self, busy_rows: int) -> list[list[_Slot]]:
        """Waiting groups that fit next to `busy_rows` running rows (call under the lock)."""
        groups, rows = [], busy_rows
        while (self._waiting and len(groups) < self.config.max_batch_size
               and rows + len(self._waiting[0]) <= self.config.max_batch_size):
            rows += len(self._waiting[0])
            groups.append(self._waiting.popleft())
        return groups

    def _fail_all(self, error: BaseException) -> None:
        with self._cv:
            pending = [slot for group in self._waiting for slot in group]
            self._waiting = deque()
            controls, self._controls = list(self._controls), deque()
        for slot in pending:
            slot.emit(_Failed(error))
        for _, future in controls:
            future.set_exception(error)


class _Batch:
    """Requests prefilled and decoded together; `advance` runs one forward pass."""

    def __init__(self, engine: HFEngine, groups: list[list[_Slot]]):
        self.engine = engine
        self.served = 0.0  # seconds of forward passes so far (the scheduler's fair share)
        self.version = engine.stack.version
        self.slots = [s for group in groups for s in group if not s.cancelled]
        # Prompts whose log-probabilities were asked for are scored first, a chunk a turn, under
        # the weights this batch runs on (no change lands before it ends); the n choices of a
        # prompt once. Their requests start when their prompt is scored, the others at once.
        scoring: dict[tuple, tuple[PromptScores, list[_Slot]]] = {}
        for slot in self.slots:
            prompt, top = slot.request.prompt_ids, slot.request.params.prompt_logprobs
            if top is None:
                slot.emit(Started(self.version, len(prompt)))
            else:
                key = (tuple(prompt), top)
                scoring.setdefault(key, (PromptScores(engine.model, prompt, top), []))[1].append(slot)
        self.scoring = list(scoring.values())
        self.stepper = engine._stepper()
        if self.slots:
            self.stepper.begin([s.request.prompt_ids for s in self.slots])
        self.tokens: list[int] = []

    def advance(self, shared: bool = False) -> bool:
        """One prefill chunk or one decode step. True when every request has finished.
        `shared`: other batches wait for their turns, so the prefill chunk is cut to an
        eighth (about the cost of a decode step), and they wait no longer than that."""
        if not self.slots:
            return True
        chunk = self.engine.config.prefill_chunk_tokens
        chunk = max(16, chunk // 8) if shared else chunk
        while self.scoring:
            scores, slots = self.scoring[0]
            if all(s.cancelled for s in slots):  # nobody waits for this prompt's scores
                self.scoring.pop(0)
                continue
            if scores.advance(chunk):
                self.scoring.pop(0)
                scored = tuple(scores.scored)
                for slot in slots:
                    slot.emit(Started(self.version, len(slot.request.prompt_ids), prompt_logprobs=scored))
            return False
        if not self.stepper.prefilled:
            logits = self.stepper.prefill_chunk(chunk)
            if logits is None:
                return False
        else:
            logits = self.stepper.step(torch.tensor(self.tokens, device=self.engine.model.device))
        return self._consume(logits)

    def _consume(self, logits: torch.Tensor) -> bool:
        """Sample each row's next token, stream it, and drop finished rows."""
        engine, keep = self.engine, []
        tokens = sample(logits, self.slots)
        reported = _reported_logprobs(logits, tokens, self.slots)
        for j, (slot, token) in enumerate(zip(self.slots, tokens)):
            reason = None
            if slot.cancelled:
                reason = "cancelled"
            elif token in engine.eos_ids and not slot.request.params.ignore_eos:
                reason = "stop"
            else:
                slot.produced += 1
                slot.pending_ids.append(token)
                if slot.counts is not None:
                    slot.counts[token] += 1
                if slot.pending_logprobs is not None:
                    slot.pending_logprobs.append(reported[j])
                text = slot.stream.push(token)
                if text:
                    slot.emit(slot.delta(text))
                if slot.stream.stopped:
                    reason = "stop"
                elif slot.produced >= slot.request.params.max_tokens:
                    reason = "length"
            if reason:
                _finish(slot, reason)
            else:
                keep.append(j)
        if not keep:
            self.slots = []
            return True
        if len(keep) < len(self.slots):
            self.stepper.select(torch.tensor(keep, device=logits.device))
            self.slots = [self.slots[j] for j in keep]
            tokens = [tokens[j] for j in keep]
        self.tokens = tokens
        return False


def _reported_logprobs(logits: torch.Tensor, tokens: list[int], slots: list[_Slot]) -> dict[int, TokenLogprob]:
    """The sampled tokens' log-probabilities, by row, for the rows whose request asked."""
    rows = [j for j, slot in enumerate(slots) if slot.request.params.logprobs is not None]
    out: dict[int, TokenLogprob] = {}
    for top in {slots[j].request.params.logprobs for j in rows}:
        same = [j for j in rows if slots[j].request.params.logprobs == top]
        index = torch.tensor(same, device=logits.device)
        chosen = torch.tensor([tokens[j] for j in same], device=logits.device)
        out.update(zip(same, token_logprobs(logits[index].log_softmax(-1), chosen, top)))
    return out


def _fail(slots: list[_Slot], error: BaseException) -> None:
    log.error("batch of %d failed", len(slots), exc_info=error)
    for slot in slots:
        slot.emit(_Failed(error))


def _finish(slot: _Slot, reason: str) -> None:
    rest = slot.stream.flush() if reason != "cancelled" else ""
    if rest or slot.pending_ids:
        slot.emit(slot.delta(rest))
    slot.emit(Finished(reason, len(slot.request.prompt_ids), slot.produced))
