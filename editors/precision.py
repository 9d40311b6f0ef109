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

On a CPU the copies are written into buffers kept from the previous block (refilled from the
weights each time, so a patch applied in between is seen): a fresh bfloat16 copy of
SmolLM2-135M's Linears took 0.35 s, nearly all of it the page faults of newly mapped memory,
and refilling kept buffers 0.02 s, a tenth of a ROME edit saved. The buffers stay resident
(half the Linears' float32 size, 270 MB for SmolLM2) unless they would pass `BUFFER_LIMIT`;
a block that finds them in use (another thread's) makes fresh copies.
"""

from __future__ import annotations

import threading
import weakref

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


def resolved_name(name: str, device: torch.device | str) -> str:
    """The DTYPES name of what `resolve(name, device)` gives: `auto` as it runs on `device`."""
    dtype = resolve(name, device)
    return next(n for n, d in DTYPES.items() if d == dtype)


def check(method: str, name: str) -> None:
    """Refuse a setting outside CHOICES (a config's __post_init__)."""
    if name not in CHOICES:
        raise ValueError(f"{method} needs v_dtype in {', '.join(CHOICES)}; got {name!r}")


BUFFER_LIMIT = 2 << 30  # bytes of kept CPU buffers; past it, fresh copies each block (module doc)
_BUFFERS: dict[int, tuple[weakref.ref, torch.Tensor]] = {}  # id(CPU weight) -> (the weight, its kept copy)
_BUFFERS_LOCK = threading.Lock()  # held by the block that uses the buffers


class LowPrecisionLinears(ReplaceForward):
    """Run the model's float32 Linears in `dtype` in this thread for the `with` block (module doc)."""

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        linears = [] if dtype == torch.float32 else [  # a Linear whose forward is wrapped already keeps it
            m for m in model.modules()
            if type(m) is nn.Linear and m.weight.dtype == torch.float32 and "forward" not in vars(m)]
        tensors = {id(t): t for m in linears for t in (m.weight, m.bias) if t is not None}  # a tied weight once
        size = sum(t.numel() for t in tensors.values()) * torch.empty((), dtype=dtype).element_size()
        self._keeps = bool(tensors) and size <= BUFFER_LIMIT and all(t.device.type == "cpu" for t in tensors.values()) \
            and _BUFFERS_LOCK.acquire(blocking=False)

        def low(module: nn.Linear):
            weight, bias = casts[id(module.weight)], None if module.bias is None else casts[id(module.bias)]
            return lambda x: F.linear(x.to(weight.dtype), weight, bias)

        try:
            casts = {i: self._copy(t, dtype) for i, t in tensors.items()}
            super().__init__({m: low(m) for m in linears})
        except BaseException:
            self._release()
            raise

    def _copy(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if not self._keeps:
            return t.detach().to(dtype)
        ref, buffer = _BUFFERS.get(id(t), (None, None))
        if ref is None or ref() is not t or buffer.dtype != dtype or buffer.shape != t.shape:
            buffer = torch.empty(t.shape, dtype=dtype)
            _BUFFERS[id(t)] = (weakref.ref(t, lambda _, key=id(t): _BUFFERS.pop(key, None)), buffer)
        return buffer.copy_(t.detach())

    def _release(self) -> None:
        if self._keeps:
            self._keeps = False
            _BUFFERS_LOCK.release()

    def close(self) -> None:
        super().close()
        self._release()
