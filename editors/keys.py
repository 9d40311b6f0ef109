"""Where a fact is read from: the input (key) and output of an MLP output projection at the
last subject token, averaged over prefix context templates as ROME and MEMIT do.

ROME's code samples the prefixes from the model; on a 135M model they come out garbled
("The-I-A. {}", editing-notes.md), so a fixed set of neutral prefixes is used instead: the
same text every time, hence reproducible patches.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from editors.base import EditRequest
from editors.lm import fill, target_batch
from editors.nethook import Trace

#: "{}" is where the request's prompt template goes; the first is the bare prompt
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


def check_templates(method: str, count: int) -> None:
    """Refuse a template count outside 1..len(CONTEXT_TEMPLATES) (a config's __post_init__)."""
    if not 1 <= count <= len(CONTEXT_TEMPLATES):
        raise ValueError(f"{method} needs 1 <= v_templates <= {len(CONTEXT_TEMPLATES)}")


def contextual(request: EditRequest, templates: Sequence[str]) -> list[tuple[str, tuple[int, int]]]:
    """The request's prompt under each context template: (text, subject character span)."""
    out = []
    for ctx in templates:
        text, start, end = fill(ctx.replace("{}", request.template, 1), request.subject)
        out.append((text, (start, end)))
    return out


@torch.no_grad()
def subject_io(model, tokenizer, module: str, requests: Sequence[EditRequest],
               templates: Sequence[str] = ("{}",), batch_rows: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Input and output of `module` at each request's last subject token, averaged over
    `templates`: ((n, d_in), (n, d_out)) float32."""
    rows = [(req_index, text, span) for req_index, req in enumerate(requests)
            for text, span in contextual(req, templates)]
    ins = outs = None
    counts = torch.zeros(len(requests))
    for start in range(0, len(rows), batch_rows):
        chunk = rows[start:start + batch_rows]
        batch = target_batch(model, tokenizer, [(text, None) for _, text, _ in chunk], [span for *_, span in chunk])
        with Trace(model, module, retain_input=True, stop=True) as tr:
            model(**batch.inputs, use_cache=False)
        at = torch.arange(len(chunk), device=batch.lookup.device)
        k = tr.input[at, batch.lookup].float().cpu()  # (b, d_in)
        v = tr.output[at, batch.lookup].float().cpu()  # (b, d_out)
        if ins is None:
            ins = torch.zeros(len(requests), k.shape[1])
            outs = torch.zeros(len(requests), v.shape[1])
        index = torch.tensor([r for r, _, _ in chunk])
        ins.index_add_(0, index, k)
        outs.index_add_(0, index, v)
        counts.index_add_(0, index, torch.ones(len(chunk)))
    return ins / counts[:, None], outs / counts[:, None]


def edit_keys(model, tokenizer, module: str, requests: Sequence[EditRequest]) -> dict[str, torch.Tensor]:
    """The keys of `requests` at `module` that ROME and MEMIT use and remember for later edits:
    {"prompt": the bare prompt's (n, in), "templates": the mean over CONTEXT_TEMPLATES (n, in)}."""
    k_templates, _ = subject_io(model, tokenizer, module, requests, CONTEXT_TEMPLATES)
    k_prompt, _ = subject_io(model, tokenizer, module, requests, ("{}",))
    return {"prompt": k_prompt, "templates": k_templates}


def mix_keys(keys: dict[str, torch.Tensor], prompt_key_weight: float) -> torch.Tensor:
    """prompt_key_weight * the bare prompt's key + the rest * the templates' mean: (n, in)."""
    return prompt_key_weight * keys["prompt"] + (1 - prompt_key_weight) * keys["templates"]
