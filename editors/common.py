"""Small pieces every method uses: default layers, the weight a method edits, building the
patch's delta tensors, and refusing what a method cannot do."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from editors.base import EditError
from editors.lm import is_seq2seq
from patches import Patch
from patches.format import factors_cost_more


#: methods whose layers default to another method's where a profile names none for them
LAYERS_LIKE = {"alphaedit": "memit"}


def method_layers(profile, method: str, layers: Sequence[int] | None) -> list[int]:
    """Layers from the config, else the profile's defaults for `method` (or for the method
    it borrows them from, LAYERS_LIKE); checked in range."""
    if layers is None:
        if method not in profile.editing and method in LAYERS_LIKE:
            method = LAYERS_LIKE[method]
        try:
            layers = profile.default_layers(method)
        except ValueError as e:  # ProfileError
            raise EditError(str(e)) from None
    layers = sorted(int(x) for x in layers)
    bad = [x for x in layers if not 0 <= x < profile.num_layers]
    if not layers or bad:
        raise EditError(f"{method}: layers {bad or '[]'} are not in 0..{profile.num_layers - 1}")
    return layers


def mlp_out_weight(model, profile, layer: int) -> tuple[str, torch.Tensor]:
    """(parameter name, weight (out, in)) of the MLP output projection of `layer`."""
    name = profile.mlp_out(layer) + ".weight"
    try:
        weight = model.get_parameter(name)
    except AttributeError:
        raise EditError(f"the model has no parameter {name!r} (check the profile's modules.mlp_out)") from None
    if weight.dim() != 2:
        raise EditError(f"{name} is not a 2-D weight")
    return name, weight


def require_decoder_only(model, method: str) -> None:
    if is_seq2seq(model):
        raise EditError(
            f"{method} reads the subject's key in the MLP input at the last subject token, but on an "
            "encoder-decoder model the profile's MLPs are the decoder's, which never sees the subject; "
            "use ft, ft-lora or kn on this model"
        )


def low_rank(param: str, b: torch.Tensor, a: torch.Tensor, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """Tensors of delta W = b @ a ((out, r) @ (r, in)), stored dense when that is smaller."""
    if b.shape[0] != weight.shape[0] or a.shape[1] != weight.shape[1]:
        raise EditError(f"the update ({b.shape[0]} x {a.shape[1]}) does not fit {param} {list(weight.shape)}: "
                        "is modules.mlp_out a Linear whose weight is (out, in)?")
    b, a = canonical(b), canonical(a)
    if factors_cost_more(b.shape[1], b.shape[0], a.shape[1]):
        return dense(param, b @ a)
    return {f"delta.{param}.B": b, f"delta.{param}.A": a}


def dense(param: str, delta: torch.Tensor) -> dict[str, torch.Tensor]:
    return {f"delta.{param}.full": canonical(delta)}


def canonical(t: torch.Tensor) -> torch.Tensor:
    """float32 on the CPU with row-major strides (a (n, 1) transpose counts as contiguous
    but keeps odd strides, which safetensors' byte views refuse)."""
    return torch.empty(t.shape, dtype=torch.float32).copy_(t.detach())


def delta_patch(method: str, tensors: Mapping[str, torch.Tensor]) -> Patch:
    """A delta patch; `compute_patch` fills in requests, config and the base fingerprint."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise EditError(f"{method} produced non-finite values in {name} (the optimization diverged; "
                            "lower the learning rate)")
    return Patch(kind="delta", method=method, base_model="", base_fingerprint="", tensors=dict(tensors))
