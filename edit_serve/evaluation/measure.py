"""Record-level measurement: every probe of a set of records in one batched pass.

`reference` runs once on the UNEDITED model: it fixes each locality probe's teacher-forced
tokens (the data's target, or for an open probe the model's own greedy continuation) and keeps
the unedited model's top-1 predictions there (for an open probe those are its continuation,
token for token, so they are not computed again: on 686 probes of the default pool and
CounterFact's neighbourhoods, 8 and 16 tokens each, the teacher-forced pass gave the same
tokens at all 16,440 positions). `score` then measures records under the current
weights; locality compares with that reference, never with an edited model (EasyEdit #643).
Per record, a metric is the mean over its probes; a probe with aliases takes its best alias.

With `greedy=True` each metric is also scored without teacher forcing, as `<metric>_greedy`:
the model generates freely (greedy) from the probe's prompt, and
- reliability, generality, portability: 1 when the continuation (len(target tokens) + 1 tokens,
  the extra one to see where the word ends) starts with the target or one of its aliases as a
  whole word (metrics.answer_matches), else 0;
- locality: 1 when the continuation is token for token the unedited model's (as many tokens as
  the teacher-forced check scores: the data's target length, or `open_tokens` for an open
  probe), else 0. The teacher-forced locality scores each position given the true prefix; this
  one asks whether the answer a user would read changed at all.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from edit_serve.evaluation.data import Record
from edit_serve.evaluation.metrics import agreement, answer_matches, mean, ngram_entropy, same_tokens, token_accuracy
from edit_serve.evaluation.scoring import Pair, Scorer

METRICS = ("reliability", "generality", "locality", "portability", "fluency")
#: the same four edit metrics scored on the free greedy answer (see the module doc)
GREEDY_METRICS = ("reliability_greedy", "generality_greedy", "locality_greedy", "portability_greedy")


@dataclass(frozen=True)
class LocalityReference:
    """One record's locality probes as token pairs and the unedited model's predictions."""

    pairs: tuple[Pair, ...]
    predictions: tuple[torch.Tensor, ...]
    #: for the greedy check (empty unless `reference(greedy=True)`): each probe's prompt, the
    #: number of tokens generated from it, and the unedited model's greedy continuation
    prompts: tuple[str, ...] = ()
    budgets: tuple[int, ...] = ()
    continuations: tuple[tuple[int, ...], ...] = ()

    def to_dict(self) -> dict:
        """JSON-able (an evaluation checkpoint keeps the references of a long run)."""
        return {"pairs": [[list(p), list(t)] for p, t in self.pairs],
                "predictions": [x.tolist() for x in self.predictions],
                "prompts": list(self.prompts), "budgets": list(self.budgets),
                "continuations": [list(c) for c in self.continuations]}

    @classmethod
    def from_dict(cls, d: dict) -> "LocalityReference":
        return cls(tuple((list(p), list(t)) for p, t in d["pairs"]),
                   tuple(torch.tensor(x, dtype=torch.long) for x in d["predictions"]),
                   tuple(d["prompts"]), tuple(d["budgets"]), tuple(tuple(c) for c in d["continuations"]))


def greedy_many(scorer: Scorer, prompts: Sequence[str], budgets: Sequence[int]) -> list[list[int]]:
    """Greedy continuations of `prompts`, each `budgets[i]` tokens at most (one generate call
    per distinct budget)."""
    out: list[list[int] | None] = [None] * len(prompts)
    for budget in sorted(set(budgets)):
        idx = [i for i, b in enumerate(budgets) if b == budget]
        for i, ids in zip(idx, scorer.greedy([prompts[i] for i in idx], budget)):
            out[i] = ids
    return out  # type: ignore[return-value]


def reference(scorer: Scorer, records: Sequence[Record], open_tokens: int = 8,
              greedy: bool = False) -> list[LocalityReference]:
    """Locality references for `records`; call it on the unedited model. `greedy`: also keep
    the unedited model's free greedy continuations (for `locality_greedy`)."""
    open_prompts = [p.prompt for r in records for p in r.neighborhood if not p.targets]
    continuations = iter(scorer.greedy(open_prompts, open_tokens) if open_prompts else [])
    per_record: list[list[Pair]] = []
    known: list[list[torch.Tensor | None]] = []  # an open probe's predictions: its greedy continuation
    probes: list[list[tuple[str, int]]] = []  # (prompt, greedy budget) per kept probe
    for record in records:
        pairs, given, kept = [], [], []
        for probe in record.neighborhood:
            if probe.targets:
                pairs.append(scorer.pair(probe.prompt, probe.targets[0]))
                given.append(None)
                kept.append((probe.prompt, len(pairs[-1][1])))
            elif cont := next(continuations):  # an empty continuation (immediate EOS) has no positions
                pairs.append((scorer.prompt_ids(probe.prompt), cont))
                given.append(torch.tensor(cont, dtype=torch.long))  # the top-1 tokens teacher forcing would give
                kept.append((probe.prompt, open_tokens))
        per_record.append(pairs)
        known.append(given)
        probes.append(kept)
    targeted = [p for pairs, given in zip(per_record, known) for p, g in zip(pairs, given) if g is None]
    predictions = iter(scorer.top1(targeted) if targeted else [])
    refs = [LocalityReference(tuple(pairs), tuple(next(predictions) if g is None else g for g in given))
            for pairs, given in zip(per_record, known)]
    if not greedy:
        return refs
    flat = [p for kept in probes for p in kept]
    free = iter(greedy_many(scorer, [p for p, _ in flat], [b for _, b in flat]) if flat else [])
    return [dataclasses.replace(ref, prompts=tuple(p for p, _ in kept), budgets=tuple(b for _, b in kept),
                                continuations=tuple(tuple(next(free)) for _ in kept))
            for ref, kept in zip(refs, probes)]


def score(scorer: Scorer, records: Sequence[Record], locality: Sequence[LocalityReference] | None,
          fluency_tokens: int = 0, greedy: bool = False) -> list[dict[str, float | None]]:
    """Per record: reliability, generality, portability, locality (when `locality` is given)
    and fluency (when `fluency_tokens` > 0); None where a record has no such probes. With
    `greedy`, also the GREEDY_METRICS (locality_greedy needs references made with greedy=True)."""
    pairs: list[Pair] = []
    where: list[tuple[int, str, int]] = []  # (record, metric, probe) of each pair
    for ri, record in enumerate(records):
        for metric, probes in (("reliability", record.rewrites), ("generality", record.paraphrases),
                               ("portability", record.portability)):
            for pi, probe in enumerate(probes):
                for target in probe.targets:
                    pairs.append(scorer.pair(probe.prompt, target))
                    where.append((ri, metric, pi))
        if locality is not None:
            for pi, pair in enumerate(locality[ri].pairs):
                pairs.append(pair)
                where.append((ri, "locality", pi))
    best: dict[tuple[int, str, int], float] = {}
    for key, pair, predicted in zip(where, pairs, scorer.top1(pairs) if pairs else []):
        ri, metric, pi = key
        value = (agreement(predicted, locality[ri].predictions[pi]) if metric == "locality"
                 else token_accuracy(predicted, pair[1]))
        best[key] = max(best.get(key, 0.0), value)
    values: list[dict[str, list[float]]] = [{m: [] for m in METRICS[:4]} for _ in records]
    for (ri, metric, _), value in best.items():
        values[ri][metric].append(value)
    rows: list[dict[str, float | None]] = [{m: mean(v) for m, v in per.items()} for per in values]
    if greedy:
        for row, free in zip(rows, score_greedy(scorer, records, locality)):
            row.update(free)
    if fluency_tokens > 0:
        owners = [ri for ri, record in enumerate(records) for _ in record.requests]
        texts = scorer.generate_text([r.text for record in records for r in record.requests], fluency_tokens)
        for ri, row in enumerate(rows):
            row["fluency"] = mean(ngram_entropy(t) for owner, t in zip(owners, texts) if owner == ri)
    return rows


def score_greedy(scorer: Scorer, records: Sequence[Record],
                 locality: Sequence[LocalityReference] | None) -> list[dict[str, float | None]]:
    """Per record, the GREEDY_METRICS (see the module doc): the mean over its probes of 1/0."""
    prompts: list[str] = []
    budgets: list[int] = []
    checks: list[tuple[int, str, object]] = []  # (record, metric, targets or reference continuation)
    for ri, record in enumerate(records):
        for metric, probes in (("reliability", record.rewrites), ("generality", record.paraphrases),
                               ("portability", record.portability)):
            for probe in probes:
                if not probe.targets:
                    continue
                prompts.append(probe.prompt)
                budgets.append(max(len(scorer.pair(probe.prompt, t)[1]) for t in probe.targets) + 1)
                checks.append((ri, metric, probe.targets))
        if locality is not None and locality[ri].continuations:
            ref = locality[ri]
            for prompt, budget, cont in zip(ref.prompts, ref.budgets, ref.continuations):
                prompts.append(prompt)
                budgets.append(budget)
                checks.append((ri, "locality", cont))
    values: list[dict[str, list[float]]] = [{m: [] for m in GREEDY_METRICS} for _ in records]
    for (ri, metric, want), ids in zip(checks, greedy_many(scorer, prompts, budgets) if prompts else []):
        if metric == "locality":
            value = same_tokens(ids, want)
        else:
            text = scorer.tokenizer.decode(ids, skip_special_tokens=True)
            value = float(any(answer_matches(text, t) for t in want))
        values[ri][f"{metric}_greedy"].append(value)
    return [{m: mean(v) for m, v in per.items()} for per in values]
