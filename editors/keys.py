"""Where a fact is read from: the input (key) and output of an MLP output projection at the
last subject token, averaged over prefix context templates as ROME and MEMIT do.

ROME's code samples the prefixes from the model; on a 135M model they come out garbled
("The-I-A. {}", editing-notes.md), so a fixed set of neutral prefixes is used instead: the
same text every time, hence reproducible patches.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from editors.base import EditRequest
from editors.lm import fill, is_seq2seq, mlp_positions, target_batch
from editors.nethook import BlocksBelow, Trace, TraceDict

#: "{}" is where the request's prompt template goes; the first is the bare prompt (edit_keys
#: reads the bare prompt's key from its rows)
CONTEXT_TEMPLATES: tuple[str, ...] = (
    "{}",
    "The following is a fact. {}",
    "Here is something I learned. {}",
    "I read this in a book. {}",
    "According to the encyclopedia, {}",
    "Let me tell you something. {}",
    "This is true. {}",
    "In the news today. {}",
    "As many people know, {}",
    "Some background first. {}",
    "Fact check. {}",
)


def check_templates(method: str, count: int, setting: str = "v_templates") -> None:
    """Refuse a template count outside 1..len(CONTEXT_TEMPLATES) (a config's __post_init__)."""
    if not 1 <= count <= len(CONTEXT_TEMPLATES):
        raise ValueError(f"{method} needs 1 <= {setting} <= {len(CONTEXT_TEMPLATES)}")


def contextual(request: EditRequest, templates: Sequence[str]) -> list[tuple[str, tuple[int, int]]]:
    """The request's prompt under each context template: (text, subject character span)."""
    out = []
    for ctx in templates:
        text, start, end = fill(ctx.replace("{}", request.template, 1), request.subject)
        out.append((text, (start, end)))
    return out


def fitted(request: EditRequest, templates: Sequence[str]) -> list[tuple[str, tuple[int, int]]]:
    """The prompts a method fits an edit to: the request's prompt under each template
    (`contextual`), then each of its rephrasings as it is."""
    own = [fill(t, request.subject) for t in request.templates[1:]]
    return contextual(request, templates) + [(text, (start, end)) for text, start, end in own]


@dataclass
class SubjectValues:
    """A module's input (key) and output at each request's last subject token: the means over
    the templates (n, d) and the values under the first template alone (n, d)."""

    key: torch.Tensor
    out: torch.Tensor
    first_key: torch.Tensor
    first_out: torch.Tensor


class Replay:
    """What the blocks below `module`'s block returned in each batch of a first subject_values
    pass, replayed by later passes over the same requests and templates instead of running
    those blocks again (MEMIT's passes at each of its layers: nothing below its first layer
    changes between them). Holds every batch's hidden states: for passes of a bounded size."""

    def __init__(self, model, module: str):
        self.model, self.module = model, module
        self.batches: dict[int, BlocksBelow] = {}

    def around(self, batch: int):
        """Keep (first pass) or replay (later ones) what the blocks below return for `batch`."""
        below = self.batches.get(batch)
        if below is None:
            below = self.batches[batch] = BlocksBelow(self.model, self.module)
            return below.keep()
        return below.replay()


@torch.no_grad()
def subject_values(model, tokenizer, module: str, requests: Sequence[EditRequest],
                   templates: Sequence[str] = ("{}",), batch_rows: int = 64,
                   replay: Replay | None = None) -> SubjectValues:
    """Input and output of `module` at each request's last subject token under every template
    (float32). On a decoder-only model a row runs only up to that token (nothing after it
    changes what the module sees there), and rows of similar length share a batch. With
    `replay`, the blocks below its module run in its first pass only."""
    rows = [(r, t, text, span) for r, req in enumerate(requests)
            for t, (text, span) in enumerate(contextual(req, templates))]
    full = target_batch(model, tokenizer, [(text, None) for *_, text, _ in rows], [span for *_, span in rows])
    causal = not is_seq2seq(model)
    order = torch.argsort(full.lookup.cpu(), stable=True) if causal else torch.arange(len(rows))
    owner = torch.tensor([r for r, *_ in rows])
    first = torch.tensor([t == 0 for _, t, *_ in rows])
    sums = firsts = None
    for start in range(0, len(rows), batch_rows):
        idx = order[start:start + batch_rows]
        part = full.select(idx.to(full.lookup.device))
        inputs = part.inputs
        if causal:
            inputs = {k: v[:, :int(part.lookup.max()) + 1] for k, v in inputs.items()}
        with replay.around(start) if replay else contextlib.nullcontext(), \
                Trace(model, module, retain_input=True, stop=True) as tr:
            model(**inputs, use_cache=False)
        at = torch.arange(len(idx), device=part.lookup.device)
        values = [tr.input[at, part.lookup].float().cpu(), tr.output[at, part.lookup].float().cpu()]  # (b, d) each
        if sums is None:
            sums = [torch.zeros(len(requests), v.shape[1]) for v in values]
            firsts = [torch.zeros(len(requests), v.shape[1]) for v in values]
        for total, head, v in zip(sums, firsts, values):
            total.index_add_(0, owner[idx], v)
            head[owner[idx][first[idx]]] = v[first[idx]]
    return SubjectValues(*(total / len(templates) for total in sums), *firsts)


def subject_io(model, tokenizer, module: str, requests: Sequence[EditRequest],
               templates: Sequence[str] = ("{}",), replay: Replay | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Input and output of `module` at each request's last subject token, averaged over
    `templates`: ((n, d_in), (n, d_out)) float32."""
    found = subject_values(model, tokenizer, module, requests, templates, replay=replay)
    return found.key, found.out


def edit_keys(model, tokenizer, module: str, requests: Sequence[EditRequest],
              replay: Replay | None = None) -> dict[str, torch.Tensor]:
    """The keys of `requests` at `module` that ROME and MEMIT use and remember for later edits:
    {"prompt": the bare prompt's (n, in), "templates": the mean over CONTEXT_TEMPLATES (n, in)}."""
    found = subject_values(model, tokenizer, module, requests, CONTEXT_TEMPLATES, replay=replay)
    return {"prompt": found.first_key, "templates": found.key}


def mix_keys(keys: dict[str, torch.Tensor], prompt_key_weight: float) -> torch.Tensor:
    """prompt_key_weight * the bare prompt's key + the rest * the templates' mean: (n, in)."""
    return prompt_key_weight * keys["prompt"] + (1 - prompt_key_weight) * keys["templates"]


# Entities of several kinds (people, places, organisations, works, products) that stand in for an
# edit's subject where the edit's prompt about them is what the edit should not move (the trained
# editors' and MEMIT's `spare_subjects`).
OTHER_SUBJECTS = ("Barack Obama", "Charles Darwin", "Pablo Picasso", "Lionel Messi", "Queen Elizabeth II",
                  "Albert Einstein", "Paris", "Mumbai", "Brazil", "Canada", "Sydney", "Egypt", "Toyota",
                  "Microsoft", "Nokia", "the BBC", "The Beatles", "Friends", "Windows 95", "the iPhone",
                  "Harvard University", "Mount Everest", "the Ford Mustang", "Goldman Sachs")


def other_subject_keys(ctx, modules: Sequence[str], requests: Sequence[EditRequest]) -> dict[str, torch.Tensor]:
    """Per module, the (M, in) float64 inputs at every token of each request's prompt and target
    with each of OTHER_SUBJECTS in place of its subject (one forward pass, no gradient; `modules`
    in execution order)."""
    rows = [(r.template.format(s), r.target_new) for r in requests for s in OTHER_SUBJECTS if s != r.subject]
    batch = target_batch(ctx.model, ctx.tokenizer, rows)
    keep = mlp_positions(batch)
    with torch.no_grad(), TraceDict(ctx.model, modules, retain_input=True, retain_output=False, stop=True) as td:
        ctx.model(**batch.inputs, use_cache=False)  # ends after the last module: no logits
    return {m: td[m].input[keep].double() for m in modules}


def other_subject_grams(ctx, modules: Sequence[str], requests: Sequence[EditRequest], chunk: int = 16
                        ) -> dict[str, torch.Tensor]:
    """Per module, O^T O (in, in) float64 of `other_subject_keys`, summed over chunks of
    requests (a batch of thousands would hold gigabytes of keys at once); one forward pass per
    chunk for all `modules` (in execution order)."""
    grams: dict[str, torch.Tensor] = {}
    for i in range(0, len(requests), chunk):
        for m, o in other_subject_keys(ctx, modules, requests[i:i + chunk]).items():
            o = o.cpu()
            grams[m] = o.T @ o if m not in grams else grams[m].addmm_(o.T, o)
    return grams
