"""Record-level measurement: every probe of a set of records in one batched pass.

`reference` runs once on the UNEDITED model: it fixes each locality probe's teacher-forced
tokens (the data's target, or for an open probe the model's own greedy continuation) and keeps
the unedited model's top-1 predictions there. `score` then measures records under the current
weights; locality compares with that reference, never with an edited model (EasyEdit #643).
Per record, a metric is the mean over its probes; a probe with aliases takes its best alias.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from edit_serve.evaluation.data import Record
from edit_serve.evaluation.metrics import agreement, mean, ngram_entropy, token_accuracy
from edit_serve.evaluation.scoring import Pair, Scorer

METRICS = ("reliability", "generality", "locality", "portability", "fluency")


@dataclass(frozen=True)
class LocalityReference:
    """One record's locality probes as token pairs and the unedited model's predictions."""

    pairs: tuple[Pair, ...]
    predictions: tuple[torch.Tensor, ...]


def reference(scorer: Scorer, records: Sequence[Record], open_tokens: int = 8) -> list[LocalityReference]:
    """Locality references for `records`; call it on the unedited model."""
    open_prompts = [p.prompt for r in records for p in r.neighborhood if not p.targets]
    continuations = iter(scorer.greedy(open_prompts, open_tokens) if open_prompts else [])
    per_record: list[list[Pair]] = []
    for record in records:
        pairs = []
        for probe in record.neighborhood:
            if probe.targets:
                pairs.append(scorer.pair(probe.prompt, probe.targets[0]))
            elif cont := next(continuations):  # an empty continuation (immediate EOS) has no positions
                pairs.append((scorer.prompt_ids(probe.prompt), cont))
        per_record.append(pairs)
    predictions = iter(scorer.top1([p for pairs in per_record for p in pairs]))
    return [LocalityReference(tuple(pairs), tuple(next(predictions) for _ in pairs)) for pairs in per_record]


def score(scorer: Scorer, records: Sequence[Record], locality: Sequence[LocalityReference] | None,
          fluency_tokens: int = 0) -> list[dict[str, float | None]]:
    """Per record: reliability, generality, portability, locality (when `locality` is given)
    and fluency (when `fluency_tokens` > 0); None where a record has no such probes."""
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
    if fluency_tokens > 0:
        owners = [ri for ri, record in enumerate(records) for _ in record.requests]
        texts = scorer.generate_text([r.text for record in records for r in record.requests], fluency_tokens)
        for ri, row in enumerate(rows):
            row["fluency"] = mean(ngram_entropy(t) for owner, t in zip(owners, texts) if owner == ri)
    return rows
