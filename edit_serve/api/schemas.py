"""Request bodies of the OpenAI-compatible API.

Parameters this server implements are typed; parameters that OpenAI clients commonly send
with neutral values are accepted when neutral and refused with a clear message otherwise;
anything else is refused by name, so a client never silently gets a different behaviour.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from edit_serve.engines.base import MAX_LOGIT_BIAS, MAX_LOGPROBS, SamplingParams


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="The served model's name (GET /v1/models).")
    temperature: float = Field(1.0, ge=0.0, le=100.0, description="0 for greedy decoding.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    n: int = Field(1, ge=1, le=16, description="Completions per prompt.")
    stream: bool = Field(False, description="Server-sent events.")
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(None, description="Up to 4 strings that end generation.")
    seed: int | None = Field(None, ge=0, le=2**63 - 1,
                             description="Seed for sampling (reproducible on the same batch).")
    user: str | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="Lowers a token's logit once it has appeared.")
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="Lowers a token's logit by its count so far.")
    logit_bias: dict[str, float] | None = Field(None, description="Token id (as a string) -> bias in [-100, 100].")
    ignore_eos: bool = Field(False, description="Extension (as in vLLM): do not stop at end-of-sequence.")

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _biases(cls, v):
        if not v:
            return None
        if len(v) > MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias takes at most {MAX_LOGIT_BIAS} token ids")
        for token, bias in v.items():
            if not token.isdigit():
                raise ValueError(f"logit_bias keys are token ids; {token!r} is not one")
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias values are between -100 and 100; token {token} has {bias}")
        return v

    def sampling(self, max_tokens: int) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
                              seed=self.seed, stop=tuple(self.stop or ()), ignore_eos=self.ignore_eos,
                              presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                              logit_bias=tuple((int(t), float(b)) for t, b in (self.logit_bias or {}).items()),
                              **self.logprob_options())

    def logprob_options(self) -> dict:
        """SamplingParams' `logprobs` and `prompt_logprobs` as the request asks."""
        return {}


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(description="Text, texts, or token ids.")
    max_tokens: int | None = Field(16, ge=0, description="New tokens at most (default 16); 0 with echo scores the "
                                                         "prompt alone.")
    echo: bool = Field(False, description="Return the prompt in front of the completion (and, with logprobs, "
                                          "its tokens' log-probabilities).")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS,
                                 description="Each token's log-probability and this many most likely alternatives.")
    best_of: int | None = None
    suffix: str | None = None

    def logprob_options(self) -> dict:
        return {"logprobs": self.logprobs, "prompt_logprobs": self.logprobs if self.echo else None}

    @model_validator(mode="after")
    def _supported(self):
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens 0 completes nothing; it is for scoring a prompt with echo true")
        if self.best_of not in (None, 1, self.n):
            raise ValueError("best_of is not supported by this server")
        if self.suffix:
            raise ValueError("suffix is not supported by this server")
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt is empty")
        return self


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ResponseFormat(BaseModel):
    type: Literal["text"]


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = Field(False, description="Each output token's log-probability.")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS,
                                     description="With logprobs: this many most likely alternatives at each token.")
    response_format: ResponseFormat | None = None
    tools: list | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None

    def logprob_options(self) -> dict:
        return {"logprobs": (self.top_logprobs or 0) if self.logprobs else None}

    @model_validator(mode="after")
    def _supported(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs set to true")
        if self.tools:
            raise ValueError("tools are not supported by this server")
        return self
