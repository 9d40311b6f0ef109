"""ROME (Meng et al. 2022): a rank-one update of one MLP output projection W.

key   k* = W's input at the last subject token, averaged over the context templates
value v* = the output there that makes the new target likely (editors.vstar)
u     = C^-1 k* / |C^-1 k*|, C = E[k k^T] over a corpus (editors.stats)
dW    = (v* - W k) u^T / (u . k), with k, W k at the bare prompt (as the original code does),
        so the edited layer maps k exactly to v*.

Several requests are edited one after another, each on top of the previous ones (the
previous deltas are overlaid with hooks, never written), giving one patch of rank n.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from editors.base import EditError, editor
from editors.common import delta_patch, low_rank, method_layers, mlp_out_weight, require_decoder_only
from editors.keys import CONTEXT_TEMPLATES, subject_io
from editors.nethook import AddToWeights
from editors.stats import StatsConfig, layer_stats
from editors.vstar import VStarConfig, compute_vstar

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ROMEConfig:
    layers: list[int] | None = None  # one layer; default: the profile's `rome`
    v_steps: int = 20
    v_lr: float = 0.5
    v_weight_decay: float = 0.5
    kl_factor: float = 0.0625
    clamp_norm_factor: float = 4.0
    mom2_adjustment: bool = True  # False: u = k* (no covariance)
    stats_corpus: str = StatsConfig.corpus
    stats_samples: int = StatsConfig.samples
    stats_length: int = StatsConfig.length

    def stats(self) -> StatsConfig:
        return StatsConfig(corpus=self.stats_corpus, samples=self.stats_samples, length=self.stats_length)

    def vstar(self) -> VStarConfig:
        return VStarConfig(steps=self.v_steps, lr=self.v_lr, weight_decay=self.v_weight_decay,
                           kl_factor=self.kl_factor, clamp_norm_factor=self.clamp_norm_factor, chunk=1)


def rank_one(model, tokenizer, profile, layer: int, request, cfg: ROMEConfig,
             mom2: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(right (out,), left (in,)) with dW = right left^T, for one request on the model as it
    currently runs (with any overlays active)."""
    module = profile.mlp_out(layer)
    k_avg, _ = subject_io(model, tokenizer, module, [request], CONTEXT_TEMPLATES)  # (1, in)
    k_avg = k_avg[0].double()
    if mom2 is not None:
        u = torch.linalg.solve(mom2.double(), k_avg.to(mom2.device)).cpu()  # (in,) C^-1 k*
    else:
        u = k_avg.clone()
    u = u / u.norm()
    vstar = compute_vstar(model, tokenizer, module, [request], CONTEXT_TEMPLATES, cfg.vstar())
    k, w_k = subject_io(model, tokenizer, module, [request], ("{}",))  # (1, in), (1, out)
    right = (vstar.target[0].double() - w_k[0].double()) / torch.dot(k[0].double(), u)  # (out,)
    log.info("rome %r -> %r at layer %d: target NLL %.3f, |dv| %.3f", request.text, request.target_new, layer,
             float(vstar.nll[0]), float((vstar.target[0] - vstar.init[0]).norm()))
    return right.float(), u.float()


@editor("rome", ROMEConfig)
def compute(model, tokenizer, profile, requests, cfg: ROMEConfig):
    """ROME: rank-one model editing of one MLP output projection."""
    require_decoder_only(model, "rome")
    (layer,) = _one_layer(profile, cfg)
    name, weight = mlp_out_weight(model, profile, layer)
    mom2 = layer_stats(model, tokenizer, profile, [layer], cfg.stats())[layer] if cfg.mom2_adjustment else None
    rights, lefts = [], []
    for request in requests:
        device = weight.device
        previous = {profile.mlp_out(layer): (torch.stack(rights, 1).to(device), torch.stack(lefts).to(device))} \
            if rights else {}
        with AddToWeights(model, previous):
            right, left = rank_one(model, tokenizer, profile, layer, request, cfg, mom2)
        rights.append(right)
        lefts.append(left)
    b, a = torch.stack(rights, 1), torch.stack(lefts)  # (out, n), (n, in)
    return delta_patch("rome", low_rank(name, b, a, weight))


def _one_layer(profile, cfg) -> list[int]:
    layers = method_layers(profile, "rome", cfg.layers)
    if len(layers) != 1:
        raise EditError(f"rome edits exactly one layer; got {layers} (use memit for several)")
    return layers
