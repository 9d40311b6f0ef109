"""The survey's edit metrics as pure functions on predictions and texts.

- token accuracy: the share of target tokens that are the model's top-1 prediction under
  teacher forcing (reliability, generality and portability are this, on different prompts);
- agreement: the share of positions whose top-1 prediction equals a reference prediction
  (locality: the edited model against the UNEDITED model, same teacher-forced positions);
- free greedy answer (no teacher forcing; what a user of the server sees, "The Mirage of Model
  Editing", 2025): `answer_matches` checks that a greedy continuation starts with the target as
  a whole word (whitespace normalized, case kept), `same_tokens` that two continuations are
  identical (locality: the edited model's greedy continuation against the unedited model's);
- n-gram entropy (ROME's fluency): per text, the mean of 2/3 * H2 and 4/3 * H3, where Hn is the
  entropy in bits of the text's word n-gram frequencies. Repetitive text scores low.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence

import torch

NGRAM_ORDERS = (2, 3)
NGRAM_WEIGHTS = (2 / 3, 4 / 3)
_WORD = re.compile(r"\w+|[^\w\s]")


def token_accuracy(predicted: torch.Tensor, target: Sequence[int]) -> float:
    """Share of positions where the top-1 prediction is the target token."""
    target_t = torch.as_tensor(list(target), dtype=predicted.dtype)
    if predicted.shape != target_t.shape:
        raise ValueError(f"{predicted.shape[0]} predictions for {target_t.shape[0]} target tokens")
    return float((predicted == target_t).float().mean())


def agreement(predicted: torch.Tensor, reference: torch.Tensor) -> float:
    """Share of positions where two models' top-1 predictions agree."""
    if predicted.shape != reference.shape:
        raise ValueError(f"{predicted.shape[0]} predictions against {reference.shape[0]} reference ones")
    return float((predicted == reference).float().mean())


def _normalized(text: str) -> str:
    return " ".join(text.split())


def answer_matches(continuation: str, target: str) -> bool:
    """Whether the decoded greedy `continuation` starts with `target` as a whole word: after
    normalizing whitespace, it begins with the target and the next character (if any) is not
    a letter or digit (" Parisian" does not answer "Paris"; " Paris, France." does)."""
    text, want = _normalized(continuation), _normalized(target)
    if not want or not text.startswith(want):
        return False
    return len(text) == len(want) or not text[len(want)].isalnum()


def same_tokens(continuation: Sequence[int], reference: Sequence[int]) -> float:
    """1.0 when two greedy continuations are the same tokens, else 0.0."""
    return float(list(continuation) == list(reference))


def words(text: str) -> list[str]:
    """Word and punctuation tokens (close to nltk's word_tokenize, which ROME uses)."""
    return _WORD.findall(text)


def ngram_entropy(text: str, orders: Sequence[int] = NGRAM_ORDERS, weights: Sequence[float] = NGRAM_WEIGHTS) -> float:
    """ROME's `compute_n_gram_entropy`: mean over n of weight_n * entropy (bits) of the n-grams."""
    tokens = words(text)
    weighted = []
    for n, weight in zip(orders, weights):
        counts = Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))
        total = sum(counts.values())
        entropy = -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0
        weighted.append(weight * entropy)
    return sum(weighted) / len(weighted)


def mean(values: Iterable[float | None]) -> float | None:
    """The mean of the values that are not None; None when there are none."""
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None
