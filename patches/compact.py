"""Compaction: one patch that makes the same change as several weight patches together
(`compact`), or one memory patch that holds the rows of several (`merge_memory`).

For every parameter, the deltas of all patches are summed exactly: where every contribution
is low rank and the total rank costs fewer numbers than the dense weight (r * (out + in) <
out * in), the factors are concatenated (B = [B1 | B2 | ...] (out, r), A = [A1; A2; ...]
(r, in)), so B @ A is the sum of the Bi @ Ai; elsewhere the sum is one dense float32 delta.
Either way the weights it gives equal the old composition to float32 rounding.

The result carries the requests of every patch it replaces (so editors that protect earlier
edits still see their keys) and names the replaced ids in its config. It is not stamped:
the caller stamps it on the model (`PatchStack.stamp`), since its fingerprint covers the
union of the targets.

SERAC's memory patches change no weight; the memory routes each input by the best row of all
active memory patches, in the order they were applied. `merge_memory` concatenates their rows
in that order into one patch, which routes every input as they did when it replaces all of
them. The rows must come from one sentence encoder; a row whose patch had another scope head
or answer template than the first patch keeps its own (patches.memory).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from patches.errors import PatchError
from patches.format import Delta, Patch, add_all, factors_cost_more
from patches.memory import KEYS, MAX_ROWS, RELATION_KEYS, ROW_SETTINGS

METHOD = "compact"
KIND_NAMES = {"delta": "weight", "memory": "memory"}
#: what memory patches to be merged must share: their rows' keys come from one encoder
ENCODING = ("encoder", "encoder_fingerprint", "dim", "fingerprint_params")


def _factor_dtype(deltas: Sequence[Delta]) -> torch.dtype:
    dtypes = {t.dtype for d in deltas for t in d.tensors.values()}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def compact_deltas(deltas: Sequence[Delta], shape: torch.Size) -> dict[str, torch.Tensor]:
    """The tensors (`B`, `A` or `full`) of one delta equal to the sum of `deltas` on a
    parameter of `shape`."""
    if all(d.form == "low_rank" for d in deltas) and len(shape) == 2:
        rank = sum(d.rank for d in deltas)
        if not factors_cost_more(rank, shape[0], shape[1]):
            dtype = _factor_dtype(deltas)
            return {"B": torch.cat([d.tensors["B"].to(dtype) for d in deltas], dim=1),  # (out, r)
                    "A": torch.cat([d.tensors["A"].to(dtype) for d in deltas], dim=0)}  # (r, in)
    full = torch.zeros(shape, dtype=torch.float32)
    add_all(deltas, full)
    return {"full": full}


def _check_group(patches: Sequence[Patch], kind: str, what: str, other: str) -> None:
    """Raise PatchError unless `patches` are two or more patches of `kind` (`what` needs them;
    `other` says why a patch of another kind is out) made for one model."""
    if len(patches) < 2:
        raise PatchError(f"{what} needs at least two {KIND_NAMES[kind]} patches, got {len(patches)}")
    odd = [p.id for p in patches if p.kind != kind]
    if odd:
        raise PatchError(f"patch {odd[0]} {other}")
    models = {(p.base_model, p.architecture) for p in patches}
    if len(models) > 1:
        raise PatchError(f"the patches were made for different models ({sorted(map(str, models))}); "
                         "compact the patches of one model")


def merge_memory(patches: Sequence[Patch]) -> Patch:
    """One unstamped memory patch holding the rows of the memory patches `patches`, in their
    order (see the module doc). Raises PatchError for fewer than two, another kind, different
    models or encoders, or more rows than one patch may hold."""
    _check_group(patches, "memory", "merging", "is not a memory patch")
    first = patches[0]
    for patch in patches[1:]:
        changed = [k for k in ENCODING if patch.memory[k] != first.memory[k]]
        if changed:
            raise PatchError(f"memory patch {patch.id} differs from {first.id} in {', '.join(changed)}: its rows "
                             "were encoded by another sentence encoder, so they cannot be merged")
    rows = []
    for patch in patches:  # each row with the settings it had where they differ from the first patch's
        for row in patch.memory["rows"]:
            row = {**row, **{k: row.get(k, patch.memory[k]) for k in ROW_SETTINGS}}
            rows.append({k: v for k, v in row.items() if k not in ROW_SETTINGS or v != first.memory[k]})
    if len(rows) > MAX_ROWS:
        raise PatchError(f"the memory patches hold {len(rows)} rows together, over the limit of {MAX_ROWS} "
                         "for one patch")
    tensors = {}
    for name in (KEYS, RELATION_KEYS):
        parts = [p.tensors[name] for p in patches]
        dtype = parts[0].dtype if len({t.dtype for t in parts}) == 1 else torch.float32
        tensors[name] = torch.cat([t.to(dtype) for t in parts])
    return Patch(kind="memory", method=first.method, base_model=first.base_model, base_fingerprint="",
                 architecture=first.architecture, tensors=tensors, memory={**first.memory, "rows": rows},
                 requests=[r for p in patches for r in p.requests],
                 config={"replaces": [p.id for p in patches], "methods": [p.method for p in patches]})


def compact(patches: Sequence[Patch], shapes: Mapping[str, torch.Size]) -> Patch:
    """One unstamped patch equal to `patches` applied together (in this order). `shapes`:
    the shape of every parameter they touch. Raises PatchError for side-module patches,
    patches for different models, or fewer than two patches."""
    _check_group(patches, "delta", "compaction", "is not a weight patch; compaction merges weight patches only")
    by_param: dict[str, list[Delta]] = {}
    for patch in patches:
        for param, delta in patch.deltas().items():
            by_param.setdefault(param, []).append(delta)
    missing = sorted(set(by_param) - set(shapes))
    if missing:
        raise PatchError(f"no shape given for {missing[0]}")
    tensors = {f"delta.{param}.{part}": t
               for param, deltas in by_param.items()
               for part, t in compact_deltas(deltas, shapes[param]).items()}
    first = patches[0]
    return Patch(kind="delta", method=METHOD, base_model=first.base_model, base_fingerprint="",
                 architecture=first.architecture, tensors=tensors,
                 requests=[r for p in patches for r in p.requests],
                 config={"replaces": [p.id for p in patches], "methods": [p.method for p in patches]})
