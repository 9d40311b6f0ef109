"""The `memory` patch kind: rows of SERAC's explicit edit memory (Mitchell et al. 2022).

A memory patch changes no weight. It holds, per edit, one row for each of its wordings (the
prompt, then each rephrasing): the embedding of the edit's descriptor in that wording as a
tensor, and the texts in metadata. Every active memory patch adds its
rows to ONE memory (`EditMemory`), and reverting it removes exactly those rows. Whoever routes
requests (the scoped engine, the evaluation scorer) asks the memory for the row an input is in
the scope of; with no row in scope the request goes to the base model untouched.

File layout (format 1):
  tensors   memory.keys [n, dim]   unit-norm descriptor embeddings (float32/16, bfloat16)
            memory.relation_keys [n, dim]   unit-norm embeddings of each row's relation: the
                                   sentence of its prompt that holds the subject, the
                                   subject replaced by "X" (`relation_text`)
  metadata  edit_serve.memory      JSON object:
    encoder, encoder_fingerprint   the sentence encoder that made the keys (a server refuses
                                   rows of another encoder)
    dim                            the encoder's width
    fingerprint_params             the served model's parameters the base fingerprint covers
                                   (the counterfactual answerer is the served model itself)
    scope  {cosine, subject, relation, bias}   the scope head: logit = cosine * cos(input, key)
                                   + subject * s + relation * s * cos(relation_text(input),
                                   relation key) + bias, s = [the row's subject occurs in the
                                   input]; in scope when the best row's logit >= 0
    answer {template, mode}        how an in-scope input is answered: the template, with
                                   {descriptor} filled in, is put in front of the prompt; mode
                                   "condition": the served model answers from there; "target":
                                   the answer starts with the row's target and the served model
                                   continues it
    rows   [{prompt, subject, target, descriptor}]   the texts, one object per key; a row may
                                   also hold its own `scope` and `answer` (as above), which
                                   replace the patch's for that row: how memory patches made
                                   with different settings are merged into one
                                   (patches.compact.merge_memory)
"""

from __future__ import annotations

import itertools
import math
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from patches.errors import PatchError
from patches.kinds import register_patch_kind

if TYPE_CHECKING:
    from patches.format import Patch
    from patches.stack import ActivePatch, PatchStack

KEYS = "memory.keys"
RELATION_KEYS = "memory.relation_keys"
SCOPE_WEIGHTS = ("cosine", "subject", "relation", "bias")
ROW_FIELDS = ("prompt", "subject", "target", "descriptor")
ROW_SETTINGS = ("scope", "answer")  # a row's own, in place of the patch's (a merged patch)
#: rows one edit may make (its requests and their rephrasings: one row each)
MAX_EDIT_ROWS = 10_000
#: rows one memory patch file may hold: as many as a server's memory holds by default
#: (edit_serve.engines.scoped), so compaction (patches.compact.merge_memory) can merge them all
MAX_ROWS = 100_000
#: characters of one text field of a row, and of the answer template
MAX_TEXT = 2_000
MAX_DIM = 4_096
MAX_WEIGHT = 1e4
NORM_TOLERANCE = 0.02  # bfloat16 keys stay within this of unit norm
ANSWER_MODES = ("condition", "target")
WORD = re.compile(r"\w+")
SENTENCE_END = re.compile(r"[.!?]\s+|\n")
RELATION_WORDS_BEFORE = 5  # words of the sentence before the subject that a relation keeps


def words(text: str) -> tuple[str, ...]:
    """Case-folded word tokens: how subjects are matched in inputs (punctuation-blind)."""
    return tuple(WORD.findall(text.casefold()))


def relation_text(text: str, subject: str) -> str | None:
    """What `text` asks about `subject`: from at most RELATION_WORDS_BEFORE words before the
    subject's last occurrence (within its sentence or line) to the end, the subject replaced
    by "X"; so a preamble does not count. None when the subject does not occur."""
    at = text.casefold().rfind(subject.casefold())
    if at < 0 or not subject:
        return None
    ends = [m.end() for m in SENTENCE_END.finditer(text, 0, at)]
    head = text[ends[-1] if ends else 0:at].split()[-RELATION_WORDS_BEFORE:]
    return " ".join([*head, "X"]) + text[at + len(subject):]


@dataclass(frozen=True)
class MemoryRow:
    patch_id: str
    prompt: str
    subject: str
    target: str
    descriptor: str
    template: str
    mode: str

    @property
    def context(self) -> str:
        """The text an in-scope input is conditioned on."""
        return self.template.replace("{descriptor}", self.descriptor)


@dataclass(frozen=True)
class MemorySpec:
    """A memory patch's metadata, parsed."""

    encoder: str
    encoder_fingerprint: str
    dim: int
    fingerprint_params: tuple[str, ...]
    scope: Mapping[str, float]
    template: str
    mode: str
    rows: tuple[Mapping[str, str], ...]

    @classmethod
    def of(cls, patch: Patch) -> "MemorySpec":
        m = patch.memory
        return cls(m["encoder"], m["encoder_fingerprint"], int(m["dim"]), tuple(m["fingerprint_params"]),
                   dict(m["scope"]), m["answer"]["template"], m["answer"]["mode"], tuple(m["rows"]))

    def row_scope(self, row: Mapping) -> Mapping[str, float]:
        """The scope head of `row`: its own, else the patch's."""
        return row.get("scope", self.scope)

    def row_answer(self, row: Mapping) -> tuple[str, str]:
        """(template, mode) of `row`: its own, else the patch's."""
        own = row.get("answer")
        return (own["template"], own["mode"]) if own else (self.template, self.mode)

    @property
    def modes(self) -> set[str]:
        """The answer modes of the rows."""
        return {self.row_answer(row)[1] for row in self.rows}


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise PatchError(message)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_text(value, what: str) -> None:
    _require(isinstance(value, str) and value.strip() != "", f"memory {what} is missing or empty (every row needs "
             f"{', '.join(ROW_FIELDS)} as non-empty strings)")
    _require(len(value) <= MAX_TEXT, f"memory {what} has {len(value)} characters, over the limit of {MAX_TEXT}")


def _check_scope(scope, what: str) -> None:
    _require(isinstance(scope, dict) and set(scope) == set(SCOPE_WEIGHTS)
             and all(_is_number(v) and abs(v) <= MAX_WEIGHT for v in scope.values()),
             f"{what} must be {{{', '.join(SCOPE_WEIGHTS)}}}, finite numbers of magnitude at most {MAX_WEIGHT:g}")


def _check_answer(answer, what: str) -> None:
    _require(isinstance(answer, dict) and isinstance(answer.get("template"), str)
             and "{descriptor}" in answer["template"] and len(answer["template"]) <= MAX_TEXT,
             f"{what}.template must be a string containing {{descriptor}}")
    _require(answer.get("mode") in ANSWER_MODES and set(answer) == {"template", "mode"},
             f"{what}.mode must be one of {', '.join(ANSWER_MODES)}")


def validate_memory(patch: Patch) -> None:
    """Everything about a memory patch that needs no model (see the module docstring)."""
    m = patch.memory
    _require(isinstance(m, dict) and m, "a 'memory' patch needs metadata edit_serve.memory (encoder, dim, scope, "
             "answer, rows)")
    missing = [k for k in ("encoder", "encoder_fingerprint", "dim", "fingerprint_params", "scope", "answer", "rows")
               if k not in m]
    _require(not missing, f"metadata memory lacks {', '.join(missing)}")
    _require(isinstance(m["encoder"], str) and m["encoder"] and isinstance(m["encoder_fingerprint"], str),
             "memory encoder and encoder_fingerprint must be strings")
    dim = m["dim"]
    _require(isinstance(dim, int) and not isinstance(dim, bool) and 1 <= dim <= MAX_DIM,
             f"memory dim must be an integer in [1, {MAX_DIM}]")
    params = m["fingerprint_params"]
    _require(isinstance(params, list) and 1 <= len(params) <= 8 and all(isinstance(p, str) and p for p in params),
             "memory fingerprint_params must name 1 to 8 parameters of the served model")
    _check_scope(m["scope"], "memory scope")
    _check_answer(m["answer"], "memory answer")
    rows = m["rows"]
    _require(isinstance(rows, list) and rows, "memory rows must be a non-empty list")
    _require(len(rows) <= MAX_ROWS, f"memory patch holds {len(rows)} rows, over the limit of {MAX_ROWS} per patch "
             "(split the edits over several patches)")
    for i, row in enumerate(rows):
        _require(isinstance(row, dict), f"memory row {i} must be a JSON object")
        for f in ROW_FIELDS:
            _check_text(row.get(f), f"row {i} {f}")
        _require(set(row) <= {*ROW_FIELDS, *ROW_SETTINGS},
                 f"memory row {i} has unknown fields {sorted(set(row) - {*ROW_FIELDS, *ROW_SETTINGS})[:3]}")
        if "scope" in row:
            _check_scope(row["scope"], f"memory row {i} scope")
        if "answer" in row:
            _check_answer(row["answer"], f"memory row {i} answer")
    names = set(patch.tensors)
    _require(names == {KEYS, RELATION_KEYS},
             f"a 'memory' patch holds exactly the tensors {KEYS} and {RELATION_KEYS}; it has {sorted(names)[:4]}")
    for name in (KEYS, RELATION_KEYS):
        keys = patch.tensors[name]
        _require(keys.dtype in (torch.float32, torch.float16, torch.bfloat16),
                 f"tensor {name!r} has dtype {str(keys.dtype).removeprefix('torch.')}; expected float32, float16 "
                 "or bfloat16")
        _require(keys.dim() == 2 and keys.shape[1] == dim,
                 f"wrong shape for {name}: {list(keys.shape)}, expected [rows, {dim}] (the encoder's width)")
        _require(keys.shape[0] == len(rows), f"{name} has {keys.shape[0]} rows but the metadata {len(rows)} texts")
        _require(bool(torch.isfinite(keys).all()), f"tensor {name!r} holds NaN or Inf values")
        norms = keys.float().norm(dim=-1)
        _require(bool(((norms - 1).abs() <= NORM_TOLERANCE).all()),
                 f"{name} must hold unit-norm embeddings (norms {float(norms.min()):.3g} to {float(norms.max()):.3g})")


def without_requests(patch: Patch, drop: Sequence[int]) -> Patch:
    """The memory patch `patch` without the edits `drop` (indices into its requests, from 0)
    and their rows, each request having made one row per wording in order (editors.serac),
    stamped as `patch` was (the same served parameters); its config's `dropped` list records
    every drop that made it, oldest first. Raises PatchError for another kind, a
    patch whose rows cannot be matched to its requests, an index out of range, or all of them
    (revert the patch instead)."""
    _require(patch.kind == "memory", f"patch {patch.id} is a {patch.kind} patch; only a memory patch drops single "
             "edits (revert the patch instead)")
    requests = patch.requests
    sizes = [1 + len(r.get("rephrasings") or []) if isinstance(r, dict) else -1 for r in requests]
    _require(sum(sizes) == len(patch.memory["rows"]) and min(sizes, default=0) >= 1,
             f"patch {patch.id}'s {len(patch.memory['rows'])} rows cannot be matched to its {len(requests)} requests")
    drop = set(drop)
    _require(all(isinstance(i, int) and 0 <= i < len(requests) for i in drop),
             f"patch {patch.id} has requests 0 to {len(requests) - 1}; got {sorted(drop)[:10]}")
    _require(len(drop) < len(requests), f"that is every edit of patch {patch.id}: revert it instead")
    starts = [0, *itertools.accumulate(sizes)]
    keep = [row for i in range(len(requests)) if i not in drop for row in range(starts[i], starts[i + 1])]
    index = torch.tensor(keep)
    return patch.replace(
        tensors={name: t.index_select(0, index) for name, t in patch.tensors.items()},
        memory={**patch.memory, "rows": [patch.memory["rows"][row] for row in keep]},
        requests=[r for i, r in enumerate(requests) if i not in drop],
        config={**patch.config, "dropped": [*_dropped(patch.config),
                                            {"from": patch.id, "requests": [requests[i] for i in sorted(drop)]}]})


def _dropped(config: dict) -> list[dict]:
    """The earlier drops a patch's config records, oldest first (one dict before there could be
    several)."""
    earlier = config.get("dropped") or []
    return [earlier] if isinstance(earlier, dict) else list(earlier)


class MemoryKind:
    """The `memory` kind's strategy (patches.kinds): no weights change; attach adds the rows
    to the stack's shared `EditMemory` (`stack.memory`), detach removes exactly them."""

    name = "memory"
    tensor_prefix = "memory."
    changes_forward = False  # its rows route requests; the model computes what it did

    def validate(self, patch: Patch) -> None:
        _require(not patch.side_modules, "a 'memory' patch must not declare side modules")
        validate_memory(patch)

    def check(self, stack: PatchStack, patch: Patch) -> None:
        for name in patch.memory["fingerprint_params"]:
            stack.parameter(name)  # a parameter this model has (else a one-line PatchError)

    def fingerprint_names(self, stack: PatchStack, patch: Patch) -> list[str]:
        return sorted(set(patch.memory["fingerprint_params"]))

    def targets(self, patch: Patch) -> list[str]:
        return []  # no parameter or module changes

    def deltas(self, stack: PatchStack, patch: Patch) -> dict:
        return {}

    def attach(self, stack: PatchStack, entry: ActivePatch) -> None:
        memory_of(stack).add(entry.patch)

    def detach(self, stack: PatchStack, entry: ActivePatch) -> None:
        memory_of(stack).remove(entry.patch.id)

    def describe(self, patch: Patch) -> dict:
        m = patch.memory
        return {"memory": {"encoder": m["encoder"], "dim": m["dim"], "rows": len(m["rows"]), "scope": m["scope"],
                           "answer": m["answer"], "fingerprint_params": m["fingerprint_params"],
                           "descriptors": [r["descriptor"] for r in m["rows"][:20]]}}


MEMORY_KIND = register_patch_kind(MemoryKind())


def memory_of(stack: PatchStack) -> "EditMemory":
    """The edit memory shared by the memory patches active on `stack` (made on first use)."""
    memory = getattr(stack, "memory", None)
    if memory is None:
        memory = stack.memory = EditMemory()
    return memory


@dataclass(frozen=True)
class Match:
    row: MemoryRow
    index: int
    logit: float
    cosine: float
    subject: bool


@dataclass(frozen=True)
class _Part:
    """One patch's rows, with what a snapshot needs of them computed once."""

    patch_id: str
    keys: torch.Tensor  # (n, d) float32
    relation_keys: torch.Tensor  # (n, d) float32
    rows: list[MemoryRow]
    weights: torch.Tensor  # (n, 4) float32: each row's scope weights, in SCOPE_WEIGHTS order
    subjects: tuple[tuple[str, ...], ...]  # each row's subject as words

    @classmethod
    def of(cls, patch: Patch) -> "_Part":
        spec = MemorySpec.of(patch)
        rows = [MemoryRow(patch.id, r["prompt"], r["subject"], r["target"], r["descriptor"], *spec.row_answer(r))
                for r in spec.rows]
        weights = torch.tensor([[spec.row_scope(r)[k] for k in SCOPE_WEIGHTS] for r in spec.rows],
                               dtype=torch.float32).reshape(len(rows), len(SCOPE_WEIGHTS))
        return cls(patch.id, patch.tensors[KEYS].detach().float().cpu(),
                   patch.tensors[RELATION_KEYS].detach().float().cpu(), rows, weights,
                   tuple(words(r.subject) for r in rows))


class _Snapshot:
    """The rows of every patch, concatenated in apply order (read without a lock; never
    changed once made: `plus` and `of` make new ones)."""

    def __init__(self, rows: list[MemoryRow], keys: torch.Tensor, relation_keys: torch.Tensor,
                 weights: torch.Tensor, by_subject: dict[tuple[str, ...], tuple[int, ...]], longest: int):
        self.rows = rows
        self.keys, self.relation_keys = keys, relation_keys  # (N, d) each
        self.weights = weights  # (N, 4)
        self.w_cos, self.w_subject, self.w_relation, self.bias = weights.unbind(-1)
        self.by_subject = by_subject  # subject words -> the rows with that subject
        self.longest = longest  # words in the longest subject

    @classmethod
    def of(cls, parts: Sequence[_Part]) -> "_Snapshot":
        dim = parts[0].keys.shape[1] if parts else 1
        by_subject: dict[tuple[str, ...], list[int]] = {}
        for i, subject in enumerate(s for p in parts for s in p.subjects):
            by_subject.setdefault(subject, []).append(i)
        return cls([r for p in parts for r in p.rows],
                   torch.cat([p.keys for p in parts]) if parts else torch.zeros(0, dim),
                   torch.cat([p.relation_keys for p in parts]) if parts else torch.zeros(0, dim),
                   torch.cat([p.weights for p in parts]) if parts else torch.zeros(0, len(SCOPE_WEIGHTS)),
                   {s: tuple(rows) for s, rows in by_subject.items()}, max(map(len, by_subject), default=0))

    def plus(self, part: _Part) -> "_Snapshot":
        """This snapshot with `part`'s rows after its own: the same as `of` all the parts,
        at the cost of copying, not recomputing, what this one holds."""
        if not self.rows:
            return _Snapshot.of([part])
        by_subject = dict(self.by_subject)
        for j, subject in enumerate(part.subjects, start=len(self.rows)):
            by_subject[subject] = by_subject.get(subject, ()) + (j,)
        return _Snapshot(self.rows + part.rows, torch.cat([self.keys, part.keys]),
                         torch.cat([self.relation_keys, part.relation_keys]),
                         torch.cat([self.weights, part.weights]), by_subject,
                         max(self.longest, max(map(len, part.subjects), default=0)))


class EditMemory:
    """One memory shared by every active memory patch. `add` appends a patch's rows, `remove`
    takes out exactly that patch's rows; `match` finds the row an input is in the scope of.
    Thread-safe: changes swap in a new snapshot, readers use the one they got."""

    def __init__(self):
        self._parts: dict[str, _Part] = {}  # patch id -> its rows, in apply order
        self._snapshot = _Snapshot.of([])
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._snapshot.rows)

    @property
    def patch_ids(self) -> list[str]:
        return list(self._parts)

    @property
    def rows(self) -> list[MemoryRow]:
        return list(self._snapshot.rows)

    def add(self, patch: Patch) -> None:
        """Append the patch's rows: work in proportion to its rows, not to the whole memory's
        (beyond copying the keys into the new snapshot)."""
        part = _Part.of(patch)
        with self._lock:
            if patch.id in self._parts:
                raise PatchError(f"memory patch {patch.id} is already in the memory")
            width = self._snapshot.keys.shape[1] if self._parts else None  # every part has this width
            if width is not None and part.keys.shape[1] != width:
                raise PatchError(f"memory rows of width {part.keys.shape[1]} cannot join rows of width {width} "
                                 "(another encoder)")
            self._snapshot, self._parts = self._snapshot.plus(part), {**self._parts, patch.id: part}

    def remove(self, patch_id: str) -> None:
        with self._lock:
            parts = {i: p for i, p in self._parts.items() if i != patch_id}
            self._snapshot, self._parts = _Snapshot.of(list(parts.values())), parts

    def match(self, embedding: torch.Tensor, text: str, encode: Callable[[list[str]], torch.Tensor]) -> Match | None:
        """The best row for an input (its unit-norm embedding (d,) and its text) by the
        rows' scope heads, or None when no row is in scope (logit < 0) or the memory is empty.
        `encode` embeds the input's relation text for each subject it mentions (none, for
        most inputs)."""
        snap = self._snapshot
        if not snap.rows:
            return None
        cos = snap.keys @ embedding.float()  # (N,)
        subject = torch.zeros_like(cos)
        relation = torch.zeros_like(cos)
        tokens = words(text)
        hits: dict[str, list[int]] = {}  # subject as the row writes it -> its rows
        for n in range(1, min(snap.longest, len(tokens)) + 1):
            for start in range(len(tokens) - n + 1):
                for i in snap.by_subject.get(tokens[start:start + n], ()):
                    hits.setdefault(snap.rows[i].subject, []).append(i)
        asked = {s: r for s in hits if (r := relation_text(text, s)) is not None}
        if asked:
            embedded = dict(zip(asked, encode(list(asked.values()))))  # subject -> (d,)
            for s, rows in hits.items():
                if s in embedded:
                    idx = torch.tensor(rows)
                    subject[idx] = 1.0
                    relation[idx] = snap.relation_keys[idx] @ embedded[s].float()
        logits = (snap.w_cos * cos + snap.w_subject * subject + snap.w_relation * subject * relation
                  + snap.bias)  # (N,)
        best = int(logits.argmax())
        if float(logits[best]) < 0:
            return None
        return Match(snap.rows[best], best, float(logits[best]), float(cos[best]), bool(subject[best]))
