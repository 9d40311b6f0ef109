"""KN, knowledge neurons (Dai et al. 2022): find the FFN neurons that express a fact by
integrated gradients, then rewrite their value slots.

Attribution. For the prompt under a few context templates, at the position that predicts the
answer, each FFN neuron's activation a (the input of the MLP output projection) is scaled by
alpha = 1/m .. 1 (m = ig_steps, one batch) and the gradient of P(old answer) with respect to
the scaled activation is averaged: attribution = a * mean gradient. A neuron is kept for a
prompt when its attribution exceeds `threshold` x the prompt's largest, and kept for the edit
when that happens in at least `share` of the prompts (at most `max_neurons`, at least one).
The old answer is `target_true` when given, else the model's own top-1 prediction.

Edit. The value slot of neuron i (column i of W_out, in the residual space) moves by
`scale` x (e(new) - e(old)), e the output embedding of the answers' first tokens
(the knowledge-neurons library's update, scale 2). The patch holds column-sparse deltas
(`delta.P.cols` + `delta.P.index`).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass

import torch

from editors.base import EditError, editor
from editors.common import canonical, delta_patch, method_layers, mlp_out_weight
from editors.keys import CONTEXT_TEMPLATES, check_templates, fitted
from editors.lm import is_seq2seq, logits_at, scored_positions, target_batch, target_ids
from editors.nethook import Trace, TraceDict

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KNConfig:
    layers: list[int] | None = None  # default: the profile's `kn`
    ig_steps: int = 20
    threshold: float = 0.2
    share: float = 0.5
    prompts: int = 3  # the prompt under this many context templates (the first is the bare prompt)
    max_neurons: int = 10
    scale: float = 2.0

    def __post_init__(self):
        if self.ig_steps < 1 or not 0 < self.threshold <= 1 or not 0 < self.share <= 1:
            raise ValueError("kn needs ig_steps >= 1, 0 < threshold <= 1 and 0 < share <= 1")
        check_templates("kn", self.prompts, "prompts")
        if self.max_neurons < 1:
            raise ValueError("kn needs max_neurons >= 1")


def attribute(model, tokenizer, profile, layers: list[int], text: str, target: str, answer: int | None,
              steps: int) -> tuple[torch.Tensor, int]:
    """Integrated-gradients attribution of every FFN neuron of `layers` to the answer token at
    the position that predicts `target`'s first token: ((n_layers, d_ff), the answer's id)."""
    batch = target_batch(model, tokenizer, [(text, target)])
    rows, cols = scored_positions(batch)
    pos = int(cols[0])  # the position predicting the first target token
    modules = [profile.mlp_out(layer) for layer in layers]
    with torch.no_grad(), TraceDict(model, modules, retain_input=True, retain_output=False) as td:
        logits = logits_at(model, batch.inputs, rows[:1], cols[:1])  # (1, V)
    if answer is None:
        answer = int(logits[0].argmax())
    reps = {k: v.repeat(steps, *[1] * (v.dim() - 1)) for k, v in batch.inputs.items()}  # m copies of the prompt
    at_rows, at_cols = torch.arange(steps, device=rows.device), torch.full((steps,), pos, device=rows.device)
    alphas = torch.arange(1, steps + 1, device=rows.device, dtype=torch.float32) / steps  # (m,)
    scores = []
    for module in modules:
        act = td[module].input[0, pos].float()  # (d_ff,)
        scaled = (alphas[:, None] * act).requires_grad_(True)  # (m, d_ff)

        def put(x, _name, scaled=scaled):
            hit = torch.zeros(x.shape[1], 1, device=x.device, dtype=x.dtype)
            hit[pos] = 1
            return x * (1 - hit) + hit * scaled[:, None, :].to(x.dtype)  # (m, T, d_ff)

        with Trace(model, module, edit_input=put, retain_output=False):
            probs = torch.softmax(logits_at(model, reps, at_rows, at_cols).float(), -1)[:, answer]  # (m,)
        (grad,) = torch.autograd.grad(probs.sum(), scaled)  # (m, d_ff)
        scores.append(act * grad.mean(0))
    return torch.stack(scores), answer


def knowledge_neurons(model, tokenizer, profile, layers: list[int], request, cfg: KNConfig
                      ) -> tuple[list[tuple[int, int]], int]:
    """([(layer, neuron)], old answer id) for one request."""
    seq2seq = is_seq2seq(model)
    answer = None
    if request.target_true:
        answer = target_ids(tokenizer, request.text, request.target_true, seq2seq)[0]
    counts: dict[tuple[int, int], int] = defaultdict(int)
    total = None  # (n_layers, d_ff) attribution summed over the prompts
    prompts = fitted(request, CONTEXT_TEMPLATES[:cfg.prompts])
    for text, _ in prompts:
        scores, answer = attribute(model, tokenizer, profile, layers, text, request.target_new, answer, cfg.ig_steps)
        scores = scores.cpu()
        total = scores if total is None else total + scores
        for li, ni in (scores > cfg.threshold * scores.max()).nonzero().tolist():
            counts[(li, ni)] += 1
    need = cfg.share * len(prompts)
    kept = [key for key, c in counts.items() if c >= need]
    kept.sort(key=lambda key: -float(total[key]))
    if not kept:  # no neuron is shared enough: take the most attributed one
        flat = int(total.argmax())
        kept = [divmod(flat, total.shape[1])]
    return [(layers[li], ni) for li, ni in kept[:cfg.max_neurons]], answer


@editor("kn", KNConfig, rephrasings=True)
def compute(ctx, requests, cfg: KNConfig):
    """KN: knowledge-neuron attribution and value-slot editing."""
    model, tokenizer, profile = ctx.model, ctx.tokenizer, ctx.profile
    layers = method_layers(profile, "kn", cfg.layers)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise EditError("kn needs the model's output embeddings (get_output_embeddings) for the answers")
    embed = head.weight.detach()  # (V, d)
    seq2seq = is_seq2seq(model)
    columns: dict[int, dict[int, torch.Tensor]] = defaultdict(dict)  # layer -> neuron -> (out,) change
    for request in requests:
        neurons, old = knowledge_neurons(model, tokenizer, profile, layers, request, cfg)
        new = target_ids(tokenizer, request.text, request.target_new, seq2seq)[0]
        change = cfg.scale * (embed[new].float() - embed[old].float()).cpu()  # (d,)
        log.info("kn %r -> %r: neurons %s", request.text, request.target_new, neurons)
        for layer, neuron in neurons:
            slot = columns[layer]
            slot[neuron] = slot.get(neuron, 0) + change
    tensors = {}
    for layer, slots in columns.items():
        name, weight = mlp_out_weight(model, profile, layer)
        if weight.shape[0] != embed.shape[1]:
            raise EditError(f"{name} has {weight.shape[0]} outputs but the embeddings have {embed.shape[1]}")
        index = sorted(slots)
        tensors[f"delta.{name}.cols"] = canonical(torch.stack([slots[i] for i in index], 1))  # (out, k)
        tensors[f"delta.{name}.index"] = torch.tensor(index, dtype=torch.int64)
    return delta_patch("kn", tensors)
