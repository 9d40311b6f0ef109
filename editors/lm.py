"""Turning edit requests into model inputs, shared by every method.

Decoder-only models read `prompt + target[:-1]` and are scored on the target's positions;
encoder-decoder models (T5) read the prompt in the encoder and the target in the decoder.
Target tokens are the tokens that `prompt + " " + target` adds to `prompt`, so a tokenizer's
leading-space convention is respected. Batches are right-padded, so a token's position does
not depend on the other rows.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from editors.nethook import Trace

log = logging.getLogger(__name__)

#: label value of positions that are not scored
IGNORE = -100


def is_seq2seq(model: nn.Module) -> bool:
    return bool(getattr(model.config, "is_encoder_decoder", False))


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def eos_ids(model: nn.Module, tokenizer) -> set[int]:
    """The tokens that end a sequence: the model's generation config's and the tokenizer's."""
    ids: set[int] = set()
    for source in (getattr(getattr(model, "generation_config", None), "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(source)
    return ids


def prompt_ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text).input_ids)


def target_ids(tokenizer, prompt: str, target: str, seq2seq: bool = False) -> list[int]:
    """The token ids of `target` as they follow `prompt` (decoder-only), or as the decoder's
    labels without end-of-sequence (encoder-decoder)."""
    target = target.strip()
    if seq2seq:
        ids = list(tokenizer(target, add_special_tokens=False).input_ids)
    else:
        head = prompt_ids(tokenizer, prompt)
        full = prompt_ids(tokenizer, f"{prompt.rstrip()} {target}")
        ids = full[len(head):] if full[:len(head)] == head else list(
            tokenizer(" " + target, add_special_tokens=False).input_ids)
    if not ids:
        raise ValueError(f"the target {target!r} has no tokens")
    return ids


def subject_last_index(tokenizer, text: str, start: int, end: int) -> int:
    """Index of the last token of `text` that overlaps characters [start, end)."""
    enc = tokenizer(text, return_offsets_mapping=True) if getattr(tokenizer, "is_fast", False) else None
    if enc is not None and "offset_mapping" in enc:
        hits = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > a and a < end and b > start]
        if hits:
            return hits[-1]
    return len(prompt_ids(tokenizer, text[:end])) - 1  # tokens up to the subject's end


def fill(template: str, subject: str) -> tuple[str, int, int]:
    """`template` with the subject in place of `{}`, and the subject's character span."""
    at = template.index("{}")
    text = template[:at] + subject + template[at + 2:]
    return text, at, at + len(subject)


@dataclass
class TargetBatch:
    """Prompts followed by targets, ready for a forward pass.

    inputs: the keyword arguments of the model call (right-padded).
    labels: (B, T) target token ids at the positions whose logits predict them, IGNORE elsewhere.
    lookup: (B,) the last subject token of each row (-1 where no subject was given).
    """

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor
    lookup: torch.Tensor

    @property
    def mask(self) -> torch.Tensor:
        return self.labels != IGNORE

    def select(self, rows: torch.Tensor) -> "TargetBatch":
        """The batch of the given rows only."""
        return TargetBatch({k: v[rows] for k, v in self.inputs.items()}, self.labels[rows], self.lookup[rows])

    def model_inputs(self) -> dict:
        """The keyword arguments of one model call on this batch."""
        return self.inputs


@dataclass
class SuffixBatch(TargetBatch):
    """A decoder-only TargetBatch cut at each row's lookup token: the tokens before it ran
    once and are replayed from their cached keys and values (`past`, per layer, left-padded to
    one prefix length, zero at the padding); `inputs` holds the rest of each row (right-padded,
    explicit positions) and `lookup` is 0. Made by `from_lookup`; what a call computes at and
    after the lookup token equals the full rows' to rounding, at the cost of the suffixes only."""

    past: tuple[tuple[torch.Tensor, torch.Tensor], ...] = ()

    def select(self, rows: torch.Tensor) -> "SuffixBatch":
        return SuffixBatch({k: v[rows] for k, v in self.inputs.items()}, self.labels[rows], self.lookup[rows],
                           tuple((k[rows], v[rows]) for k, v in self.past))

    def model_inputs(self) -> dict:
        from transformers import DynamicCache  # a fresh cache per call: a call appends to it

        return {**self.inputs, "past_key_values": DynamicCache(ddp_cache_data=self.past), "use_cache": True}


#: per model object: whether its SuffixBatch calls were found equal to full calls
_SUFFIX_OK: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def from_lookup(model: nn.Module, batch: TargetBatch) -> TargetBatch:
    """`batch` as a SuffixBatch where only what follows each row's lookup token will change
    between calls (an edit at the lookup token, as in v*): the same logits at every scored
    position, for a fraction of the work when the prompts' heads are long. The first time per
    model object the cut batch is compared with a full call and the model is remembered as
    unsuitable where they differ (a model that ignores or rejects a key-value cache or
    explicit positions); `batch` itself comes back then, for encoder-decoder models, and where
    a row has no lookup token or a scored position before it."""
    if is_seq2seq(model) or _SUFFIX_OK.get(model) is False or bool((batch.lookup < 0).any()):
        return batch
    rows, cols = scored_positions(batch)
    if bool((cols < batch.lookup[rows]).any()):
        return batch
    try:
        cut = _cut(model, batch)
    except (TypeError, ValueError, RuntimeError, AttributeError):
        log.debug("no key-value replay on %s", type(model).__name__, exc_info=True)
        _SUFFIX_OK[model] = False
        return batch
    if model not in _SUFFIX_OK:
        with torch.no_grad():
            full = model(**batch.inputs, use_cache=False).logits[rows, cols].float()
            try:
                at = scored_positions(cut)
                short = model(**cut.model_inputs()).logits[at].float()
            except (TypeError, ValueError, RuntimeError, AttributeError):
                short = None
        scale = full.abs().max().clamp(min=1.0)
        _SUFFIX_OK[model] = short is not None and short.shape == full.shape and bool(
            (short - full).abs().max() <= 1e-3 * scale)
        if not _SUFFIX_OK[model]:
            log.info("%s: replaying cached prompt heads changes the logits; full rows are used", type(model).__name__)
            return batch
    return cut


@torch.no_grad()
def _cut(model: nn.Module, batch: TargetBatch) -> SuffixBatch:
    ids, mask = batch.inputs["input_ids"], batch.inputs["attention_mask"]
    device = ids.device
    n, lookup, lengths = ids.shape[0], batch.lookup, mask.sum(1)
    head_len, tail_len = int(lookup.max()), int((lengths - lookup).max())
    tail = torch.zeros(n, tail_len, dtype=ids.dtype, device=device)  # right-padded
    tail_mask = torch.zeros_like(tail)
    head_mask = torch.zeros(n, head_len, dtype=mask.dtype, device=device)  # left-padded
    labels = torch.full((n, tail_len), IGNORE, dtype=batch.labels.dtype, device=device)
    for i in range(n):
        cut, end = int(lookup[i]), int(lengths[i])
        head_mask[i, head_len - cut:] = 1
        tail[i, :end - cut], tail_mask[i, :end - cut] = ids[i, cut:end], 1
        labels[i, :end - cut] = batch.labels[i, cut:end]
    past = _heads(model, ids, lookup, head_len) if head_len else ()
    inputs = {"input_ids": tail, "attention_mask": torch.cat([head_mask, tail_mask], 1),
              "position_ids": lookup[:, None] + torch.arange(tail_len, device=device)}
    return SuffixBatch(inputs, labels, torch.zeros_like(lookup), past)


def _heads(model: nn.Module, ids: torch.Tensor, lookup: torch.Tensor, head_len: int, rows_per_call: int = 24
           ) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """Per layer, the keys and values of each row's tokens before its lookup token, left-padded
    to `head_len` and zero at the padding. Rows of similar head length run together (up to 4
    calls of at least `rows_per_call` rows, so little padding is computed; fewer rows run in
    one call), through the model without its output head (the heads' logits are never read)."""
    body = getattr(model, "base_model", model)
    order = torch.argsort(lookup.cpu(), stable=True)
    past: list[list[torch.Tensor]] | None = None
    for rows in torch.tensor_split(order, max(1, min(4, len(order) // rows_per_call))):
        rows = rows.to(ids.device)
        width = int(lookup[rows].max())
        if width == 0:
            continue
        part = torch.zeros(len(rows), width, dtype=ids.dtype, device=ids.device)
        part_mask = torch.zeros_like(part)
        for j, i in enumerate(rows.tolist()):
            cut = int(lookup[i])
            part[j, width - cut:], part_mask[j, width - cut:] = ids[i, :cut], 1
        out = body(input_ids=part, attention_mask=part_mask,
                   position_ids=(part_mask.cumsum(1) - 1).clamp(min=0), use_cache=True)
        keep = part_mask[:, None, :, None].bool()  # (b, 1, width, 1): the padding's keys and values set to 0
        layers = [(torch.where(keep, k, 0), torch.where(keep, v, 0)) for k, v, *_ in out.past_key_values]
        if past is None:
            past = [[k.new_zeros(len(ids), k.shape[1], head_len, k.shape[3]),
                     v.new_zeros(len(ids), v.shape[1], head_len, v.shape[3])] for k, v in layers]
        for (k_all, v_all), (k, v) in zip(past, layers):
            k_all[rows, :, head_len - width:] = k
            v_all[rows, :, head_len - width:] = v
    return tuple((k, v) for k, v in past)


def _pad(rows: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([list(r) + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def mlp_positions(batch: TargetBatch) -> torch.Tensor:
    """(B, T) mask of the positions the profiles' MLPs see: the decoder's on an encoder-decoder
    model, the whole sequence otherwise."""
    return batch.inputs.get("decoder_attention_mask", batch.inputs["attention_mask"]).bool()


def target_batch(model: nn.Module, tokenizer, rows: Sequence[tuple[str, str | None]],
                 subjects: Sequence[tuple[int, int] | None] | None = None) -> TargetBatch:
    """A batch of (prompt, target) pairs; `subjects` gives each prompt's subject character span
    (for `lookup`). A row whose target is None is the prompt alone, unscored (decoder-only)."""
    seq2seq = is_seq2seq(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = model_device(model)
    prompts = [prompt_ids(tokenizer, p) for p, _ in rows]
    targets = [target_ids(tokenizer, p, t, seq2seq) if t is not None else [] for p, t in rows]
    lookup = [
        subject_last_index(tokenizer, p, *span) if span is not None else -1
        for (p, _), span in zip(rows, subjects or [None] * len(rows))
    ]
    if seq2seq:
        start = model.config.decoder_start_token_id
        start = pad if start is None else start
        inputs = {
            "input_ids": _pad(prompts, pad),
            "attention_mask": _pad([[1] * len(p) for p in prompts], 0),
            "decoder_input_ids": _pad([[start] + t[:-1] for t in targets], pad),
            "decoder_attention_mask": _pad([[1] * len(t) for t in targets], 0),
        }
        labels = _pad(targets, IGNORE)
    else:
        seqs = [p + t[:-1] for p, t in zip(prompts, targets)]  # a prompt alone when t == []
        inputs = {"input_ids": _pad(seqs, pad), "attention_mask": _pad([[1] * len(s) for s in seqs], 0)}
        labels = torch.full(inputs["input_ids"].shape, IGNORE, dtype=torch.long)
        for i, (p, t) in enumerate(zip(prompts, targets)):
            labels[i, len(p) - 1:len(p) - 1 + len(t)] = torch.tensor(t)
    return TargetBatch({k: v.to(device) for k, v in inputs.items()}, labels.to(device),
                       torch.tensor(lookup, device=device))


_HEAD_NAMES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its output head's name


def output_head(model: nn.Module) -> str | None:
    """The name of the module that turns hidden states into logits, if the model has one
    (looked up once per model and head: v* asks at every step)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        return None
    name = _HEAD_NAMES.get(model)
    if name is None or model.get_submodule(name) is not head:
        name = _HEAD_NAMES[model] = next((n for n, m in model.named_modules() if m is head), None)
    return name


def logits_at(model: nn.Module, inputs: dict, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """(N, V) logits at positions (rows[i], cols[i]) only: the output head runs on just those
    hidden states, which saves most of its cost (and its backward) on a large vocabulary."""
    head, call = output_head(model), {"use_cache": False, **inputs}
    if head is None:
        return model(**call).logits[rows, cols]
    with Trace(model, head, edit_input=lambda h, _: h[rows, cols], retain_output=False):
        return model(**call).logits  # (N, V)


def scored_positions(batch: TargetBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) of the scored positions, row-major."""
    at = batch.mask.nonzero()
    return at[:, 0], at[:, 1]


def target_nll(scored: torch.Tensor, batch: TargetBatch) -> torch.Tensor:
    """(B,) mean negative log-likelihood of each row's target tokens, from the (N, V) logits
    at `scored_positions(batch)`."""
    rows, cols = scored_positions(batch)
    logp = torch.log_softmax(scored.float(), dim=-1)  # (N, V)
    picked = logp.gather(-1, batch.labels[rows, cols].unsqueeze(-1)).squeeze(-1)  # (N,)
    total = torch.zeros(batch.mask.shape[0], device=scored.device).index_add(0, rows, picked)
    return -total / batch.mask.sum(1).clamp(min=1)
