"""CaliNET (Dong et al. 2022, "Calibrating Factual Knowledge in Pretrained Language Models"):
calibration memory slots, an FFN of small intermediate width beside the FFN of the last two
layers, out += act(x . K^T + b) V, trained on the edits while the base stays frozen.

All requests of a patch share its slots. Keys start random (scaled to the inputs' norm),
values at zero, so an untrained patch changes nothing. Adam minimises the NLL of the targets
(the prompts under the first `prompts` context templates of editors.keys) plus `kl_weight` x
the KL divergence from the unpatched model's next-token distribution at the scored positions
of the memory (editors.side: the active edits' prompts, the edit templates with other
subjects, neutral sentences). The patch holds one ffn_neurons module per layer, at the FFN
block (the profile's `mlp`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from tqdm import tqdm

from editors.base import editor
from editors.common import method_layers
from editors.keys import CONTEXT_TEMPLATES, check_templates, fitted
from editors.lm import logits_at, scored_positions, target_batch, target_nll
from editors.side import Neurons, attach_inputs, side_logits, side_patch, silent_rows, tail
from patches.side import module_dims

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CaliNETConfig:
    # Defaults: the first settings that reach reliability 1.00 on SmolLM2 (CounterFact, 10 records:
    # locality 0.44; README). Not swept yet.
    layers: list[int] | None = None  # default: the profile's `calinet` (the last two FFN layers)
    slots: int = 32  # calibration slots per layer
    activation: str = "gelu"
    prompts: int = 3  # context templates the edits are trained under
    steps: int = 40
    lr: float = 0.01
    kl_weight: float = 1.0
    kl_rows: int = 16  # memory rows (spread evenly over editors.side's memory) the KL term runs on
    stop_loss: float = 0.05
    seed: int = 0  # for the slots' random keys, so a patch is reproducible

    def __post_init__(self):
        check_templates("calinet", self.prompts, "prompts")
        if not 1 <= self.slots <= 4096:
            raise ValueError("calinet needs 1 <= slots <= 4096")
        if self.activation not in ("relu", "gelu", "silu"):
            raise ValueError(f"calinet activation must be relu, gelu or silu, not {self.activation!r}")
        if self.steps < 1 or self.lr <= 0 or self.kl_weight < 0 or self.kl_rows < 1:
            raise ValueError("calinet needs steps >= 1, lr > 0, kl_weight >= 0 and kl_rows >= 1")


def _slots(ctx, module: str, batch, cfg: CaliNETConfig, generator: torch.Generator) -> Neurons:
    """Random keys of the norm of the module's inputs on the edit prompts, zero values."""
    x = attach_inputs(ctx.model, module, batch)[batch.mask]  # (N, d_in)
    d_in, d_out = module_dims(ctx.model.get_submodule(module))
    keys = torch.randn(cfg.slots, d_in, generator=generator).to(x.device)
    keys = keys / keys.norm(dim=-1, keepdim=True) / x.norm(dim=-1).mean()  # pre-activations of order 1
    return Neurons(keys.requires_grad_(True), torch.zeros(cfg.slots, device=x.device, requires_grad=True),
                   torch.zeros(cfg.slots, d_out, device=x.device, requires_grad=True), cfg.activation)


@editor("calinet", CaliNETConfig, kind="side_module", rephrasings=True)
def compute(ctx, requests, cfg: CaliNETConfig):
    """CaliNET: calibration slots beside the last two FFN layers, trained on the edits."""
    model, tokenizer = ctx.model, ctx.tokenizer
    modules = [ctx.profile.mlp(layer) for layer in method_layers(ctx.profile, "calinet", cfg.layers)]
    rows = [(text, r.target_new) for r in requests for text, _ in fitted(r, CONTEXT_TEMPLATES[:cfg.prompts])]
    batch = target_batch(model, tokenizer, rows)
    at = scored_positions(batch)
    memory = list(dict.fromkeys(row for i, r in enumerate(requests)
                                for row in silent_rows(ctx, r, requests[:i] + requests[i + 1:])))
    kept = target_batch(model, tokenizer, memory[::max(1, len(memory) // cfg.kl_rows)][:cfg.kl_rows])
    kept_at = scored_positions(kept)
    with torch.no_grad():
        base = torch.log_softmax(logits_at(model, kept.inputs, *kept_at).float(), -1)  # (M, V)
    # replayed from the first attach layer on; the other layers' slots run as hooks there
    rest, kept_rest = tail(ctx, modules[0], batch, *at, {}), tail(ctx, modules[0], kept, *kept_at, {})
    generator = torch.Generator().manual_seed(cfg.seed)
    slots = {m: _slots(ctx, m, batch, cfg, generator) for m in modules}
    params = [p for s in slots.values() for p in s.params()]
    optimizer = torch.optim.Adam(params, lr=cfg.lr)
    bar = tqdm(range(cfg.steps), desc="calinet", leave=False, disable=None)
    for _ in bar:
        groups = {m: [s] for m, s in slots.items()}
        nll = target_nll(side_logits(model, rest, batch, *at, groups), batch).mean()
        logp = torch.log_softmax(side_logits(model, kept_rest, kept, *kept_at, groups).float(), -1)  # (M, V)
        kl = (base.exp() * (base - logp)).sum(-1).mean()
        bar.set_postfix(nll=f"{nll.item():.3f}", kl=f"{kl.item():.3f}")
        if nll.item() < cfg.stop_loss:
            break
        for p, g in zip(params, torch.autograd.grad(nll + cfg.kl_weight * kl, params)):
            p.grad = g  # through autograd.grad, so the model's own parameters collect no gradient
        optimizer.step()
    log.info("calinet on %s: edit loss %.4f, KL on %d memory positions %.4f", modules, nll.item(), len(base),
             kl.item())
    return side_patch("calinet", slots, {m: f"calinet_{i}" for i, m in enumerate(modules)})
