"""MEMIT (Meng et al. 2023): many edits at once, spread over a range of MLP layers.

v*_i (editors.vstar) is computed for every edit in the residual stream after the LAST layer of
the range. Then, layer by layer from the first, with the updates of the earlier layers
overlaid (hooks, never written):
    K_l  (in, n)   the edits' keys at layer l (last subject token, averaged over templates)
    R_l  (out, n)  (v* - the current residual at the last layer) / (layers left)
    dW_l = R_l K_l^T (lambda C_l + K_l K_l^T)^-1      solved in float64
lambda = `mom2_update_weight` weighs how much the corpus keys C_l (editors.stats) resist the
change. Each dW_l has rank <= n and is stored as low-rank factors (dense when smaller); one
patch holds the whole batch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from editors.base import editor
from editors.common import delta_patch, low_rank, method_layers, mlp_out_weight, require_decoder_only
from editors.keys import CONTEXT_TEMPLATES, subject_io
from editors.nethook import AddToWeights
from editors.stats import StatsConfig, layer_stats
from editors.vstar import VStarConfig, compute_vstar

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MEMITConfig:
    layers: list[int] | None = None  # default: the profile's `memit`
    v_steps: int = 25
    v_lr: float = 0.5
    v_weight_decay: float = 0.5
    kl_factor: float = 0.0625
    clamp_norm_factor: float = 0.75
    mom2_update_weight: float = 15000.0
    v_chunk: int = 8  # edits whose v* are optimized in one batch
    stats_corpus: str = "model"
    stats_samples: int = StatsConfig.samples
    stats_length: int = StatsConfig.length

    def stats(self) -> StatsConfig:
        return StatsConfig(corpus=self.stats_corpus, samples=self.stats_samples, length=self.stats_length)

    def vstar(self) -> VStarConfig:
        return VStarConfig(steps=self.v_steps, lr=self.v_lr, weight_decay=self.v_weight_decay,
                           kl_factor=self.kl_factor, clamp_norm_factor=self.clamp_norm_factor, chunk=self.v_chunk)


@editor("memit", MEMITConfig)
def compute(model, tokenizer, profile, requests, cfg: MEMITConfig):
    """MEMIT: mass editing of a range of MLP output projections."""
    require_decoder_only(model, "memit")
    layers = method_layers(profile, "memit", cfg.layers)
    for layer in layers:
        mlp_out_weight(model, profile, layer)  # fail early on a bad profile
    mom2 = layer_stats(model, tokenizer, profile, layers, cfg.stats())
    z_module = profile.layer(layers[-1])
    vstar = compute_vstar(model, tokenizer, z_module, requests, CONTEXT_TEMPLATES, cfg.vstar())
    log.info("memit: v* for %d edits at %s, mean target NLL %.3f", len(requests), z_module, float(vstar.nll.mean()))
    return delta_patch("memit", spread(model, tokenizer, profile, requests, layers, vstar.target, mom2,
                                       cfg.mom2_update_weight))


def spread(model, tokenizer, profile, requests, layers: list[int], targets: torch.Tensor,
           mom2: dict[int, torch.Tensor], mom2_update_weight: float) -> dict[str, torch.Tensor]:
    """The patch tensors that move the residual after `layers[-1]` at each request's last
    subject token to `targets` (n, d), one update per layer (see the module doc)."""
    z_module = profile.layer(layers[-1])
    done: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # module -> (B (out, n), A (n, in))
    tensors = {}
    for i, layer in enumerate(tqdm(layers, desc="memit layers", unit="layer", disable=len(layers) < 2)):
        module = profile.mlp_out(layer)
        name, weight = mlp_out_weight(model, profile, layer)
        with AddToWeights(model, done):
            keys, _ = subject_io(model, tokenizer, module, requests, CONTEXT_TEMPLATES)  # (n, in)
            _, current = subject_io(model, tokenizer, z_module, requests, ("{}",))  # (n, d)
        c = mom2[layer].double()  # (in, in), on the model's device
        k = keys.double().T.to(c.device)  # (in, n)
        resid = (targets.double() - current.double()).T.to(c.device) / (len(layers) - i)  # (d, n)
        adj = torch.linalg.solve(mom2_update_weight * c + k @ k.T, k)  # (in, n)
        b, a = resid.float(), adj.T.float()  # (out, n), (n, in): dW = b @ a
        done[module] = (b.to(weight.device), a.to(weight.device))
        tensors.update(low_rank(name, b, a, weight))
        log.info("memit layer %d: |residual| %.3f, |dW| %.3f", layer, float(resid.norm(dim=0).mean()),
                 float((b @ a).norm()))
    return tensors
