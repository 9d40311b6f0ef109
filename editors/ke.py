"""KE: Knowledge Editor (De Cao et al. 2021), in the form Mitchell et al. re-implemented and
the survey ran on GPT-J: a hypernetwork conditioned on the edit predicts the weight update
from the fine-tuning gradient.

The edit's text (prompt and new target) is read by a bidirectional LSTM over the model's own
(frozen) token embeddings; its final states are the condition c. For each edited weight W
(out, in) a conditioner MLP maps c to vectors alpha (out), beta (in), gamma (out), eta (in) and
a scalar s, and the update of request i is

    delta W_i = -lr_l * sigmoid(s_i) * (G_i * (alpha_i beta_i^T) + gamma_i eta_i^T)

with G_i = sum_t delta_t u_t^T the request's gradient (editors.trained.grad_factors), beta and
eta softmaxes scaled to mean 1, and lr_l a learned scale per layer. Because G_i's Hadamard
product with a rank-one matrix is sum_t (alpha*delta_t)(beta*u_t)^T, the update is low rank
(tokens + 1 per request) and the patch is an ordinary format-1 low-rank delta. Trained with
the same loop and losses as MEND (editors.training); alpha starts near 1, so an untrained KE
is a scaled fine-tuning step.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from editors.base import editor
from editors.trained import EditorNet, Factors, TrainedEditConfig, compute_with


@dataclass(frozen=True)
class KENetConfig:
    """The hypernetwork (recorded in its checkpoint)."""

    embed_dim: int = 576  # the model's token embedding width (set by training from the model)
    lstm_hidden: int = 128  # per direction; the condition is 2x this
    hidden: int = 128  # the conditioners' hidden width
    init_lr: float = 0.1  # the update's scale each layer starts from

    def __post_init__(self):
        if min(self.embed_dim, self.lstm_hidden, self.hidden) < 1 or self.init_lr <= 0:
            raise ValueError("ke needs positive widths and init_lr > 0")


class Conditioner(nn.Module):
    """c (B, C) -> alpha (B, out), beta (B, in), gamma (B, out), eta (B, in), scale (B,)."""

    def __init__(self, cond_dim: int, hidden: int, out_dim: int, in_dim: int):
        super().__init__()
        self.sizes = [out_dim, in_dim, out_dim, in_dim, 1]
        self.net = nn.Sequential(nn.Linear(cond_dim, hidden), nn.Tanh(), nn.Linear(hidden, sum(self.sizes)))
        nn.init.normal_(self.net[2].weight, std=1e-3)
        nn.init.zeros_(self.net[2].bias)

    def forward(self, c: torch.Tensor):
        alpha, beta, gamma, eta, s = self.net(c).split(self.sizes, -1)
        in_dim = beta.shape[-1]
        return (1 + alpha, beta.softmax(-1) * in_dim, gamma, eta.softmax(-1) * in_dim, torch.sigmoid(s[:, 0]))


class KENet(EditorNet):
    method = "ke"
    config_cls = KENetConfig
    train_defaults = {"lr": 3e-4, "c_edit": 0.2}  # measured on SmolLM2 (benchmarks/trained_editors.py)

    def __init__(self, config: KENetConfig, shapes: Mapping[str, tuple[int, int]]):
        super().__init__(config, shapes)
        self.lstm = nn.LSTM(config.embed_dim, config.lstm_hidden, batch_first=True, bidirectional=True)
        self.conditioners = nn.ModuleList(
            Conditioner(2 * config.lstm_hidden, config.hidden, out_dim, in_dim)
            for out_dim, in_dim in self.shapes.values())

    @classmethod
    def model_defaults(cls, model) -> dict:
        return {"embed_dim": model.get_input_embeddings().embedding_dim}

    def condition(self, text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, T, d) embeddings, (B, T) mask -> (B, 2h) the final states of both directions."""
        lengths = mask.sum(1).clamp(min=1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(text, lengths, batch_first=True, enforce_sorted=False)
        _, (h, _) = self.lstm(packed)  # h: (2, B, hidden)
        return torch.cat([h[0], h[1]], -1)

    def updates(self, factors: Mapping[str, Factors]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        first = next(iter(factors.values()))
        c = self.condition(first.text, first.text_mask)  # (B, 2h)
        result = {}
        for i, module in enumerate(self.shapes):
            f = factors[module]
            alpha, beta, gamma, eta, s = self.conditioners[i](c)  # (B, out), (B, in), (B, out), (B, in), (B,)
            scale = -self.log_lrs[i].exp() * s  # (B,)
            b_grad = (alpha[f.row] * f.delta) * scale[f.row, None]  # (N, out)
            a_grad = beta[f.row] * f.u  # (N, in)
            b = torch.cat([b_grad, gamma * scale[:, None]]).T  # (out, N + B)
            a = torch.cat([a_grad, eta])  # (N + B, in)
            result[module] = (b, a)
        return result

    def owners(self, factors: Mapping[str, Factors]) -> dict[str, torch.Tensor]:
        """The token columns' requests, then one column per request (its gamma eta^T)."""
        first = next(iter(factors.values()))
        rest = torch.arange(first.n_requests, device=first.row.device)
        return {m: torch.cat([f.row, rest]) for m, f in factors.items()}


@dataclass(frozen=True)
class KEConfig(TrainedEditConfig):
    """An edit with a trained KE hypernetwork: `editor` names the checkpoint (default: the one
    `edit_serve train --method ke` cached for this model)."""


@editor("ke", KEConfig)
def compute(ctx, requests, cfg: KEConfig):
    """KE: a hypernetwork conditioned on the edit turns the fine-tuning gradient into a low-rank edit."""
    return compute_with(ctx, KENet, requests, cfg)
