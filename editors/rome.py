"""ROME (Meng et al. 2022): a rank-one update of one MLP output projection W.

key   k* = W's input at the last subject token, averaged over the context templates
value v* = the output there that makes the new target likely (editors.vstar)
u     = C^-1 k* / |C^-1 k*|, C = E[k k^T] over a corpus (editors.stats)
dW    = (v* - W k) u^T / (u . k), so the edited layer maps k exactly to v*.

Which k: the original code (and `same_key=False`) takes u from the template-averaged key but
k, W k from the bare prompt; Gupta et al. 2024 ("Rebuilding ROME", r-ROME) trace sequential
ROME's collapse to that mismatch. With `same_key=True` one key is used on both sides: a mix
of the bare prompt's key (weight `prompt_key_weight`) and the templates' mean.

With `null_space=True` (AlphaEdit, editors.nullspace) u is taken in the null space of the
preserved keys and away from the keys of the edits already on the model (the active patches'
and the earlier requests of this patch): u = (P Kp Kp^T + l2 I)^-1 P k.

With `protect_edits=g` (and no null space) those keys join the statistics instead:
u = (C + g Kp Kp^T)^-1 k, ROME's own direction made blind to the earlier edits. Measured on
the first 100 CounterFact subjects of SmolLM2 at layer 3 (each u normalized to u.k = 1): with
g = 0.1 the later edits move the earlier ones' keys by 0.007 in sum (plain ROME: 1.94; the
null space at threshold 0.02 with l2 = 10: 0.45), while general text (sqrt(u^T C u): 0.0128
against ROME's 0.0122) and the neighbourhood prompts' keys are hit as much as by plain ROME.

v*'s search runs in bfloat16 after its first step where the hardware does bfloat16 matrix
products (`v_dtype` "auto", editors.precision): on the first 100 CounterFact records of
SmolLM2 reliability / generality / locality / portability went from 0.970 / 0.641 / 0.951 /
0.294 to 0.970 / 0.651 / 0.952 / 0.282 (benchmarks/results/editing.md, rome[bf16]), each
step about 1.6 times faster on an AVX512-BF16 CPU.

Several requests are edited one after another, each on top of the previous ones (the
previous deltas are overlaid with hooks, never written), giving one patch of rank n.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch

from editors.base import EditError, editor
from editors.common import delta_patch, low_rank, method_layers, mlp_out_weight, require_decoder_only
from editors.keys import CONTEXT_TEMPLATES, edit_keys, mix_keys, subject_values
from editors.nethook import AddToWeights
from editors.nullspace import constrained_direction, projector
from editors.stats import mom2_key, mom2_lu, shrunk_mom2
from editors.vstar import KeyValueConfig, compute_vstar

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ROMEConfig(KeyValueConfig):
    method: ClassVar[str] = "rome"

    layers: list[int] | None = None  # one layer; default: the profile's `rome`
    mom2_adjustment: bool = True  # False: u = k* (no covariance)
    same_key: bool = False  # r-ROME: the same key on both sides of the update (module doc)
    prompt_key_weight: float = 0.0  # with same_key: weight of the bare prompt's key in k


def rank_one(ctx, layer: int, request, cfg: ROMEConfig, left_of, prior: torch.Tensor | None
             ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """(right (out,), left (in,), keys) with dW = right left^T, for one request on the model
    as it currently runs (with any overlays active); `left_of(k, prior)` gives u's direction."""
    model, tokenizer = ctx.model, ctx.tokenizer
    module = ctx.profile.mlp_out(layer)
    found = subject_values(model, tokenizer, module, [request], CONTEXT_TEMPLATES)
    k_avg, out_avg, k_bare, out_bare = found.key, found.out, found.first_key, found.first_out  # (1, in), (1, out)
    keys = {"prompt": k_bare, "templates": k_avg}
    vstar = compute_vstar(model, tokenizer, module, [request], cfg.templates(), cfg.vstar())
    if cfg.same_key:
        w = cfg.prompt_key_weight
        k = mix_keys(keys, w)[0].double()  # (in,)
        w_k = (w * out_bare + (1 - w) * out_avg)[0].double()  # (out,) W k (+ bias), W linear
        v = w_k + (vstar.target[0] - vstar.init[0]).double()  # the same shift as at the bare prompt
        u = left_of(k, prior)
    else:
        k, w_k, v = k_bare[0].double(), out_bare[0].double(), vstar.target[0].double()
        u = left_of(k_avg[0].double(), prior)
    u = u / u.norm()
    right = (v - w_k) / torch.dot(k, u)  # (out,)
    log.info("rome %r -> %r at layer %d: target NLL %.3f after %d passes, |dv| %.3f, u.k %.3g", request.text,
             request.target_new, layer, float(vstar.nll[0]), int(vstar.steps[0]),
             float((vstar.target[0] - vstar.init[0]).norm()), float(torch.dot(k, u)))
    return right.float(), u.float(), keys


@editor("rome", ROMEConfig, rephrasings=True)
def compute(ctx, requests, cfg: ROMEConfig):
    """ROME: rank-one model editing of one MLP output projection."""
    model, profile = ctx.model, ctx.profile
    require_decoder_only(model, "rome")
    (layer,) = _one_layer(profile, cfg)
    name, weight = mlp_out_weight(model, profile, layer)
    module = profile.mlp_out(layer)
    left_of = _left_vector(ctx, layer, cfg)
    prior = None
    if cfg.null_space or cfg.protect_edits:
        active = ctx.active_keys(module, lambda reqs: edit_keys(model, ctx.tokenizer, module, reqs))
        prior = _protected(active)
    rights, lefts, made = [], [], []
    for request in requests:
        device = weight.device
        previous = {module: (torch.stack(rights, 1).to(device), torch.stack(lefts).to(device))} if rights else {}
        with AddToWeights(model, previous):
            right, left, keys = rank_one(ctx, layer, request, cfg, left_of, prior)
        rights.append(right)
        lefts.append(left)
        made.append(keys)
        if cfg.null_space or cfg.protect_edits:
            prior = _protected(keys) if prior is None else torch.cat([prior, _protected(keys)], 1)
    ctx.remember_keys(module, {kind: torch.cat([m[kind] for m in made]) for kind in made[0]})
    b, a = torch.stack(rights, 1), torch.stack(lefts)  # (out, n), (n, in)
    return delta_patch("rome", low_rank(name, b, a, weight))


def _protected(keys: dict[str, torch.Tensor] | None) -> torch.Tensor | None:
    """The keys an update must leave alone, as columns: (in, 2m) (bare and templated)."""
    return None if keys is None else torch.cat([keys["prompt"], keys["templates"]]).T


def _left_vector(ctx, layer: int, cfg: ROMEConfig):
    """u's direction for a key: C^-1 k (C's LU factors cached per model), k, the null-space
    direction, or (C + g Kp Kp^T)^-1 k with the earlier edits' keys Kp protected."""
    if cfg.null_space:
        proj = projector(ctx, layer, cfg.stats(), cfg.null_threshold)
        return lambda k, prior: constrained_direction(k, proj, prior, cfg.null_l2)
    if not cfg.mom2_adjustment:
        return lambda k, prior: k.clone()
    s = cfg.stats()
    if cfg.protect_edits:
        c = ctx.cached(("mom2-shrunk", *mom2_key(ctx, layer, s)), lambda: shrunk_mom2(ctx, layer, s))

        def protected(k, prior):
            m = c
            if prior is not None:
                kp = prior.double().to(c.device)  # (in, 2m)
                m = c + cfg.protect_edits * (kp @ kp.T)
            return torch.linalg.solve(m, k.to(c.device)[:, None])[:, 0].cpu()  # (C + g Kp Kp^T)^-1 k

        return protected
    lu, pivots = mom2_lu(ctx, layer, s)
    return lambda k, prior: torch.linalg.lu_solve(lu, pivots, k.to(lu.device)[:, None])[:, 0].cpu()  # C^-1 k


def _one_layer(profile, cfg) -> list[int]:
    layers = method_layers(profile, "rome", cfg.layers)
    if len(layers) != 1:
        raise EditError(f"rome edits exactly one layer; got {layers} (use memit for several)")
    return layers
