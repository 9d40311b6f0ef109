"""MEND: Model Editor Networks with Gradient Decomposition (Mitchell et al. 2022).

For each edited MLP projection (the output projections; with training's `mlp_in` the input
projections too, as in the original), the fine-tuning gradient of the request's target NLL is
sum_t delta_t u_t^T (editors.trained.grad_factors). An editor network maps each token's pair
(u_t, delta_t), normalized by running statistics, to (u~_t, delta~_t); the update is

    delta W = -lr_l * sum_t delta~_t u~_t^T        (a low-rank delta: B = -lr_l delta~^T, A = u~)

with lr_l a learned edit learning rate per layer. The network is the original's: one residual
MLP over the concatenation [u; delta] with a low-rank hidden layer (initialized to the
identity), shared by every edited layer of the same shape, with a per-layer scale and shift of
its input. It is trained (editors.training) with the edit loss plus a KL locality loss on
unrelated text; `edit_serve train --method mend` writes the checkpoint. Several requests are
one patch: their tokens' updates are summed.

Differences from the original, for a short CPU training budget: the learned edit learning rate
is kept in log space (it moves by orders of magnitude in hundreds of steps rather than 10^5),
and the running statistics freeze after `norm_steps` training batches.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from editors.base import editor
from editors.trained import EditorNet, Factors, TrainedEditConfig, compute_with

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MENDNetConfig:
    """The editor network (recorded in its checkpoint)."""

    rank: int = 1920  # the hidden layer's width (the original's)
    n_hidden: int = 1
    init_lr: float = 3e-4  # the edit learning rate each layer starts from
    norm_steps: int = 1000  # training batches that update the running statistics

    def __post_init__(self):
        if self.rank < 1 or self.n_hidden < 0 or self.init_lr <= 0 or self.norm_steps < 1:
            raise ValueError("mend needs rank >= 1, n_hidden >= 0, init_lr > 0 and norm_steps >= 1")


class RunningNorm(nn.Module):
    """Per-feature mean and standard deviation of the tokens seen in training (Welford)."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("count", torch.zeros(()))
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("m2", torch.zeros(dim))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:  # x: (N, dim)
        n = x.shape[0]
        if n == 0:
            return
        mean = x.mean(0)
        m2 = ((x - mean) ** 2).sum(0)
        total = self.count + n
        diff = mean - self.mean
        self.mean += diff * n / total
        self.m2 += m2 + diff ** 2 * self.count * n / total
        self.count.fill_(total)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.count < 2:
            return x
        std = (self.m2 / (self.count - 1)).clamp(min=1e-12).sqrt()
        return (x - self.mean) / (std + 1e-6)


class LowRankResidual(nn.Module):
    """x + W2 relu(W1 (x * scale_mode + shift_mode) + b1), W2 zero at first (the identity)."""

    def __init__(self, dim: int, rank: int, modes: int):
        super().__init__()
        self.down = nn.Linear(dim, rank)
        self.up = nn.Linear(rank, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.scale = nn.Parameter(torch.ones(modes, dim))
        self.shift = nn.Parameter(torch.zeros(modes, dim))

    def forward(self, x: torch.Tensor, mode: int) -> torch.Tensor:  # x: (N, dim)
        h = x * self.scale[mode] + self.shift[mode]
        return x + self.up(torch.relu(self.down(h)))


class GradientTransform(nn.Module):
    """(u, delta) -> (u~, delta~) for every layer of one shape (out, in)."""

    def __init__(self, out_dim: int, in_dim: int, cfg: MENDNetConfig, modes: int):
        super().__init__()
        self.in_dim = in_dim
        self.u_norm, self.d_norm = RunningNorm(in_dim), RunningNorm(out_dim)
        self.layers = nn.ModuleList(LowRankResidual(in_dim + out_dim, cfg.rank, modes) for _ in range(cfg.n_hidden))

    def forward(self, u: torch.Tensor, delta: torch.Tensor, mode: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([self.u_norm(u), self.d_norm(delta)], -1)  # (N, in + out)
        for layer in self.layers:
            x = layer(x, mode)
        return x[:, :self.in_dim], x[:, self.in_dim:]  # (N, in), (N, out)


class MENDNet(EditorNet):
    method = "mend"
    config_cls = MENDNetConfig
    train_defaults = {"lr": 1e-4, "c_edit": 0.2, "ema": 0.995}  # measured on SmolLM2 (benchmarks/trained_editors.py)

    def __init__(self, config: MENDNetConfig, shapes: Mapping[str, tuple[int, int]]):
        super().__init__(config, shapes)
        groups: dict[tuple[int, int], list[str]] = {}
        for module, shape in self.shapes.items():
            groups.setdefault(tuple(shape), []).append(module)
        self.group_of = {}  # module -> (transform key, mode)
        transforms = {}
        for (out_dim, in_dim), members in groups.items():
            key = f"{out_dim}x{in_dim}"
            transforms[key] = GradientTransform(out_dim, in_dim, config, len(members))
            self.group_of.update({m: (key, i) for i, m in enumerate(members)})
        self.transforms = nn.ModuleDict(transforms)
        self.index = {m: i for i, m in enumerate(self.shapes)}
        self.register_buffer("norm_batches", torch.zeros(()))

    def observe(self, factors: Mapping[str, Factors]) -> None:
        if self.norm_batches >= self.config.norm_steps:
            return
        for module, f in factors.items():
            t = self.transforms[self.group_of[module][0]]
            t.u_norm.update(f.u)
            t.d_norm.update(f.delta)
        self.norm_batches += 1

    def updates(self, factors: Mapping[str, Factors]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        result = {}
        for module, f in factors.items():
            key, mode = self.group_of[module]
            u, delta = self.transforms[key](f.u, f.delta, mode)  # (N, in), (N, out)
            lr = self.log_lrs[self.index[module]].exp()
            result[module] = (-lr * delta.T, u)  # B (out, N), A (N, in)
        return result


@dataclass(frozen=True)
class MENDConfig(TrainedEditConfig):
    """An edit with a trained MEND editor: `editor` names the checkpoint (default: the one
    `edit_serve train --method mend` cached for this model)."""


@editor("mend", MENDConfig)
def compute(ctx, requests, cfg: MENDConfig):
    """MEND: a trained editor network turns the fine-tuning gradient into a low-rank edit."""
    return compute_with(ctx, MENDNet, requests, cfg)
