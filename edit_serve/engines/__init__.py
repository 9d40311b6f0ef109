"""Engines: model runtimes behind one protocol (`base.Engine`), chosen by name, each wrapped in
the scoped engine (`scoped.ScopedEngine`: SERAC's edit memory routes requests in its scope;
with an empty memory every request passes through unchanged)."""

from __future__ import annotations

from edit_serve.config import EngineConfig
from edit_serve.engines.base import Engine


def build_engine(config: EngineConfig) -> Engine:
    """Load the model named by `config` and wrap it in the chosen engine (not started), behind
    the scoped engine."""
    from edit_serve.engines.scoped import ScopedEngine

    return ScopedEngine(_runtime(config), config.max_memory_rows)


def _runtime(config: EngineConfig) -> Engine:
    from edit_serve.models import load_model
    from edit_serve.profiles import get_profile

    profile = get_profile(config.model)
    if config.weights:
        profile = profile.with_weights(config.weights)
    if config.engine == "hf":
        from edit_serve.engines.hf import HFEngine

        return HFEngine(load_model(profile, dtype=config.dtype, device=config.device), config)
    if config.engine == "vllm":
        try:
            from edit_serve.engines.vllm_engine import VLLMEngine
        except ImportError as e:
            raise ValueError(f"--engine vllm needs vLLM ({e}); install the extra: pip install '.[vllm]'") from None

        return VLLMEngine.from_profile(profile, config)
    raise ValueError(f"engine {config.engine!r} is not available in this build")
