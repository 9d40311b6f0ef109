"""Batched model queries the metrics need: teacher-forced top-1 predictions and greedy text.

Decoder-only models: a probe is the token sequence prompt + target[:-1], left-padded, so the
positions that predict the target's tokens are the LAST len(target) columns of every row and
only those logits are computed. Encoder-decoder models (T5): the prompt goes to the encoder and
[start] + target[:-1] to the decoder; the first len(target) decoder positions predict it.
Sequences are sorted by length before batching so padding stays small.

Routing (SERAC): a Scorer given a `router` (editors.serac.ScopeRouter) sends every prompt the
way the server does: the router says whether it is in the scope of an edit in memory and
gives the tokens the model reads (the prompt conditioned on the edit) and the tokens the answer
is forced to start with; an out-of-scope prompt is scored exactly as without a router.

Remembering (`memo`, a ScoreMemo): answers are kept by the weights they were computed under
(the edit keys of the patches that change what the model computes: a patch and its copy with
its measured `eval` added are one state) and the tokens the model read as routed, so the same
query on the same weights is answered once. A SERAC memory patch changes no weight: after it,
only the inputs it routes anew are computed again (an edit worker's stream of SERAC edits and
their dry runs). A teacher-forced query whose top-1 tokens are its target, every one, also
answers the greedy query of its prompt for as many tokens (greedy decoding picks the top-1
token after the ones before it): an edit's evaluation scores the probes' earlier greedy
continuations on the edited weights, and the next edit, computed on those weights, finds every
probe the edit left alone already decoded.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import torch

from editors import lm
from edit_serve.evaluation.data import DataError

Pair = tuple[list[int], list[int]]  # (prompt ids, target ids)

#: what `generate` would otherwise take from a model's own generation config (a setting left
#: unset is filled from it) to bend greedy decoding away from the top-1 token: each set to the
#: value that adds no logits processor (`min_new_tokens` 0 overrides any `min_length`; setting
#: both would log a warning at every call)
PURE_GREEDY = {"repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
               "encoder_no_repeat_ngram_size": 0, "min_new_tokens": 0, "guidance_scale": 1.0,
               "suppress_tokens": [], "begin_suppress_tokens": []}


def _pad(seqs: Sequence[list[int]], pad_id: int, device, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad to one width (on the left for decoder-only prompts); returns ids and attention mask."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)  # (B, T)
    for i, s in enumerate(seqs):
        cols = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, cols] = torch.tensor(s, dtype=torch.long)
        mask[i, cols] = 1
    return ids.to(device), mask.to(device)


def weight_state(stack) -> tuple[str, ...]:
    """The edit keys of the patches active on `stack` that change what the model computes, in
    order (all but SERAC's memory patches, which only route inputs): one weight state per value."""
    return tuple(a.patch.edit_key for a in stack.active if a.patch.kind != "memory")


class ScoreMemo:
    """Answers remembered for the last `keep` weight states (module doc). `weights()` names the
    state the model is in now (weight_state: the edit keys of the active patches that change its
    computation, in order); at most `entries` answers are kept per state."""

    def __init__(self, weights: Callable[[], tuple], keep: int = 4, entries: int = 200_000):
        self.weights, self.keep, self.entries = weights, keep, entries
        self._states: dict[tuple, dict] = {}

    def table(self) -> dict:
        """The answers remembered for the weights as they are now."""
        key = tuple(self.weights())
        found = self._states.pop(key, None)
        if found is None or len(found) > self.entries:
            found = {}
        self._states[key] = found  # the most recent last
        while len(self._states) > self.keep:
            self._states.pop(next(iter(self._states)))
        return found


class Scorer:
    """Runs probes through `model` in batches of `batch_size` sequences."""

    def __init__(self, model: torch.nn.Module, tokenizer, batch_size: int = 32, router=None,
                 memo: ScoreMemo | None = None):
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.encoder_decoder = lm.is_seq2seq(model)
        self._keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.router = router  # callable: prompt ids -> editors.serac.Routed each (see the module doc)
        self.memo = memo

    def _remembered(self, keys: Sequence, compute: Callable[[list[int]], list]) -> list:
        """Each key's answer: remembered, or from `compute(indices of the keys not remembered)`."""
        if self.memo is None:
            return compute(list(range(len(keys))))
        table = self.memo.table()
        first = {k: i for i, k in reversed(list(enumerate(keys)))}
        missing = [i for k, i in first.items() if k not in table]
        if missing:
            table.update(zip((keys[i] for i in missing), compute(missing)))
        return [table[k] for k in keys]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # --- tokens (the editors' own tokenization, so the scored tokens are the optimized ones) ---
    def prompt_ids(self, prompt: str) -> list[int]:
        ids = lm.prompt_ids(self.tokenizer, prompt)
        if not ids:
            raise DataError(f"the prompt {prompt!r} has no tokens")
        return ids

    def pair(self, prompt: str, target: str) -> Pair:
        """(prompt ids, target ids): the target's tokens as they follow the prompt."""
        try:
            return self.prompt_ids(prompt), lm.target_ids(self.tokenizer, prompt, target, self.encoder_decoder)
        except ValueError as e:
            raise DataError(str(e)) from None

    # --- teacher-forced top-1 ----------------------------------------------------------
    def _batches(self, lengths: Sequence[int]) -> list[list[int]]:
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])
        return [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    @torch.no_grad()
    def top1(self, pairs: Sequence[Pair]) -> list[torch.Tensor]:
        """For each (prompt, target), the model's top-1 token at each target position, given
        the true target tokens before it (teacher forcing). Returns CPU tensors [len(target)]."""
        routed = self.router([p for p, _ in pairs]) if self.router is not None else None
        forced = [r.forced for r in routed] if routed is not None else [[] for _ in pairs]
        if routed is not None:
            pairs = [(r.ids, t) for r, (_, t) in zip(routed, pairs)]
        keys = [("top1", tuple(p), tuple(t), tuple(f)) for (p, t), f in zip(pairs, forced)]
        out = self._remembered(keys, lambda idx: self._top1([pairs[i] for i in idx], [forced[i] for i in idx]))
        if self.memo is not None:
            self._greedy_known(pairs, forced, out)
        return [o.clone() for o in out]

    def _greedy_known(self, pairs: Sequence[Pair], forced: Sequence[list[int]], predictions) -> None:
        """Remember, as the answer to greedy's query, each routed pair without a forced start
        whose top-1 tokens are its target, all of them (the module doc)."""
        table, eos = self.memo.table(), self.tokenizer.eos_token_id
        for (p, t), f, predicted in zip(pairs, forced, predictions):
            if t and not f and eos not in t and predicted.tolist() == list(t):
                table.setdefault(("greedy", tuple(p), 0, len(t)), list(t))

    def _top1(self, pairs: Sequence[Pair], forced: Sequence[list[int]]) -> list[torch.Tensor]:
        """top1 of routed pairs; `forced`: the tokens each answer is forced to start with."""
        out: list[torch.Tensor | None] = [None] * len(pairs)
        for chunk in self._batches([len(p) + len(t) for p, t in pairs]):
            batch = [pairs[i] for i in chunk]
            predict = self._top1_encoder_decoder if self.encoder_decoder else self._top1_decoder
            for i, pred in zip(chunk, predict(batch)):
                out[i] = pred
        for i, f in enumerate(forced):  # an answer forced to start with the edit's target
            k = min(len(f), len(out[i]))
            out[i][:k] = torch.tensor(f[:k])
        return out  # type: ignore[return-value]

    def _top1_decoder(self, batch: list[Pair]) -> list[torch.Tensor]:
        ids, mask = _pad([p + t[:-1] for p, t in batch], self.pad_id, self.device, left=True)  # (B, T)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
        keep = max(len(t) for _, t in batch)
        extra = {"logits_to_keep": keep} if self._keep else {}
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False, **extra).logits
        top = logits[:, -keep:].argmax(-1).cpu()  # (B, keep)
        return [top[i, keep - len(t):] for i, (_, t) in enumerate(batch)]

    def _top1_encoder_decoder(self, batch: list[Pair]) -> list[torch.Tensor]:
        start = self.model.config.decoder_start_token_id
        ids, mask = _pad([p for p, _ in batch], self.pad_id, self.device, left=False)  # (B, S)
        dec, dec_mask = _pad([[start] + t[:-1] for _, t in batch], self.pad_id, self.device, left=False)  # (B, T)
        logits = self.model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec,
                            decoder_attention_mask=dec_mask, use_cache=False).logits  # (B, T, V)
        top = logits.argmax(-1).cpu()  # (B, T)
        return [top[i, :len(t)] for i, (_, t) in enumerate(batch)]

    # --- greedy generation ---------------------------------------------------------------
    @torch.no_grad()
    def greedy(self, prompts: Sequence[str], max_new_tokens: int) -> list[list[int]]:
        """Greedy continuations (token ids, cut at the end-of-sequence token)."""
        encoded = [self.prompt_ids(p) for p in prompts]
        forced = [[] for _ in encoded]
        if self.router is not None:
            routed = self.router(encoded)
            forced = [r.forced[:max_new_tokens] for r in routed]
            encoded = [r.ids + f for r, f in zip(routed, forced)]
        keys = [("greedy", tuple(e), len(f), max_new_tokens) for e, f in zip(encoded, forced)]
        out = self._remembered(keys, lambda idx: self._greedy([encoded[i] for i in idx], [forced[i] for i in idx],
                                                              max_new_tokens))
        return [list(o) for o in out]

    def _greedy(self, encoded: Sequence[list[int]], forced: Sequence[list[int]],
                max_new_tokens: int) -> list[list[int]]:
        """greedy of routed prompts (`encoded` ends with the `forced` start of its answer)."""
        from transformers import GenerationConfig

        config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                  pad_token_id=self.pad_id, eos_token_id=self.tokenizer.eos_token_id,
                                  decoder_start_token_id=getattr(self.model.config, "decoder_start_token_id", None),
                                  **PURE_GREEDY)
        out: list[list[int] | None] = [None] * len(encoded)
        for chunk in self._batches([len(e) for e in encoded]):
            seqs = [encoded[i] for i in chunk]
            ids, mask = _pad(seqs, self.pad_id, self.device, left=not self.encoder_decoder)  # (B, T)
            gen = self.model.generate(input_ids=ids, attention_mask=mask, generation_config=config).cpu()
            new = gen[:, 1:] if self.encoder_decoder else gen[:, ids.shape[1]:]  # (B, <= max_new_tokens)
            eos = self.tokenizer.eos_token_id
            for i, row in zip(chunk, new.tolist()):
                out[i] = row[:row.index(eos)] if eos in row else row
        for i, f in enumerate(forced):  # the forced start, then the model's continuation
            if f:
                out[i] = (f + out[i])[:max_new_tokens]
        return out  # type: ignore[return-value]

    def generate_text(self, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
        return [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in self.greedy(prompts, max_new_tokens)]
