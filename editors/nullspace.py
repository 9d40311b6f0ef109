"""AlphaEdit's null-space constraint (Fang et al., ICLR 2025), shared by ROME and MEMIT.

The key statistics C = E[k k^T] of a layer (editors.stats) describe the keys the model must
keep answering as before. Their eigenvectors whose eigenvalues fall below `threshold` span
the (approximate) null space of those keys; P = U U^T (in, in) projects onto it, so an update
dW = dW P leaves every preserved key's output unchanged. P is computed once per model, layer,
statistics and threshold, and cached in memory and on disk beside the statistics.

The keys of edits already on the model (Kp, (in, m)) are protected by a ridge term, as in the
paper (MEMIT's `spare_subjects` adds more keys to spare there); with the new edits' keys K
(in, n) and residuals R (out, n):
    dW = R (M^-1 P K)^T,   M = P (K K^T + Kp Kp^T) + l2 I        solved in float64
whose rows lie in the range of P (AlphaEdit's closed form); its rank is at most n.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from editors.files import save_tensors

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NullSpaceConfig:
    """threshold: eigenvalues of C below it count as null (the paper: 2e-2, on C normalized
    per token as here); l2: the ridge weight of the closed form."""

    threshold: float = 2e-2
    l2: float = 10.0

    def __post_init__(self):
        if self.threshold <= 0 or self.l2 < 0:
            raise ValueError("the null space needs threshold > 0 and l2 >= 0")


def null_projector(mom2: torch.Tensor, threshold: float) -> torch.Tensor:
    """P (in, in) float32 onto the span of the eigenvectors of C whose eigenvalues are below
    `threshold`."""
    values, vectors = torch.linalg.eigh(mom2.double())  # ascending; (in,), (in, in)
    null = vectors[:, values < threshold]  # (in, r)
    log.info("null space: %d of %d directions below %.3g (largest eigenvalue %.3g)", null.shape[1],
             len(values), threshold, float(values[-1]))
    return (null @ null.T).float()


def projector(ctx, layer: int, stats_cfg, threshold: float) -> torch.Tensor:
    """P for the MLP output projection of `layer`: from memory, else from the disk file beside
    the statistics, else computed from them and written there."""
    from editors.corpus import CorpusSpec
    from editors.stats import cache_file

    module = ctx.profile.mlp_out(layer)
    corpus_id = CorpusSpec(stats_cfg.corpus).ident()
    key = ("null-projector", module, corpus_id, stats_cfg.samples, stats_cfg.length, threshold)

    def make() -> torch.Tensor:
        mom2 = ctx.stats([layer], stats_cfg)[layer]
        path = _projector_file(cache_file(ctx.fingerprint, module, corpus_id, stats_cfg), threshold)
        if path.is_file():
            return load_file(str(path))["projector"].to(mom2.device)
        p = null_projector(mom2, threshold)
        save_tensors(path, {"projector": p.cpu().contiguous()}, metadata={"threshold": repr(threshold)})
        return p

    return ctx.cached(key, make)


def _projector_file(stats_file: Path, threshold: float) -> Path:
    return stats_file.with_name(stats_file.name.removesuffix(".safetensors") + f".null{threshold:g}.safetensors")


def constrained_update(keys: torch.Tensor, resid: torch.Tensor, proj: torch.Tensor,
                       prior_gram: torch.Tensor | None, l2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """AlphaEdit's closed form (module doc): keys (in, n), resid (out, n), proj (in, in),
    prior_gram (in, in) = Kp Kp^T of the keys to spare, or None -> (B (out, n), A (n, in))
    float32 with dW = B @ A."""
    p = proj.double()
    k = keys.double().to(p.device)
    cov = k @ k.T  # (in, in)
    if prior_gram is not None:
        cov = cov + prior_gram.double().to(p.device)
    m = p @ cov + l2 * torch.eye(p.shape[0], dtype=p.dtype, device=p.device)  # (in, in)
    a = torch.linalg.solve(m, p @ k)  # (in, n)
    return resid.float(), a.T.float().to(resid.device)


def constrained_direction(key: torch.Tensor, proj: torch.Tensor, prior_keys: torch.Tensor | None,
                          l2: float) -> torch.Tensor:
    """ROME's left vector under the constraint: u = (P Kp Kp^T + l2 I)^-1 P k (in,), in the
    range of P, small on the earlier edits' keys; ROME then scales the right vector so that
    the edited layer maps k exactly to v*."""
    p = proj.double()
    k = key.double().to(p.device)
    m = l2 * torch.eye(p.shape[0], dtype=p.dtype, device=p.device)  # (in, in)
    if prior_keys is not None and prior_keys.numel():
        kp = prior_keys.double().to(p.device)
        m = m + p @ (kp @ kp.T)
    return torch.linalg.solve(m, p @ k).cpu()  # (in,)
