"""MEMIT (Meng et al. 2023): many edits at once, spread over a range of MLP layers.

v*_i (editors.vstar) is computed for every edit in the residual stream after the LAST layer of
the range. Then, layer by layer from the first, with the updates of the earlier layers
overlaid (hooks, never written):
    K_l  (in, n)   the edits' keys at layer l: the last subject token's MLP input, a weighted
                   mean of the bare prompt's key (weight `prompt_key_weight`) and the
                   context templates' mean key
    R_l  (out, n)  (v* - the current residual at the last layer) / (layers left)
    dW_l = R_l K_l^T (lambda C_l + K_l K_l^T)^-1      solved in float64
lambda = `mom2_update_weight` weighs how much the corpus keys C_l (editors.stats) resist the
change.

Two settings differ from the paper's GPT-J values, chosen by measurement on SmolLM2-135M
(CounterFact, batches of 30; see the profile): lambda = 200 (15,000 underfits: reliability
0.12; 1,000: 0.80) and prompt_key_weight = 0.5. The original averages the key over the
templates with equal weights (1/11 for the bare prompt); most CounterFact prompts start with
the subject, and on a Llama-family model the first position's activations are outliers, so a
single-token subject's bare-prompt key lies far from its templated keys and the update missed
it (reliability 0.85 at lambda 200); weighting the bare key by 1/2 gives 1.00 with generality
0.71 and locality 0.92. Each dW_l has rank <= n and is stored as low-rank factors (dense when smaller); one
patch holds the whole batch.

v* runs with lr 1.0 and stops a request once its target NLL is below 0.05 (the paper: lr 0.5,
all 25 steps): on the first 100 CounterFact records as one batch that takes 11 steps per
request on average instead of 22, half the editing time, and the figures move by less than
0.01 (reliability 0.965 -> 0.957, generality 0.598 -> 0.606, locality 0.860 -> 0.866;
benchmarks/results/editing.md, memit[vfast]). The same settings on ROME's single edits cost
0.018 generality (rome[vfast]), so ROME keeps the paper's.

v*'s search runs in bfloat16 after its first step where the hardware does bfloat16 matrix
products (`v_dtype` "auto", editors.precision): on the first 100 CounterFact records as one
batch the figures stay 0.957 / 0.606 / 0.868 (float32: 0.957 / 0.606 / 0.866; memit[bf16]).

With `null_space=True` (AlphaEdit, editors.nullspace; the method `alphaedit` turns it on) the
solve becomes dW_l = R_l (M^-1 P_l K_l)^T, M = P_l (K_l K_l^T + Kp Kp^T) + l2 I: the update lies
in the null space P_l of the corpus keys and spares the keys Kp of the edits already active
on the model (kept from when they were made, or recomputed from their requests).

With `protect_edits=g` (and no null space) those keys join the statistics instead, as in
rome: dW_l = R_l K_l^T (lambda (C_l + g Kp Kp^T) + K_l K_l^T)^-1.

With `spare_subjects=w` the keys at every token of each edit's prompt and target with other
subjects in the subject's place (editors.keys.OTHER_SUBJECTS) join the spared keys with weight
w: Kp Kp^T + w Ks Ks^T in AlphaEdit's M, C_l + w Ks Ks^T in MEMIT's solve. The edit's prompt
about anything else is what the edit should not move.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch
from tqdm.auto import tqdm

from editors.base import editor
from editors.common import delta_patch, low_rank, method_layers, mlp_out_weight, require_decoder_only
from editors.keys import CONTEXT_TEMPLATES, Replay, edit_keys, mix_keys, other_subject_grams, subject_io
from editors.nethook import AddToWeights
from editors.nullspace import constrained_update, projector
from editors.stats import shrunk_mom2
from editors.vstar import KeyValueConfig, VStarConfig, compute_vstar

log = logging.getLogger(__name__)

#: the most key rows (requests x templates) whose hidden states below the first layer are kept
#: between the layers' passes (about 0.5 GB on SmolLM2; a larger batch runs those blocks again)
REPLAY_ROWS = 20_000


@dataclass(frozen=True)
class MEMITConfig(KeyValueConfig):
    method: ClassVar[str] = "memit"

    layers: list[int] | None = None  # default: the profile's `memit`
    v_steps: int = 25
    v_lr: float = 1.0  # with v_stop_nll 0.05: 11 steps on average, not 22 (module doc)
    v_stop_nll: float = 0.05
    clamp_norm_factor: float = 0.75
    mom2_update_weight: float = 200.0  # the paper's GPT-J: 15000 (see the module doc)
    prompt_key_weight: float = 0.5  # the paper: 1 / number of templates (see the module doc)
    v_chunk: int = 8  # edits whose v* are optimized in one batch
    # weight of the edits' prompts about other subjects among the keys to spare (module doc)
    spare_subjects: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        if self.mom2_update_weight < 0 or self.v_chunk < 1 or self.spare_subjects < 0:
            raise ValueError(f"{self.method} needs mom2_update_weight >= 0, v_chunk >= 1 and spare_subjects >= 0")

    def vstar(self, chunk: int | None = None) -> VStarConfig:
        return super().vstar(self.v_chunk if chunk is None else chunk)


@editor("memit", MEMITConfig, rephrasings=True)
def compute(ctx, requests, cfg: MEMITConfig):
    """MEMIT: mass editing of a range of MLP output projections."""
    return edit(ctx, requests, cfg, "memit")


def edit(ctx, requests, cfg: MEMITConfig, method: str):
    """The patch of MEMIT (or AlphaEdit, `cfg.null_space`) for `requests`."""
    model, tokenizer, profile = ctx.model, ctx.tokenizer, ctx.profile
    require_decoder_only(model, method)
    layers = method_layers(profile, method, cfg.layers)
    for layer in layers:
        mlp_out_weight(model, profile, layer)  # fail early on a bad profile
    z_module = profile.layer(layers[-1])
    vstar = compute_vstar(model, tokenizer, z_module, requests, cfg.templates(), cfg.vstar(), memo=ctx.part)
    log.info("%s: v* for %d edits at %s, mean target NLL %.3f after %.1f steps on average", method, len(requests),
             z_module, float(vstar.nll.mean()), float(vstar.steps.float().mean()))
    return delta_patch(method, spread(ctx, requests, layers, vstar.target, cfg))


def _solver(ctx, layer: int, module: str, spare: torch.Tensor | None, cfg: MEMITConfig):
    """(keys (in, n), resid (out, n)) -> (B, A) for one layer: MEMIT's covariance-weighted
    solve, or AlphaEdit's null-space one, each sparing the keys `spared_gram` names."""
    gram = spared_gram(ctx, module, spare, cfg)
    if cfg.null_space:
        proj = projector(ctx, layer, cfg.stats(), cfg.null_threshold)
        return lambda k, resid: constrained_update(k, resid, proj, gram, cfg.null_l2)
    s = cfg.stats()
    c = shrunk_mom2(ctx, layer, s)  # (in, in), on the model's device
    if gram is not None:
        c = c + gram.to(c.device)

    def solve(k, resid):
        k = k.double().to(c.device)
        adj = torch.linalg.solve(cfg.mom2_update_weight * c + k @ k.T, k)  # (in, n)
        return resid.float(), adj.T.float()  # (out, n), (n, in)

    return solve


def spared_gram(ctx, module: str, spare: torch.Tensor | None, cfg: MEMITConfig) -> torch.Tensor | None:
    """The (in, in) float64 sum of k k^T over the keys the update at `module` must leave alone
    besides general text's, each weighed (module doc): those of the edits already active (with
    AlphaEdit, or `protect_edits`) and, given as `spare`, the edits' prompts about other
    subjects (`spare_subjects`); None when there are none."""
    gram = None
    if cfg.null_space or cfg.protect_edits:
        active = ctx.active_keys(module, lambda reqs: edit_keys(ctx.model, ctx.tokenizer, module, reqs))
        if active is not None:
            kp = torch.cat([active["prompt"], active["templates"]]).double()  # (2m, in)
            gram = (1.0 if cfg.null_space else cfg.protect_edits) * (kp.T @ kp)
    if spare is not None:
        spare = cfg.spare_subjects * spare
        gram = spare if gram is None else gram + spare
    return gram


def spread(ctx, requests, layers: list[int], targets: torch.Tensor, cfg: MEMITConfig) -> dict[str, torch.Tensor]:
    """The patch tensors that move the residual after `layers[-1]` at each request's last
    subject token to `targets` (n, d), one update per layer (see the module doc)."""
    model, tokenizer, profile = ctx.model, ctx.tokenizer, ctx.profile
    z_module = profile.layer(layers[-1])
    modules = {layer: profile.mlp_out(layer) for layer in layers}
    spare = (other_subject_grams(ctx, [modules[layer] for layer in sorted(layers)], requests)  # one pass for all
             if cfg.spare_subjects else {})
    ctx.stats(layers, cfg.stats())  # every layer's missing statistics in one pass, not one pass per layer
    solvers = {layer: _solver(ctx, layer, m, spare.get(m), cfg) for layer, m in modules.items()}
    done: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # module -> (B (out, n), A (n, in))
    tensors = {}
    # below the first layer nothing changes between the layers' passes: run it once (bounded memory)
    bounded = len(requests) * len(CONTEXT_TEMPLATES) <= REPLAY_ROWS
    key_replay, current_replay = (Replay(model, profile.mlp_out(layers[0])) if bounded else None for _ in range(2))
    for i, layer in enumerate(tqdm(layers, desc="memit layers", unit="layer", disable=len(layers) < 2)):
        module = profile.mlp_out(layer)
        name, weight = mlp_out_weight(model, profile, layer)
        with AddToWeights(model, done):
            keys = edit_keys(model, tokenizer, module, requests, key_replay)  # {kind: (n, in)}
            _, current = subject_io(model, tokenizer, z_module, requests, ("{}",), current_replay)  # (n, d)
        ctx.remember_keys(module, keys)
        k = mix_keys(keys, cfg.prompt_key_weight).T  # (in, n)
        resid = (targets.double() - current.double()).T / (len(layers) - i)  # (d, n)
        b, a = solvers[layer](k, resid)  # (out, n), (n, in): dW = b @ a
        done[module] = (b.to(weight.device), a.to(weight.device))
        tensors.update(low_rank(name, b, a, weight))
        log.info("memit layer %d: |residual| %.3f, |dW| %.3f", layer, float(resid.norm(dim=0).mean()),
                 float((b.cpu() @ a.cpu()).norm()))
    return tensors
