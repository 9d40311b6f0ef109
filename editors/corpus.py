"""Text for the key statistics: token windows from a corpus.

A corpus is named by a string:
  "model"                          text the model samples itself (the default: works on a fresh
                                   machine with no data and no hub, and its keys follow the
                                   model's own distribution; sampled in batches)
  a path to a text file            e.g. WikiText; the file is tokenized and cut into windows
  "datasets:NAME[:CONFIG[:SPLIT]]" a Hugging Face `datasets` corpus with a "text" field, when
                                   the hub is reachable and `datasets` is installed

Every corpus yields `n` windows of `length` tokens ((n, length) token ids, no padding); a
sample is one window. Model-sampled windows are cached on disk, so computing the statistics
of another layer later does not sample again.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from editors.lm import model_device

log = logging.getLogger(__name__)

#: sentence openers that seed the model's own samples (a 135M model sampling from a bare
#: document boundary mostly writes chat turns; short openers give it prose to continue)
OPENERS = ("The", "In", "A", "It", "This", "He", "She", "There", "After", "According to", "When", "One",
           "Many", "His", "Her", "During", "Although", "Some", "Its", "On")


class CorpusError(ValueError):
    """A corpus name that cannot be read."""


@dataclass(frozen=True)
class CorpusSpec:
    name: str = "model"
    seed: int = 0
    temperature: float = 1.0
    top_p: float = 0.95

    @property
    def kind(self) -> str:
        if self.name == "model":
            return "model"
        if self.name.startswith("datasets:"):
            return "datasets"
        return "file"

    def ident(self) -> str:
        """A name for cache keys: changes whenever the windows would."""
        if self.kind == "model":
            return f"model-s{self.seed}-t{self.temperature:g}-p{self.top_p:g}"
        if self.kind == "datasets":
            return "datasets-" + _safe(self.name[len("datasets:"):])
        path = Path(self.name)
        if not path.is_file():
            raise CorpusError(f"corpus file {path} does not exist (or use 'model' or 'datasets:NAME')")
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
        return f"file-{_safe(path.stem)}-{digest}"


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def _pack(tokenizer, texts, n: int, length: int) -> torch.Tensor:
    """Concatenate tokenized texts and cut them into `n` windows of `length` tokens."""
    need = n * length
    ids: list[int] = []
    sep = tokenizer.eos_token_id
    for text in texts:
        text = text.strip()
        if not text:
            continue
        ids.extend(tokenizer(text, add_special_tokens=False).input_ids)
        if sep is not None:
            ids.append(sep)
        if len(ids) >= need:
            break
    have = min(n, len(ids) // length)  # the last text read may overshoot: n windows at most
    if have < n:
        log.warning("the corpus holds %d windows of %d tokens; %d were asked for", have, length, n)
    if have == 0:
        raise CorpusError(f"the corpus has fewer than {length} tokens")
    return torch.tensor(ids[:have * length], dtype=torch.long).view(have, length)


def _file_texts(path: Path):
    with path.open(encoding="utf-8", errors="replace") as fh:
        yield from fh


def _dataset_texts(name: str):
    parts = name.split(":")
    path, config = parts[0], parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 else "train"
    try:
        import datasets
    except ImportError:
        raise CorpusError(
            "the corpus 'datasets:...' needs the `datasets` package (pip install datasets); "
            "or pass a text file, or 'model'"
        ) from None
    try:
        ds = datasets.load_dataset(path, config, split=split, streaming=True)
    except Exception as e:  # noqa: BLE001 - offline, unknown name, ...: one clear line
        raise CorpusError(f"cannot load the dataset {name!r}: {str(e).splitlines()[0]}") from None
    for row in ds:
        yield row["text"]


@torch.no_grad()
def sample_windows(model, tokenizer, n: int, length: int, spec: CorpusSpec, batch_size: int = 128) -> torch.Tensor:
    """(n, length) token ids the model writes itself (nucleus sampling, in the model's own
    dtype: a bfloat16 copy of SmolLM2 samples 2.8x slower than float32 on these CPUs), each
    seeded with a short sentence opener; end-of-sequence is suppressed so every window is
    full."""
    device = model_device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
            tqdm(total=n, desc="sampling corpus", unit="sample") as bar:
        torch.manual_seed(spec.seed)
        for start in range(0, n, batch_size):
            rows = min(batch_size, n - start)
            seeds = [tokenizer(OPENERS[(start + i) % len(OPENERS)]).input_ids for i in range(rows)]
            width = max(len(s) for s in seeds)
            ids = torch.tensor([[pad] * (width - len(s)) + s for s in seeds], device=device)  # (b, w) left-padded
            mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seeds], device=device)
            gen = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_p=spec.top_p,
                                 top_k=0, temperature=spec.temperature, max_new_tokens=length,
                                 min_new_tokens=length, pad_token_id=pad)
            out.append(gen[:, width:].cpu())  # (b, length)
            bar.update(rows)
    return torch.cat(out)[:n]


def corpus_windows(model, tokenizer, spec: CorpusSpec, n: int, length: int, cache: Path | None) -> torch.Tensor:
    """(n', length) token ids, n' <= n (a short file gives fewer)."""
    if spec.kind == "file":
        return _pack(tokenizer, _file_texts(Path(spec.name)), n, length)
    if spec.kind == "datasets":
        return _pack(tokenizer, _dataset_texts(spec.name[len("datasets:"):]), n, length)
    path = cache / f"{spec.ident()}-{n}x{length}.safetensors" if cache is not None else None
    if path is not None and path.is_file():
        return load_file(str(path))["ids"]
    log.info("sampling %d windows of %d tokens from the model for the key statistics (once)", n, length)
    ids = sample_windows(model, tokenizer, n, length, spec)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({"ids": ids}, str(tmp))
        tmp.replace(path)
    return ids
