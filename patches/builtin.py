"""The kinds format 1 began with, as strategies (patches.kinds):

- `delta`: weight deltas (low-rank, dense, rows or columns). They change no module state of
  their own: the stack composes base + every active patch's deltas into the parameters
  (`PatchStack._write`), so attach and detach have nothing more to do.
- `side_module`: extra modules (patches.side) added to the output of attach points by forward
  hooks; attach builds and hooks them, detach removes exactly those hooks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from patches.errors import PatchError
from patches.format import (INDEX_DTYPES, VALUE_DTYPES, Delta, Patch, check_delta_shapes, check_tensor_name)
from patches.kinds import register_patch_kind
from patches.side import side_module_type
from patches.stack import add_output, attach_dims, check_side_magnitudes

if TYPE_CHECKING:
    from patches.stack import ActivePatch, PatchStack


def check_weight_tensors(patch: Patch) -> None:
    """Names, dtypes and finite values of a delta or side-module patch's tensors."""
    if patch.memory:
        raise PatchError(f"a {patch.kind!r} patch must not hold an edit memory (metadata memory)")
    side_names = set(patch.side_modules)
    for name, t in patch.tensors.items():
        check_tensor_name(name, side_names)
        is_index = name.endswith(".index") and name.startswith("delta.")
        allowed = INDEX_DTYPES if is_index else VALUE_DTYPES
        if t.dtype not in allowed:
            raise PatchError(
                f"tensor {name!r} has dtype {str(t.dtype).removeprefix('torch.')}; "
                f"expected {' or '.join(str(d).removeprefix('torch.') for d in allowed)}"
            )
        if not is_index and not bool(torch.isfinite(t).all()):
            raise PatchError(f"tensor {name!r} holds NaN or Inf values")


class DeltaKind:
    name = "delta"
    tensor_prefix = "delta."
    changes_forward = True

    def validate(self, patch: Patch) -> None:
        check_weight_tensors(patch)
        if patch.side_modules or any(n.startswith("side.") for n in patch.tensors):
            raise PatchError("a 'delta' patch must not hold side modules")
        for d in patch.deltas().values():
            check_delta_shapes(d)

    def check(self, stack: PatchStack, patch: Patch) -> None:
        for delta in stack.canonical_deltas(patch).values():
            delta.check_against(stack.parameter(delta.param).shape)

    def fingerprint_names(self, stack: PatchStack, patch: Patch) -> list[str]:
        return sorted(patch.deltas())

    def targets(self, patch: Patch) -> list[str]:
        return sorted(patch.deltas())

    def deltas(self, stack: PatchStack, patch: Patch) -> dict[str, Delta]:
        return stack.canonical_deltas(patch)

    def attach(self, stack: PatchStack, entry: ActivePatch) -> None:
        pass  # the stack writes the composed parameters

    def detach(self, stack: PatchStack, entry: ActivePatch) -> None:
        pass

    def describe(self, patch: Patch) -> dict:
        return {"targets": [{"param": d.param, "form": d.form, "rank": d.rank,
                             "tensors": {k: list(v.shape) for k, v in d.tensors.items()}}
                            for d in patch.deltas().values()]}


class SideModuleKind:
    name = "side_module"
    tensor_prefix = "side."
    changes_forward = True

    def validate(self, patch: Patch) -> None:
        check_weight_tensors(patch)
        if any(n.startswith("delta.") for n in patch.tensors):
            raise PatchError("a 'side_module' patch must not hold weight deltas")
        if not patch.side_modules:
            raise PatchError("a 'side_module' patch must declare its modules in metadata side_modules")
        for name, entry in patch.side_modules.items():
            kind = side_module_type(entry["type"])
            have = {k.split(".", 2)[2] for k in patch.tensors if k.startswith(f"side.{name}.")}
            if have != set(kind.tensors):
                raise PatchError(
                    f"side module {name!r} of type {kind.name!r} needs tensors {sorted(kind.tensors)}, "
                    f"has {sorted(have)}"
                )
            kind.check_structure({t: patch.tensors[f"side.{name}.{t}"] for t in kind.tensors},
                                 dict(entry.get("config", {})))

    def check(self, stack: PatchStack, patch: Patch) -> None:
        for spec in patch.side_module_specs():
            module = stack.attach_point(spec.attach)
            d_in, d_out = attach_dims(module)
            side_module_type(spec.type).check(spec.tensors, spec.config, d_in, d_out)
            check_side_magnitudes(spec.name, spec.tensors, module)

    def fingerprint_names(self, stack: PatchStack, patch: Patch) -> list[str]:
        names = set()
        for spec in patch.side_module_specs():
            names.update(f"{spec.attach}.{n}" for n, _ in stack.attach_point(spec.attach).named_parameters())
        return sorted(names)

    def targets(self, patch: Patch) -> list[str]:
        return sorted({s.attach for s in patch.side_module_specs()})

    def deltas(self, stack: PatchStack, patch: Patch) -> dict[str, Delta]:
        return {}

    def attach(self, stack: PatchStack, entry: ActivePatch) -> None:
        built = []
        for spec in entry.patch.side_module_specs():  # build every module first: a failure hooks nothing
            module = stack.attach_point(spec.attach)
            ref = next(module.parameters(), None)
            side = side_module_type(spec.type).build(spec.tensors, spec.config)
            built.append((module, side.to(ref.device) if ref is not None else side))
        for module, side in built:
            entry.handles.append(module.register_forward_hook(add_output(side), with_kwargs=True))

    def detach(self, stack: PatchStack, entry: ActivePatch) -> None:
        for handle in entry.handles:
            handle.remove()
        entry.handles.clear()

    def describe(self, patch: Patch) -> dict:
        return {"side_modules": [{"name": s.name, "type": s.type, "attach": s.attach, "config": s.config,
                                  "tensors": {k: list(v.shape) for k, v in s.tensors.items()}}
                                 for s in patch.side_module_specs()]}


DELTA_KIND = register_patch_kind(DeltaKind())
SIDE_MODULE_KIND = register_patch_kind(SideModuleKind())
