"""Key statistics: C = E[k k^T] of the inputs k of an MLP output projection over a corpus.

ROME and MEMIT need C for every layer they edit. It is computed once (float32 keys,
float64 accumulation, a progress bar, the forward pass stopped after the last requested
layer), written to `cache_dir()/stats/<model fingerprint>/<layer module>.<corpus id>.<n>x<len>.safetensors`,
and kept in memory for as long as the model object lives, so edits never recompute or re-read it.

The model fingerprint covers every parameter outside the MLPs (sampled values, names and
shapes): it identifies the checkpoint, and stays the same while edit patches (which change
MLP weights) are applied, so statistics are not recomputed after each sequential edit.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from editors.corpus import CorpusSpec, corpus_windows
from editors.files import made_once, save_tensors
from editors.lm import is_seq2seq, model_device
from editors.nethook import TraceDict

log = logging.getLogger(__name__)

#: values hashed per parameter for the fingerprint
_FINGERPRINT_VALUES = 4096


#: (windows, tokens per window, shrinkage) when a config leaves them unset, per corpus kind.
#: A file or a hub corpus is only read: 1,000 windows of 128 tokens cost about 30 s on 2 CPU
#: cores. The model writes its own text one token at a time (SmolLM2-135M: about 90 CPU
#: seconds for 8,192 tokens), so it samples 128 windows of 64 tokens (a new user's first edit
#: in minutes, benchmarks/first_edit.py) and the noisier estimate is shrunk toward a multiple
#: of the identity (see `shrunk`).
DEFAULT_SIZES = {"model": (128, 64, 1.0), "file": (1000, 128, 0.0), "datasets": (1000, 128, 0.0)}


@dataclass(frozen=True)
class StatsConfig:
    """Which statistics: corpus name (see editors.corpus), number of windows, window length,
    and how much the estimate is shrunk where ROME and MEMIT invert it (None: the corpus kind's
    default, DEFAULT_SIZES)."""

    corpus: str = "model"  # text the model samples itself: see editors.corpus
    samples: int | None = None
    length: int | None = None
    shrinkage: float | None = None
    batch_size: int = 16

    def __post_init__(self):
        samples, length, shrinkage = DEFAULT_SIZES[CorpusSpec(self.corpus).kind]
        for name, default in (("samples", samples), ("length", length), ("shrinkage", shrinkage)):
            if getattr(self, name) is None:
                object.__setattr__(self, name, default)
        if self.samples < 1 or self.length < 2 or self.batch_size < 1 or self.shrinkage < 0:
            raise ValueError("statistics need samples >= 1, length >= 2, batch_size >= 1 and shrinkage >= 0")


@dataclass(frozen=True)
class StatsSettings:
    """The key-statistics fields of an editor's config (ROME, MEMIT, a trained editor's
    re-solve); `stats()` is the StatsConfig they name."""

    stats_corpus: str = StatsConfig.corpus
    stats_samples: int | None = None  # None: the corpus kind's default (DEFAULT_SIZES)
    stats_length: int | None = None
    stats_shrinkage: float | None = None

    def stats(self) -> StatsConfig:
        return StatsConfig(corpus=self.stats_corpus, samples=self.stats_samples, length=self.stats_length,
                           shrinkage=self.stats_shrinkage)

    def uses_stats(self) -> bool:
        """Whether an edit with these settings reads the statistics."""
        return True


def shrunk_mom2(ctx, layer: int, s: StatsConfig) -> torch.Tensor:
    """`shrunk` C (float64, in x in) of `layer`'s MLP output projection, as the editors invert it."""
    return shrunk(ctx.stats([layer], s)[layer].double(), s.shrinkage)


def mom2_key(ctx, layer: int, s: StatsConfig) -> tuple:
    """What a value derived from `shrunk_mom2` is cached under in the edit context (with its kind)."""
    return ctx.profile.mlp_out(layer), s.corpus, s.samples, s.length, s.shrinkage


def mom2_lu(ctx, layer: int, s: StatsConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The LU factors of the shrunk C of `layer`'s MLP output projection, once per model (C^-1 k
    for ROME's direction and a trained editor's re-solve)."""
    return ctx.cached(("mom2-lu", *mom2_key(ctx, layer, s)), lambda: torch.linalg.lu_factor(shrunk_mom2(ctx, layer, s)))


def shrunk(mom2: torch.Tensor, weight: float) -> torch.Tensor:
    """C + weight * mean(diag C) * I: the estimate ROME and MEMIT invert. Few tokens estimate
    C's small eigenvalues badly and C^-1 k leans on exactly those; shrinking them toward the
    mean (a ridge, as in Ledoit and Wolf's estimator) keeps C^-1 k near what many tokens give
    (benchmarks/stats_corpora.py measures how near). The null-space projector uses C as is."""
    if weight == 0:
        return mom2
    mean = mom2.diagonal().mean()
    return mom2 + weight * mean * torch.eye(mom2.shape[0], dtype=mom2.dtype, device=mom2.device)


def stats_root() -> Path:
    from edit_serve.models import cache_dir

    return cache_dir() / "stats"


def model_fingerprint(model: torch.nn.Module, profile) -> str:
    """A short hash identifying the checkpoint by its non-MLP parameters (see module doc)."""
    mlps = tuple(profile.mlp(i) + "." for i in range(profile.num_layers))
    h = hashlib.sha256(type(model).__name__.encode())
    for name, param in model.named_parameters():
        if name.startswith(mlps):
            continue
        flat = param.detach().reshape(-1)
        step = max(1, flat.numel() // _FINGERPRINT_VALUES)
        values = flat[::step][:_FINGERPRINT_VALUES].to(torch.bfloat16).cpu()
        h.update(name.encode())
        h.update(repr(tuple(param.shape)).encode())
        h.update(values.view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:20]


# statistics held in memory per model object; dropped with the model
_MEMORY: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


def model_memory(model) -> dict:
    """The in-memory cache of one model object (statistics, projectors, edit keys); the edit
    context's `cache`."""
    store = _MEMORY.get(model)
    if store is None:
        store = _MEMORY[model] = {}
    return store


def fingerprint_of(model, profile) -> str:
    """`model_fingerprint`, computed once per model object."""
    memory = model_memory(model)
    return memory.get("fingerprint") or memory.setdefault("fingerprint", model_fingerprint(model, profile))


def cache_file(fingerprint: str, module: str, corpus_id: str, cfg: StatsConfig) -> Path:
    return stats_root() / fingerprint / f"{module}.{corpus_id}.{cfg.samples}x{cfg.length}.safetensors"


def lock_file(fingerprint: str, corpus_id: str, cfg: StatsConfig) -> Path:
    """What a process computing statistics holds (editors.files.made_once): one per corpus and
    size, as all the missing layers are computed in one pass over the same windows."""
    return stats_root() / fingerprint / f"{corpus_id}.{cfg.samples}x{cfg.length}"


@torch.no_grad()
def compute_mom2(model, tokenizer, modules: Sequence[str], windows: torch.Tensor,
                 batch_size: int = 16) -> tuple[dict[str, torch.Tensor], int]:
    """E[k k^T] of the inputs of each module in `modules` (listed in execution order) over
    `windows` (n, T) token ids: ({module: (d, d) float32}, tokens)."""
    device = model_device(model)
    sums: dict[str, torch.Tensor] = {}
    count = 0
    for start in tqdm(range(0, len(windows), batch_size), desc="key statistics", unit="batch"):
        ids = windows[start:start + batch_size].to(device)  # (b, T)
        with TraceDict(model, modules, retain_input=True, retain_output=False, stop=True) as td:
            model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
        for name in modules:
            k = td[name].input.reshape(-1, td[name].input.shape[-1]).float()  # (b*T, d)
            acc = sums.get(name)
            if acc is None:
                acc = sums[name] = torch.zeros(k.shape[1], k.shape[1], dtype=torch.float64, device=device)
            acc += (k.T @ k).double()  # (d, d)
        count += ids.numel()
    return {name: (acc / count).float() for name, acc in sums.items()}, count


def layer_stats(model, tokenizer, profile, layers: Sequence[int], cfg: StatsConfig | None = None,
                stop: threading.Event | None = None, announce: bool = True) -> dict[int, torch.Tensor]:
    """C for the MLP output projection of each layer: from memory, else from the disk cache,
    else computed (all missing layers in one pass) and cached. One process computes them while
    others that need the same ones wait for it and then read them (editors.files.made_once:
    `stop` ends the wait, `announce` asks a holder that works ahead of need to let go)."""
    cfg = cfg or StatsConfig()
    if is_seq2seq(model):
        raise ValueError("key statistics are computed for decoder-only models")
    spec = CorpusSpec(cfg.corpus)
    corpus_id = spec.ident()
    memory = model_memory(model)
    fingerprint = fingerprint_of(model, profile)
    device = model_device(model)
    result: dict[int, torch.Tensor] = {}

    def find() -> list[int]:
        """Fill `result` from memory and disk; the layers found in neither."""
        missing = []
        for layer in sorted(set(layers) - set(result)):
            module = profile.mlp_out(layer)
            key = (module, corpus_id, cfg.samples, cfg.length)
            path = cache_file(fingerprint, module, corpus_id, cfg)
            if key in memory:
                result[layer] = memory[key]
            elif path.is_file():
                result[layer] = memory[key] = load_file(str(path))["mom2"].to(device)
            else:
                missing.append(layer)
        return missing

    if not find():
        return result
    with made_once(lock_file(fingerprint, corpus_id, cfg), "key statistics", stop, announce):
        missing = find()  # another process may have written them meanwhile
        if not missing:
            return result
        modules = [profile.mlp_out(layer) for layer in missing]
        started = time.perf_counter()
        windows = corpus_windows(model, tokenizer, spec, cfg.samples, cfg.length, stats_root() / "corpus" / fingerprint)
        mom2, tokens = compute_mom2(model, tokenizer, modules, windows, cfg.batch_size)
        log.info("key statistics for layers %s over %d tokens of %s in %.1f s", missing, tokens, corpus_id,
                 time.perf_counter() - started)
        for layer, module in zip(missing, modules):
            save_tensors(cache_file(fingerprint, module, corpus_id, cfg), {"mom2": mom2[module].cpu().contiguous()},
                         metadata={"tokens": str(tokens), "corpus": corpus_id, "module": module})
            result[layer] = memory[(module, corpus_id, cfg.samples, cfg.length)] = mom2[module]
    return result


def precompute_stats(model, tokenizer, profile, layers: Sequence[int], corpus: str = StatsConfig.corpus,
                     n: int | None = None, length: int | None = None) -> dict[int, Path]:
    """Compute (or find) the statistics for `layers` and return their cache files; for
    `edit_serve stats`."""
    cfg = StatsConfig(corpus=corpus, samples=n, length=length)
    layer_stats(model, tokenizer, profile, layers, cfg)
    fingerprint = fingerprint_of(model, profile)
    corpus_id = CorpusSpec(corpus).ident()
    return {layer: cache_file(fingerprint, profile.mlp_out(layer), corpus_id, cfg) for layer in layers}
