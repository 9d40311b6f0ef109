"""Side modules: small trained modules that a patch adds next to a model's own, attached as
forward hooks on a named module (T-Patcher's extra FFN neurons, CaliNET's calibration slots).

A side-module type is registered by name; it declares the tensors it needs, checks them
against the module it attaches to, and builds an `nn.Module` whose output is ADDED to the
attach point's output. Weights of the model are never touched, so detaching is exact.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from patches.errors import PatchError

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": torch.relu,
    "gelu": nn.functional.gelu,
    "silu": nn.functional.silu,
}


@dataclass(frozen=True)
class SideModuleType:
    """How to check and build one kind of side module.

    `check_structure(tensors, config)` checks what needs no model (ranks, config types);
    `check(tensors, config, d_in, d_out)` checks the widths against the attach point."""

    name: str
    tensors: tuple[str, ...]
    check_structure: Callable[[Mapping[str, torch.Tensor], dict], None]
    check: Callable[[Mapping[str, torch.Tensor], dict, int, int], None]
    build: Callable[[Mapping[str, torch.Tensor], dict], nn.Module]


SIDE_MODULE_TYPES: dict[str, SideModuleType] = {}


def register_side_module(kind: SideModuleType) -> SideModuleType:
    if kind.name in SIDE_MODULE_TYPES:
        raise ValueError(f"side-module type {kind.name!r} is already registered")
    SIDE_MODULE_TYPES[kind.name] = kind
    return kind


def side_module_type(name: str) -> SideModuleType:
    try:
        return SIDE_MODULE_TYPES[name]
    except (KeyError, TypeError):
        raise PatchError(
            f"unknown side-module type {name!r}; known: {', '.join(sorted(SIDE_MODULE_TYPES))}"
        ) from None


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise PatchError(message)


# --- bias: the simplest side module; adds a learned vector to a module's output ----------


class AddBias(nn.Module):
    def __init__(self, bias: torch.Tensor):
        super().__init__()
        self.bias = nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, d_in) -> (d_out,)
        return self.bias.to(x.dtype)


def _check_bias(t: Mapping[str, torch.Tensor], config: dict, d_in: int, d_out: int) -> None:
    bias = t["bias"]
    _require(bias.dim() == 1 and bias.shape[0] == d_out,
             f"side module 'bias' needs bias of shape [{d_out}], got {list(bias.shape)}")


def _bias_structure(t: Mapping[str, torch.Tensor], config: dict) -> None:
    _require(t["bias"].dim() == 1, f"side module 'bias' needs a 1-D bias, got {list(t['bias'].shape)}")


register_side_module(SideModuleType("bias", ("bias",), _bias_structure, _check_bias, lambda t, c: AddBias(t["bias"])))


# --- ffn_neurons: extra key/value neurons in an FFN (T-Patcher, CaliNET) ------------------


def ffn_neurons(x: torch.Tensor, keys: torch.Tensor, key_bias: torch.Tensor, values: torch.Tensor,
                activation: str = "relu", scale: float = 1.0) -> torch.Tensor:
    """scale * act(x @ keys.T + key_bias) @ values in float32, cast back to x's dtype; the
    function editors train through and `FFNNeurons` runs.  # (B, T, d_in) -> (B, T, d_out)"""
    a = ACTIVATIONS[activation](x.float() @ keys.float().T + key_bias.float())  # (B, T, n)
    return (scale * (a @ values.float())).to(x.dtype)


class FFNNeurons(nn.Module):
    """out = scale * act(x @ keys.T + key_bias) @ values, added to the FFN's output."""

    def __init__(self, keys: torch.Tensor, key_bias: torch.Tensor, values: torch.Tensor,
                 activation: str, scale: float):
        super().__init__()
        self.keys = nn.Parameter(keys, requires_grad=False)  # (n, d_in)
        self.key_bias = nn.Parameter(key_bias, requires_grad=False)  # (n,)
        self.values = nn.Parameter(values, requires_grad=False)  # (n, d_out)
        self.activation = activation
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, d_in) -> (B, T, d_out)
        return ffn_neurons(x, self.keys, self.key_bias, self.values, self.activation, self.scale)


MAX_SCALE = 1e3


def _ffn_structure(t: Mapping[str, torch.Tensor], config: dict) -> None:
    keys, bias, values = t["keys"], t["key_bias"], t["values"]
    _require(keys.dim() == 2 and keys.shape[0] >= 1,
             f"ffn_neurons keys must be [n, d_in] with n >= 1, got {list(keys.shape)}")
    n = keys.shape[0]
    _require(bias.shape == (n,), f"ffn_neurons key_bias must be [{n}], got {list(bias.shape)}")
    _require(values.dim() == 2 and values.shape[0] == n,
             f"ffn_neurons values must be [{n}, d_out], got {list(values.shape)}")
    act = config.get("activation", "relu")
    _require(isinstance(act, str) and act in ACTIVATIONS,
             f"ffn_neurons activation {act!r} unknown; use one of {sorted(ACTIVATIONS)}")
    scale = config.get("scale", 1.0)
    _require(isinstance(scale, (int, float)) and not isinstance(scale, bool) and abs(scale) <= MAX_SCALE,
             f"ffn_neurons scale must be a number of magnitude at most {MAX_SCALE:g}")


def _check_ffn(t: Mapping[str, torch.Tensor], config: dict, d_in: int, d_out: int) -> None:
    _ffn_structure(t, config)
    keys, values = t["keys"], t["values"]
    _require(keys.shape[1] == d_in, f"ffn_neurons keys must be [n, {d_in}], got {list(keys.shape)}")
    _require(values.shape[1] == d_out,
             f"ffn_neurons values must be [{keys.shape[0]}, {d_out}], got {list(values.shape)}")


def _build_ffn(t: Mapping[str, torch.Tensor], config: dict) -> nn.Module:
    return FFNNeurons(t["keys"], t["key_bias"], t["values"],
                      config.get("activation", "relu"), float(config.get("scale", 1.0)))


register_side_module(SideModuleType("ffn_neurons", ("keys", "key_bias", "values"), _ffn_structure, _check_ffn,
                                    _build_ffn))


def module_dims(module: nn.Module) -> tuple[int, int]:
    """(input width, output width) of an attach point: a Linear or an FFN block whose first
    and last Linear layers give the widths."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if linears:
        return linears[0].in_features, linears[-1].out_features
    # GPT-2 style Conv1D: weight is (in, out).
    weights = [p for n, p in module.named_parameters() if n.endswith("weight") and p.dim() == 2]
    if weights:
        return weights[0].shape[0], weights[-1].shape[1]
    raise PatchError(f"cannot attach a side module to {type(module).__name__}: no linear layers")
