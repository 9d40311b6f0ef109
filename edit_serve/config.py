"""Server and engine settings, validated where they enter (CLI flags, environment, Serve
config files). Every field says what it is for."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

#: the log line of every edit_serve process (the server, its editor process, Ray actors)
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

#: how far compaction lets edit retention or probe-set locality fall before it refuses
DEFAULT_COMPACT_TOLERANCE = 0.02


class EngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    engine: Literal["hf", "vllm"] = Field("hf", description="Runtime: transformers (hf) or vLLM.")
    model: str = Field("smollm2-135m", description="Profile name or path to a profile .toml file.")
    weights: str | None = Field(
        None,
        description="Load weights from this folder or hub id instead of the profile's source.")
    dtype: Literal["float32", "float16", "bfloat16"] | None = Field(
        None,
        description="Serving dtype; the profile's default when unset.")
    device: str = Field("cpu", description="torch device for the hf engine, e.g. cpu or cuda:0.")
    max_batch_size: int = Field(32, ge=1, le=1024, description="Most requests decoded together in one batch.")
    batch_wait_ms: float = Field(
        2.0, ge=0, le=1000,
        description="How long a new batch waits for more requests to join.")
    prefill_chunk_tokens: int = Field(
        256, ge=16, le=65536,
        description="hf: most prompt tokens (over all rows) prefilled in one forward pass; a longer prefill is cut "
        "into turns, so requests that arrive meanwhile are served between them (while others wait, a turn "
        "prefills an eighth of this).")
    max_model_len: int | None = Field(
        None, ge=16,
        description="Longest prompt + completion in tokens; the model's limit (capped at 4096) when unset.")
    max_tokens_limit: int = Field(2048, ge=1, description="Largest max_tokens a request may ask for.")
    vllm_memory_utilization: float = Field(
        0.2, gt=0, le=1,
        description="vllm: share of accelerator memory for weights and KV cache; on vLLM's CPU backend, the share "
        "of host memory reserved for the KV cache (vLLM's own default of 0.92 fails at start-up there).",
    )
    vllm_enforce_eager: bool = Field(
        True,
        description="vllm: no CUDA graphs or torch.compile (fast start; needed on CPU without Triton).")
    vllm_tensor_parallel_size: int = Field(
        1, ge=1,
        description="vllm: workers one model is sharded over. Weight patches need 1 (they are not sliced to "
        "shards); adapters work with any.")
    adapters: dict[str, Path] = Field(
        default_factory=dict,
        description="vllm adapter mode: name -> low-rank patch file, each served as a LoRA adapter that a request "
        "chooses by giving its name as `model`.",
    )
    enable_adapters: bool = Field(
        False,
        description="vllm: enable LoRA so adapters can be added while serving (implied by `adapters`).")
    max_adapters: int = Field(4, ge=1, description="vllm: adapters used in one batch at once (vLLM's max_loras).")
    max_adapter_rank: int = Field(
        16, ge=1,
        description="vllm: largest adapter rank (vLLM's max_lora_rank: 1, 8, 16, 32, 64, ...; ROME is rank 1).")
    max_memory_rows: int = Field(
        100_000, ge=1,
        description="SERAC: rows (one per edit and per rephrasing) all active memory patches may hold together; a "
        "memory patch that would pass it is refused.")
    editors: dict[str, Path] = Field(
        default_factory=dict,
        description="Trained editor checkpoints (`edit_serve train`) by method, e.g. {mend: editor.safetensors}, used "
        "by POST /v1/edits unless a request names its own in config.editor; unset: the one trained and cached for "
        "the model.",
    )

    @field_validator("editors")
    @classmethod
    def _editor_files(cls, v: dict[str, Path]) -> dict[str, Path]:
        trained = ("mend", "ke")
        for method, path in v.items():
            if method not in trained:
                raise ValueError(f"editors: {method!r} is not a trained editor (one of {', '.join(trained)})")
            if not path.expanduser().is_file():
                raise ValueError(f"editors: no {method} checkpoint at {path} (train one with `edit_serve train`)")
        return {m: p.expanduser().resolve() for m, p in v.items()}


#: active edit requests one probe run measures (ProbeConfig.edits_per_run)
DEFAULT_PROBE_EDITS = 64


class ProbeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(
        True,
        description="Run the edit-retention and locality probes (after every apply and revert, and on a timer).")
    interval_s: float = Field(
        30.0, ge=0,
        description="Seconds between periodic probe runs; 0 runs them only after apply and revert.")
    probe_set: Path | None = Field(
        None,
        description='JSONL file of locality prompts ({"prompt": ...} per line); by default a set is built at start-up '
        'from generic factual prompts the model answers confidently.')
    size: int = Field(
        16, ge=1, le=1024,
        description="Prompts in the default probe set (the most confidently answered).")
    min_confidence: float = Field(
        0.4, ge=0, le=1,
        description="Top-1 next-token probability a pool prompt needs to enter the default probe set.")
    batch_size: int = Field(
        16, ge=1, le=1024,
        description="Probe prompts sent to the engine as one group (capped at the engine's max_batch_size unless set "
        "explicitly).")
    edits_per_run: int = Field(
        DEFAULT_PROBE_EDITS, ge=1, le=1_000_000,
        description="Most active edit requests one probe run measures; with more active, runs take turns through them "
        "(the newest patches' first) and retention counts each edit's latest result, so a run's cost stays "
        "bounded however many edits pile up.")


class ServerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    engine: EngineConfig = Field(default_factory=EngineConfig, description="The model runtime.")
    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8000, ge=0, le=65535, description="Port to listen on (0 picks a free one).")
    patch_store: Path = Field(
        default_factory=lambda: default_store(),
        description="Folder with patch files and the append-only patch log.")
    admin_token: SecretStr | None = Field(
        default_factory=lambda: SecretStr(t) if (t := os.environ.get("EDIT_SERVE_ADMIN_TOKEN")) else None,
        description="Bearer token for the admin API (EDIT_SERVE_ADMIN_TOKEN); without one the admin API refuses "
        "every call.",
    )
    max_patch_bytes: int = Field(2 * 1024**3, ge=1024, description="Largest patch file the admin API accepts.")
    max_request_bytes: int = Field(4 * 1024**2, ge=1024, description="Largest JSON request body of the OpenAI API.")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Logging level.")
    probes: ProbeConfig = Field(default_factory=ProbeConfig, description="Live edit-retention and locality probes.")
    warm_editor: bool = Field(
        False, description="Start the editor with the server and compute, in its background, the key statistics a "
        "first rome, memit or alphaedit edit reads (else the first such edit computes them).")

    @model_validator(mode="after")
    def _probe_batches_fit(self):
        if self.probes.batch_size > self.engine.max_batch_size:
            if "batch_size" in self.probes.model_fields_set:
                raise ValueError(f"probes.batch_size ({self.probes.batch_size}) must not exceed the engine's "
                                 f"max_batch_size ({self.engine.max_batch_size})")
            self.probes.batch_size = self.engine.max_batch_size
        return self

    @field_validator("patch_store")
    @classmethod
    def _absolute(cls, v: Path) -> Path:
        return v.expanduser().resolve()


def default_store() -> Path:
    from edit_serve.models import cache_dir

    return Path(os.environ.get("EDIT_SERVE_PATCH_STORE") or cache_dir() / "patch-store")
