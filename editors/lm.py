"""Turning edit requests into model inputs, shared by every method.

Decoder-only models read `prompt + target[:-1]` and are scored on the target's positions;
encoder-decoder models (T5) read the prompt in the encoder and the target in the decoder.
Target tokens are the tokens that `prompt + " " + target` adds to `prompt`, so a tokenizer's
leading-space convention is respected. Batches are right-padded, so a token's position does
not depend on the other rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from editors.nethook import Trace

#: label value of positions that are not scored
IGNORE = -100


def is_seq2seq(model: nn.Module) -> bool:
    return bool(getattr(model.config, "is_encoder_decoder", False))


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


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


def _pad(rows: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([list(r) + [value] * (width - len(r)) for r in rows], dtype=torch.long)


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


def output_head(model: nn.Module) -> str | None:
    """The name of the module that turns hidden states into logits, if the model has one."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return next((n for n, m in model.named_modules() if m is head), None) if head is not None else None


def logits_at(model: nn.Module, inputs: dict, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """(N, V) logits at positions (rows[i], cols[i]) only: the output head runs on just those
    hidden states, which saves most of its cost (and its backward) on a large vocabulary."""
    head = output_head(model)
    if head is None:
        return model(**inputs, use_cache=False).logits[rows, cols]
    with Trace(model, head, edit_input=lambda h, _: h[rows, cols], retain_output=False):
        return model(**inputs, use_cache=False).logits  # (N, V)


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
