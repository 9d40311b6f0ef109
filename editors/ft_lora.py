"""FT-LoRA: fine-tuning low-rank adapters (PEFT's LoRA) on MLP output projections.

PEFT wraps each target module inside a private container, never inside the model: the model
keeps its modules, and while training, a self-removing hook routes the target's forward
through PEFT's `lora.Linear` (base output + B A x * scaling). The patch holds PEFT's delta
as low-rank factors: B' = lora_B * scaling (out, r), A' = lora_A (r, in).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass

import torch
from torch import nn

from editors.base import EditError, editor
from editors.common import delta_patch, low_rank, method_layers, mlp_out_weight
from editors.ft import finetune
from editors.nethook import get_module

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FTLoRAConfig:
    layers: list[int] | None = None  # default: the profile's `ft-lora`
    rank: int = 8
    alpha: float = 32.0
    dropout: float = 0.0  # 0 keeps patches reproducible (EasyEdit uses 0.1)
    steps: int = 70
    lr: float = 5e-3
    weight_decay: float = 0.0
    stop_loss: float = 1e-2
    batch_size: int = 64
    seed: int = 0  # PEFT's random init of lora_A

    def __post_init__(self):
        if self.rank < 1 or self.steps < 1 or self.lr <= 0 or not 0 <= self.dropout < 1:
            raise ValueError("ft-lora needs rank >= 1, steps >= 1, lr > 0 and 0 <= dropout < 1")


class RouteThrough(contextlib.AbstractContextManager):
    """While active (in this thread), the output of each module `name` is replaced by
    `wrappers[name](input)`; a wrapper that calls the module itself is not re-routed."""

    def __init__(self, model: nn.Module, wrappers: dict[str, nn.Module]):
        owner, inside = threading.get_ident(), threading.local()
        self._handles = []

        def make_hook(wrapper):
            def hook(module, args, output):
                if threading.get_ident() != owner or getattr(inside, "on", False):
                    return output
                inside.on = True
                try:
                    return wrapper(*args)
                finally:
                    inside.on = False

            return hook

        for name, wrapper in wrappers.items():
            self._handles.append(get_module(model, name).register_forward_hook(make_hook(wrapper)))

    def __exit__(self, exc_type, exc, tb):
        for handle in self._handles:
            handle.remove()
        return False


def wrap_lora(module: nn.Module, cfg: FTLoRAConfig) -> nn.Module:
    """PEFT's lora.Linear around `module` (which stays unchanged), built in a container."""
    from peft import LoraConfig, inject_adapter_in_model

    container = nn.ModuleDict({"target": module})
    flags = [(p, p.requires_grad) for p in module.parameters()]
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            inject_adapter_in_model(LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                               target_modules=["target"]), container)
    except ValueError as e:
        raise EditError(f"PEFT cannot put LoRA on {type(module).__name__}: {e}") from None
    finally:
        for p, flag in flags:  # PEFT freezes the base layer; give it back as it was
            p.requires_grad_(flag)
    wrapper = container["target"]
    ref = next(module.parameters())
    wrapper.to(device=ref.device)
    return wrapper


@editor("ft-lora", FTLoRAConfig, rephrasings=True)
def compute(ctx, requests, cfg: FTLoRAConfig):
    """FT-LoRA: low-rank adapters on MLP output projections, trained through PEFT."""
    model, tokenizer, profile = ctx.model, ctx.tokenizer, ctx.profile
    layers = method_layers(profile, "ft-lora", cfg.layers)
    wrappers, weights = {}, {}
    for layer in layers:
        name, weight = mlp_out_weight(model, profile, layer)
        module = profile.mlp_out(layer)
        wrappers[module] = wrap_lora(get_module(model, module), cfg)
        weights[module] = (name, weight)
    params = [p for w in wrappers.values() for n, p in w.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    loss = finetune(model, tokenizer, requests, params, lambda: RouteThrough(model, wrappers),
                    steps=cfg.steps, lr=cfg.lr, weight_decay=cfg.weight_decay, stop_loss=cfg.stop_loss,
                    batch_size=cfg.batch_size, objective="target")
    log.info("ft-lora on layers %s: final loss %.4f", layers, loss)
    tensors = {}
    for module, wrapper in wrappers.items():
        name, weight = weights[module]
        b = wrapper.lora_B["default"].weight.detach() * wrapper.scaling["default"]  # (out, r)
        a = wrapper.lora_A["default"].weight.detach()  # (r, in)
        tensors.update(low_rank(name, b, a, weight))
    return delta_patch("ft-lora", tensors)
