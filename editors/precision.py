"""Lower-precision forward passes for an editor's optimization loop, without touching the
model: `LowPrecisionLinears(model, torch.bfloat16)` runs every float32 `nn.Linear` of the model
with a bfloat16 copy of its weight (cast once, when the block opens) in the calling thread
only; another thread (the serving engine on a shared model) still runs the float32 weights.
Residual streams, norms and anything not a Linear keep their dtypes; forward hooks (edits,
`AddToWeights` overlays, traces) see the Linear's bfloat16 output and the caller's input.

On a CPU with bfloat16 matrix instructions (AVX512-BF16, AMX) a bfloat16 forward and backward
pass of SmolLM2-135M take about 0.55 of the float32 ones; without them bfloat16 is slower, so
`resolve("auto", device)` picks it only where it pays: on a CUDA device, or a CPU whose oneDNN
reports bfloat16 support.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from editors.nethook import ReplaceForward

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
CHOICES = ("float32", "bfloat16", "auto")


def resolve(name: str, device: torch.device | str) -> torch.dtype:
    """The dtype a setting of `float32`, `bfloat16` or `auto` means on `device`."""
    if name != "auto":
        return DTYPES[name]
    if torch.device(device).type == "cuda":
        return torch.bfloat16
    supported = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return torch.bfloat16 if torch.device(device).type == "cpu" and supported is not None and supported() \
        else torch.float32


def check(method: str, name: str) -> None:
    """Refuse a setting outside CHOICES (a config's __post_init__)."""
    if name not in CHOICES:
        raise ValueError(f"{method} needs v_dtype in {', '.join(CHOICES)}; got {name!r}")


class LowPrecisionLinears(ReplaceForward):
    """Run the model's float32 Linears in `dtype` in this thread for the `with` block (module doc)."""

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        casts: dict[int, torch.Tensor] = {}  # a tied weight is cast once

        def cast(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is not None and id(t) not in casts:
                casts[id(t)] = t.detach().to(dtype)
            return None if t is None else casts[id(t)]

        def low(module: nn.Linear):
            weight, bias = cast(module.weight), cast(module.bias)
            return lambda x: F.linear(x.to(weight.dtype), weight, bias)

        linears = [] if dtype == torch.float32 else [  # a Linear whose forward is wrapped already keeps it
            m for m in model.modules()
            if type(m) is nn.Linear and m.weight.dtype == torch.float32 and "forward" not in vars(m)]
        super().__init__({m: low(m) for m in linears})
