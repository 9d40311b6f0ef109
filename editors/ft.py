"""FT-L: constrained fine-tuning of MLP output projections (Zhu et al. 2020, as run by ROME's
and the survey's baselines).

Adam on a dense delta of each edited weight, minimizing -log P(target | prompt), with every
element of the delta kept within +-norm_constraint of zero (the L-infinity bound; 0 turns it
off), early-stopped when the loss is below `stop_loss`. The delta is overlaid through hooks
while it trains, so the model's weights are never written. The patch holds the dense deltas.

objective "prompt_last" (the survey's FT-L): every target token is scored from the position
that predicts the first one; "target": ordinary teacher forcing over the target's tokens.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from editors.base import editor
from editors.common import delta_patch, dense, method_layers, mlp_out_weight
from editors.lm import logits_at, scored_positions, target_batch, target_nll
from editors.nethook import AddToWeights

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FTConfig:
    layers: list[int] | None = None  # default: the profile's `ft`
    steps: int = 25
    lr: float = 5e-4
    weight_decay: float = 0.0
    norm_constraint: float = 5e-4  # L-infinity bound on each weight change; 0: unconstrained
    objective: str = "prompt_last"  # or "target"
    stop_loss: float = 1e-2
    batch_size: int = 64

    def __post_init__(self):
        if self.objective not in ("prompt_last", "target"):
            raise ValueError(f"objective must be 'prompt_last' or 'target', not {self.objective!r}")
        if self.steps < 1 or self.lr <= 0 or self.norm_constraint < 0:
            raise ValueError("ft needs steps >= 1, lr > 0 and norm_constraint >= 0")


def prompt_last_nll(model, batch) -> torch.Tensor:
    """(B,) mean NLL of each row's target tokens, all scored at the position that predicts the
    first target token (ROME's FT objective)."""
    rows, cols = scored_positions(batch)  # row-major
    first = torch.ones_like(rows, dtype=torch.bool)
    first[1:] = rows[1:] != rows[:-1]  # the first scored position of each row
    logp = torch.log_softmax(logits_at(model, batch.inputs, rows[first], cols[first]).float(), -1)  # (B, V)
    which = torch.cumsum(first.long(), 0) - 1  # (N,) each scored token's row in logp
    picked = logp[which, batch.labels[rows, cols]]  # (N,)
    total = torch.zeros(batch.mask.shape[0], device=picked.device).index_add(0, rows, picked)
    return -total / batch.mask.sum(1).clamp(min=1)


def request_nll(model, batch, objective: str) -> torch.Tensor:
    """(B,) the fine-tuning loss of each row."""
    if objective == "prompt_last":
        return prompt_last_nll(model, batch)
    return target_nll(logits_at(model, batch.inputs, *scored_positions(batch)), batch)


def finetune(model, tokenizer, requests, params: list[torch.Tensor], overlay, *, steps: int, lr: float,
             weight_decay: float = 0.0, stop_loss: float = 0.0, batch_size: int = 64,
             objective: str = "target", bound: float = 0.0) -> float:
    """Adam on `params` to make the requests' targets likely, the model running inside
    `overlay()` (a context manager applying the params through hooks). `bound` clamps each
    element of every param to +-bound after each step. Returns the final mean loss."""
    rows = [(text, r.target_new) for r in requests for text in r.texts]
    batches = [target_batch(model, tokenizer, rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]
    optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    loss_value = float("inf")
    for step in range(steps):
        loss_value = 0.0
        grads = [torch.zeros_like(p) for p in params]
        with overlay():
            for batch in batches:
                loss = request_nll(model, batch, objective).sum() / len(rows)
                for acc, g in zip(grads, torch.autograd.grad(loss, params)):
                    acc += g
                loss_value += float(loss.detach())
        log.debug("fine-tuning step %d: loss %.4f", step, loss_value)
        if loss_value < stop_loss:
            break
        for p, g in zip(params, grads):
            p.grad = g
        optimizer.step()
        if bound:
            with torch.no_grad():
                for p in params:
                    p.clamp_(-bound, bound)
    return loss_value


@editor("ft", FTConfig, rephrasings=True)
def compute(ctx, requests, cfg: FTConfig):
    """FT-L: norm-constrained fine-tuning of MLP output projections."""
    model, tokenizer, profile = ctx.model, ctx.tokenizer, ctx.profile
    layers = method_layers(profile, "ft", cfg.layers)
    weights = dict(mlp_out_weight(model, profile, layer) for layer in layers)
    modules = {name[: -len(".weight")]: name for name in weights}
    deltas = {name: torch.zeros(w.shape, dtype=torch.float32, device=w.device, requires_grad=True)
              for name, w in weights.items()}
    loss = finetune(model, tokenizer, requests, list(deltas.values()),
                    lambda: AddToWeights(model, {m: deltas[n] for m, n in modules.items()}),
                    steps=cfg.steps, lr=cfg.lr, weight_decay=cfg.weight_decay, stop_loss=cfg.stop_loss,
                    batch_size=cfg.batch_size, objective=cfg.objective, bound=cfg.norm_constraint)
    log.info("ft on layers %s: final loss %.4f", layers, loss)
    tensors = {}
    for name, delta in deltas.items():
        tensors.update(dense(name, delta.detach()))
    return delta_patch("ft", tensors)
