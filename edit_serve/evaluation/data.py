"""Evaluation records: the shared knowledge-editing JSONL schema, read into typed records.

One JSON object a line: `prompt`, `subject`, `target_new` (the edit; optionally `rephrasings`,
other wordings it is fitted to as well, editors.EditRequest), `paraphrase_prompts`
(generality), `neighborhood_prompts` [{prompt, target}] (locality), `portability`
[{prompt, target, target_aliases?}]. MQuAKE-style rows add `edits`, a list of requests that
are applied together; the row's portability questions then follow from all of them. Any file
of this schema works; a malformed line is refused with its file and line number.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from editors import EditError, EditRequest


class DataError(ValueError):
    """An evaluation file or record that does not follow the schema."""


@dataclass(frozen=True)
class Probe:
    """A prompt scored teacher-forced on a target. `targets` holds the target and its aliases
    (any of them counts); it is empty for an open locality probe, whose target is the unedited
    model's own greedy continuation."""

    prompt: str
    targets: tuple[str, ...] = ()


@dataclass(frozen=True)
class Record:
    """One evaluation case: the requests edited together and the probes that score them."""

    id: str
    requests: tuple[EditRequest, ...]
    paraphrases: tuple[Probe, ...] = ()
    neighborhood: tuple[Probe, ...] = ()
    portability: tuple[Probe, ...] = ()

    @property
    def rewrites(self) -> tuple[Probe, ...]:
        """Reliability probes: each request's own prompt with its new target."""
        return tuple(Probe(r.text, (r.target_new,)) for r in self.requests)


def rephrasing_probes(requests: Iterable[EditRequest]) -> tuple[Probe, ...]:
    """Each request's rephrasings with its new target: the generality probes of an edit that
    brings no paraphrases of its own (a server's edit, `edit_serve edit` without --paraphrase),
    so its figures say whether the wordings it was fitted to are answered."""
    return tuple(Probe(text, (r.target_new,)) for r in requests for text in r.texts[1:])


def _text(value, what: str) -> str:
    if isinstance(value, Mapping):  # ROME's {"str": ...}
        value = value.get("str")
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{what} must be a non-empty string")
    return value


def _probe(entry, what: str, need_target: bool = True) -> Probe:
    if isinstance(entry, str):
        if need_target:
            raise DataError(f"{what} needs a target: write {{\"prompt\": ..., \"target\": ...}}")
        return Probe(_text(entry, what))
    if not isinstance(entry, Mapping):
        raise DataError(f"{what} must be an object with prompt and target")
    prompt = _text(entry.get("prompt"), f"{what}.prompt")
    if entry.get("target") is None and not need_target:
        return Probe(prompt)
    target = _text(entry.get("target"), f"{what}.target")
    aliases = entry.get("target_aliases") or []
    if not isinstance(aliases, list):
        raise DataError(f"{what}.target_aliases must be a list of strings")
    targets = [target] + [_text(a, f"{what}.target_aliases") for a in aliases]
    return Probe(prompt, tuple(dict.fromkeys(targets)))


def _list(row: Mapping, key: str) -> list:
    value = row.get(key) or []
    if not isinstance(value, list):
        raise DataError(f"{key} must be a list")
    return value


def record_from_dict(row: Mapping, default_id: str = "") -> Record:
    """Build a Record from one row of the schema. Raises DataError naming the bad field."""
    if not isinstance(row, Mapping):
        raise DataError("a record must be a JSON object")
    try:
        raw_requests = _list(row, "edits") or [row]
        requests = tuple(EditRequest.from_dict(r) for r in raw_requests)
    except EditError as e:
        raise DataError(str(e)) from None
    target_new = requests[0].target_new  # paraphrases ask for the (first) edit's new target
    paraphrases = tuple(Probe(_text(p, "paraphrase_prompts[]"), (target_new,))
                        for p in _list(row, "paraphrase_prompts"))
    neighborhood = tuple(_probe(p, "neighborhood_prompts[]", need_target=False)
                         for p in _list(row, "neighborhood_prompts"))
    portability = tuple(_probe(p, "portability[]") for p in _list(row, "portability"))
    return Record(id=str(row.get("id", default_id)), requests=requests, paraphrases=paraphrases,
                  neighborhood=neighborhood, portability=portability)


def read_records(path: str | Path, n: int | None = None) -> list[Record]:
    """The first `n` records (all when None) of a JSONL file of the shared schema."""
    path = Path(path)
    if n is not None and n < 1:
        raise DataError(f"--n must be at least 1, got {n}")
    try:
        fh = path.open(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"no such data file: {path}") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None
    records: list[Record] = []
    with fh:
        for number, line in enumerate(fh, 1):
            if n is not None and len(records) >= n:
                break
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{number}: not valid JSON ({e.msg})") from None
            try:
                records.append(record_from_dict(row, default_id=f"{path.stem}:{number}"))
            except DataError as e:
                raise DataError(f"{path}:{number}: {e}") from None
    if not records:
        raise DataError(f"{path} holds no records")
    return records


def requests_of(records: Iterable[Record]) -> list[EditRequest]:
    """All the requests of `records`, in order (one patch edits them together)."""
    return [r for record in records for r in record.requests]


def hold_out_paraphrases(records: Iterable[Record], k: int, fit: bool, score_taken: bool = False) -> list[Record]:
    """Each record (of one request only) with its first `k` paraphrases taken out of its
    generality probes and, with `fit`, added to its request's rephrasings
    (EditRequest.rephrasings): generality is then scored on wordings the edit was not fitted
    to, with or without the `k` it was; with `score_taken`, on those `k` instead."""
    out = []
    for record in records:
        if len(record.requests) != 1:
            raise DataError(f"record {record.id}: paraphrases can be held out of single-request records only")
        taken, kept = record.paraphrases[:k], record.paraphrases[k:]
        requests = record.requests
        if fit:
            request = requests[0]
            requests = (dataclasses.replace(request, rephrasings=request.rephrasings + tuple(p.prompt for p in taken)),)
        out.append(dataclasses.replace(record, requests=requests, paraphrases=taken if score_taken else kept))
    return out


def training_examples(records: Iterable[Record], exclude: Iterable[Record] = (), paraphrases: int = 1,
                      unrelated: int = 2) -> list:
    """Training edits for a trained editor (editors.training.Example) from records: each
    single-request record's request, its first `paraphrases` paraphrases and its first
    `unrelated` neighbourhood probes with a target. Records that share an id or a subject with
    `exclude` (the evaluation records) are left out."""
    from editors.training import Example

    held = list(exclude)
    ids = {r.id for r in held}
    subjects = {q.subject for r in held for q in r.requests}
    examples = []
    for record in records:
        if len(record.requests) != 1 or record.id in ids or record.requests[0].subject in subjects:
            continue
        examples.append(Example(
            request=record.requests[0],
            paraphrases=tuple(p.prompt for p in record.paraphrases[:paraphrases]),
            unrelated=tuple((p.prompt, p.targets[0]) for p in record.neighborhood if p.targets)[:unrelated]))
    return examples
