"""The engine protocol: what the API layer needs from a model runtime.

An engine owns one model. Request methods are abstract; everything streams. `generate` takes
a group of requests (the prompts and `n` choices of one API call), runs them in the same
batch under the same weights, and yields `(index, event)` pairs; for each index, in order:
one `Started` (the patch-set version serving it), zero or more `TextDelta`, one `Finished`.
Errors are raised from the iterator as `EngineError` (bad input) or any other exception
(a server fault).

Weight changes (`apply`, `revert`) never land inside a forward pass: requests that started
before the change finish on the old weights, requests after it see the new ones.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal

from patches import Patch


class EngineError(ValueError):
    """A request the engine refuses (too long, bad parameters). One-line message."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # keep generating past end-of-sequence (benchmarks; vLLM has it too)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)


@dataclass(frozen=True)
class Started:
    version: str
    prompt_tokens: int


@dataclass(frozen=True)
class TextDelta:
    text: str
    token_ids: tuple[int, ...]


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
    async def apply(self, patch: Patch) -> str:
        """Apply atomically between forward passes; return the new patch-set version."""

    @abc.abstractmethod
    async def revert(self, patch_id: str) -> str:
        """Revert exactly between forward passes; return the new patch-set version."""

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
