"""Fingerprints of base weights, so a patch refuses a model it was not made for.

The digest is taken over the tensor rounded to bfloat16: a model loaded in float32 and the
same checkpoint loaded in bfloat16 (or float16 cast from it) give the same fingerprint, so a
patch made on one serving dtype applies on another, while a different checkpoint does not.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

import torch


def tensor_digest(name: str, tensor: torch.Tensor) -> str:
    """sha256 over name, shape and the bfloat16-rounded values of one tensor."""
    h = hashlib.sha256()
    h.update(name.encode())
    h.update(repr(tuple(tensor.shape)).encode())
    data = tensor.detach().to(torch.bfloat16).contiguous().cpu()
    h.update(data.reshape(-1).view(torch.int16).numpy().tobytes())
    return h.hexdigest()


def exact_digest(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's exact bytes (dtype and shape included): equal digests mean
    bit-identical tensors."""
    t = tensor.detach().contiguous().cpu()
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def combine(digests: Mapping[str, str], names: Iterable[str]) -> str:
    """One fingerprint for a set of tensors, independent of their order."""
    h = hashlib.sha256()
    for name in sorted(set(names)):
        h.update(name.encode())
        h.update(digests[name].encode())
    return h.hexdigest()[:32]


def fingerprint_params(model: torch.nn.Module, names: Iterable[str]) -> str:
    """Fingerprint of the named parameters of `model` as they are now."""
    names = sorted(set(names))
    return combine({n: tensor_digest(n, model.get_parameter(n)) for n in names}, names)
