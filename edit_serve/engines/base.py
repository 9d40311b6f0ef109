"""The engine protocol: what the API layer needs from a model runtime.

An engine owns one model. Request methods are abstract; everything streams. `generate` takes
a group of requests (the prompts and `n` choices of one API call), runs them in the same
batch under the same weights, and yields `(index, event)` pairs; for each index, in order:
one `Started` (the patch-set version serving it), zero or more `TextDelta`, one `Finished`.
Errors are raised from the iterator as `EngineError` (bad input) or any other exception
(a server fault).

Weight changes (`apply`, `revert`, `replace`) never land inside a forward pass: requests that started
before the change finish on the old weights, requests after it see the new ones.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

from patches import Patch


class EngineError(ValueError):
    """A request the engine refuses (too long, bad parameters). One-line message."""


class ReplicaError(RuntimeError):
    """A replica failed a change that the others made; they were rolled back. The message
    names the replica and its reason."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # keep generating past end-of-sequence (benchmarks; vLLM has it too)
    #: report each new token's log-probability and this many most likely alternatives (None: off)
    logprobs: int | None = None
    #: the same for every prompt token after the first (None: off); `Started.prompt_logprobs`
    prompt_logprobs: int | None = None
    #: OpenAI's penalties, on the tokens generated so far: each token's logit is lowered by
    #: frequency_penalty x its count, and by presence_penalty once it has appeared
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit) before sampling

    @property
    def shapes_logits(self) -> bool:
        return bool(self.logit_bias or self.presence_penalty or self.frequency_penalty)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    adapter: str | None = None  # a served adapter's name (see Engine.served_models); None: the model


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the model's raw distribution (before temperature and
    top-p), and the `top` most likely tokens at its position, most likely first."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()

    def limited(self, top: int) -> "TokenLogprob":
        return dataclasses.replace(self, top=self.top[:top])


@dataclass(frozen=True)
class Started:
    version: str
    prompt_tokens: int
    replica: str | None = None  # which replica serves the request (set on Ray Serve)
    #: with `SamplingParams.prompt_logprobs`: one entry per prompt token, None for the first
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None


@dataclass(frozen=True)
class TextDelta:
    text: str
    token_ids: tuple[int, ...]
    #: with `SamplingParams.logprobs`: one entry per token of `token_ids`
    logprobs: tuple[TokenLogprob, ...] | None = None


@dataclass(frozen=True)
class Finished:
    reason: Literal["stop", "length", "cancelled"]
    prompt_tokens: int
    completion_tokens: int


Event = Started | TextDelta | Finished


@dataclass(frozen=True)
class ActiveInfo:
    """One active patch as an engine reports it."""

    id: str
    method: str
    applied_at: float


class Engine(abc.ABC):
    """A model runtime that streams completions and hot-loads patches."""

    #: the profile name clients put in `model`
    model_name: str
    #: a transformers tokenizer (chat template, encode, decode)
    tokenizer: object
    #: longest prompt + completion, in tokens
    max_model_len: int
    #: largest max_tokens a request may ask for
    max_tokens_limit: int

    async def start(self) -> None:  # noqa: B027 - optional lifecycle hook
        """Load weights, start workers."""

    async def stop(self) -> None:  # noqa: B027
        """Finish or cancel in-flight work and release resources."""

    @abc.abstractmethod
    def generate(self, requests: list[GenerationRequest]) -> AsyncIterator[tuple[int, Event]]:
        """Stream the events of a group of requests (see module docstring)."""

    @abc.abstractmethod
    async def check(self, patch: Patch) -> None:
        """Raise PatchError unless `patch` could be applied now. Changes nothing."""

    @abc.abstractmethod
    async def apply(self, patch: Patch, position: int | None = None) -> str:
        """Apply atomically between forward passes, on top of the active patches (or at
        `position` in their apply order: how a failed revert is undone exactly); return the
        new patch-set version."""

    @abc.abstractmethod
    async def revert(self, patch_id: str) -> str:
        """Revert exactly between forward passes; return the new patch-set version."""

    @abc.abstractmethod
    async def replace(self, ids: Sequence[str], new: Sequence[Patch]) -> str:
        """One change-set between forward passes: make the active patches exactly `ids`, in
        this order (`new`: those of them not active yet, already parsed and validated), all
        or nothing (a compaction swaps many patches for one); return the new version."""

    @abc.abstractmethod
    async def stamp(self, patch: Patch) -> Patch:
        """`patch` with this engine's base fingerprint and model identity filled in."""

    @abc.abstractmethod
    async def weight_digests(self, names: list[str]) -> dict[str, str]:
        """sha256 of the exact current bytes of the named parameters (proof that a revert
        restored them, or that nothing else changed). Raises PatchError for unknown names."""

    @property
    @abc.abstractmethod
    def version(self) -> str:
        """The active patch-set version."""

    @property
    @abc.abstractmethod
    def active(self) -> list[ActiveInfo]:
        """Active patches, in the order they were applied."""

    async def top_tokens(self, prompts: list[list[int]]) -> list[tuple[int, float]]:
        """The greedy next token of each prompt and its probability, computed between batches
        (used to choose probe prompts the model answers confidently). Optional."""
        raise NotImplementedError(f"the {type(self).__name__} engine does not report next-token probabilities")

    def memory(self) -> dict[tuple[str, str], int]:
        """Bytes in use, keyed by (device, kind)."""
        return {}

    @property
    def served_models(self) -> list[str]:
        """Names a request's `model` may give: the model, then any adapters (a request naming
        an adapter carries it in `GenerationRequest.adapter`)."""
        return [self.model_name]


#: the most alternatives a request may ask for at each token (`logprobs`, `top_logprobs`)
MAX_LOGPROBS = 20
#: the most tokens one request's logit_bias may name (as OpenAI's API)
MAX_LOGIT_BIAS = 300


def validate_requests(requests: list[GenerationRequest], *, max_batch_size: int, max_model_len: int,
                      max_tokens_limit: int, adapters: tuple[str, ...] | list[str] = ()) -> None:
    """Raise EngineError unless every request of a group can be served."""
    if not requests:
        raise EngineError("no prompts to complete")
    if len(requests) > max_batch_size:
        raise EngineError(
            f"{len(requests)} completions in one request (prompts x n) is over this server's "
            f"limit of {max_batch_size}"
        )
    for request in requests:
        p, n = request.params, len(request.prompt_ids)
        if n == 0:
            raise EngineError("the prompt is empty")
        if p.max_tokens < 1:
            raise EngineError("max_tokens must be at least 1")
        if p.max_tokens > max_tokens_limit:
            raise EngineError(f"max_tokens {p.max_tokens} is over this server's limit of {max_tokens_limit}")
        if n + p.max_tokens > max_model_len:
            raise EngineError(
                f"this model's maximum context length is {max_model_len} tokens; the prompt has "
                f"{n} and max_tokens asks for {p.max_tokens}"
            )
        if not (p.temperature == 0 or 0.01 <= p.temperature <= 100):
            raise EngineError("temperature must be 0 (greedy) or between 0.01 and 100")
        if not 0 < p.top_p <= 1:
            raise EngineError("top_p must be in (0, 1]")
        for name in ("logprobs", "prompt_logprobs"):
            asked = getattr(p, name)
            if asked is not None and not 0 <= asked <= MAX_LOGPROBS:
                raise EngineError(f"{name} must be between 0 and {MAX_LOGPROBS}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(p, name) <= 2:
                raise EngineError(f"{name} must be between -2 and 2")
        if len(p.logit_bias) > MAX_LOGIT_BIAS or any(not -100 <= b <= 100 or t < 0 for t, b in p.logit_bias):
            raise EngineError(f"logit_bias takes at most {MAX_LOGIT_BIAS} token ids, each with a bias between "
                              "-100 and 100")
        if request.adapter is not None and request.adapter not in adapters:
            raise EngineError(f"no adapter {request.adapter!r} is loaded on this server")
