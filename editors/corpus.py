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
from safetensors.torch import load_file
from tqdm.auto import tqdm

from editors.files import save_tensors
from editors.lm import eos_ids, model_device

log = logging.getLogger(__name__)

#: sentence openers that seed the model's own samples (a 135M model sampling from a bare
#: document boundary mostly writes chat turns; short openers give it prose to continue)
OPENERS = ("The", "In", "A", "It", "This", "He", "She", "There", "After", "According to", "When", "One",
           "Many", "His", "Her", "During", "Although", "Some", "Its", "On")

#: the sampler's version, part of a model corpus's name: windows and statistics made by an
#: earlier sampler (transformers' `generate`, other draws) stay in files of their own
SAMPLER = "v2"


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
            return f"model-{SAMPLER}-s{self.seed}-t{self.temperature:g}-p{self.top_p:g}"
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


def nucleus_sample(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """(B,) one token per row of (B, V) logits, drawn from the smallest set of most probable
    tokens whose probability reaches `top_p`, renormalized (top-p sampling, the set that
    transformers' TopPLogitsWarper keeps, ties at its edge kept together).

    Without sorting: a token is drawn from the whole distribution and kept when the tokens
    more probable than it hold less than `top_p` (it is in the set); a row whose token is not
    draws again. A kept draw is distributed as the set's renormalized probabilities, and a row
    draws 1 / (the set's mass) <= 1 / top_p times on average. transformers' `generate` sorts
    the vocabulary and draws an exponential variable per token, 60% of a sampling step for
    128 rows of SmolLM2's 49,152 tokens."""
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1]; got {top_p}")  # at 0 no draw would ever be kept
    probs = torch.softmax(logits.float(), dim=-1)  # (B, V)
    cdf = probs.cumsum(-1)  # (B, V)
    picked = torch.empty(probs.shape[0], dtype=torch.long, device=probs.device)
    rows = torch.arange(probs.shape[0], device=probs.device)
    while rows.numel():
        p, c = (probs, cdf) if rows.numel() == probs.shape[0] else (probs[rows], cdf[rows])
        u = (1 - torch.rand(len(rows), 1, device=p.device)) * c[:, -1:]  # (r, 1) in (0, mass]
        token = torch.searchsorted(c, u).clamp(max=p.shape[-1] - 1)  # (r, 1) the first token whose CDF reaches u
        inside = (p * (p > p.gather(-1, token))).sum(-1) < top_p if top_p < 1 else torch.ones_like(rows, dtype=bool)
        picked[rows[inside]] = token[inside, 0]
        rows = rows[~inside]
    return picked


@torch.no_grad()
def sample_windows(model, tokenizer, n: int, length: int, spec: CorpusSpec, batch_size: int = 128) -> torch.Tensor:
    """(n, length) token ids the model writes itself (nucleus sampling, `nucleus_sample`, in the
    model's own dtype: a bfloat16 copy of SmolLM2 samples 2.8x slower than float32 on these
    CPUs), each seeded with a short sentence opener; end-of-sequence is suppressed so every
    window is full. Decoded with the model's key/value cache, one token per row a step."""
    device = model_device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    eos = torch.tensor(sorted(eos_ids(model, tokenizer)), dtype=torch.long, device=device)
    out = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
            tqdm(total=n * length, desc="sampling corpus", unit="token") as bar:
        torch.manual_seed(spec.seed)
        for start in range(0, n, batch_size):
            rows = min(batch_size, n - start)
            seeds = [tokenizer(OPENERS[(start + i) % len(OPENERS)]).input_ids for i in range(rows)]
            width = max(len(s) for s in seeds)
            ids = torch.tensor([[pad] * (width - len(s)) + s for s in seeds], device=device)  # (b, w) left-padded
            mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seeds], device=device)
            position = (mask.cumsum(-1) - 1).clamp(min=0)  # (b, w) each row's tokens from 0
            cache, written = None, []
            for _ in range(length):
                step = model(input_ids=ids, attention_mask=mask, position_ids=position, past_key_values=cache,
                             use_cache=True, logits_to_keep=1)
                logits = step.logits[:, -1].float() / spec.temperature  # (b, V)
                logits[:, eos] = float("-inf")
                ids = nucleus_sample(logits, spec.top_p)[:, None]  # (b, 1)
                written.append(ids)
                cache, position = step.past_key_values, position[:, -1:] + 1
                mask = torch.cat([mask, torch.ones_like(ids)], dim=-1)
                bar.update(rows)
            out.append(torch.cat(written, dim=-1).cpu())  # (b, length)
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
        save_tensors(path, {"ids": ids})
    return ids
