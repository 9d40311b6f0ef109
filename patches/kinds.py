"""Patch kinds as strategies: one small object per kind of patch, in the spirit of PEFT's
`LoraVariant`, so adding a kind adds a class instead of `kind == ...` branches in
`patches.format` and `patches.stack`.

A kind answers these questions about its patches:
- `validate(patch)`: is the file well formed (everything that needs no model)? Raise PatchError.
- `check(stack, patch)`: does it fit this model (beyond the base fingerprint, which the stack
  checks for every kind over `fingerprint_names`)? Raise PatchError.
- `targets(patch)`: the parameters or modules it touches (what `Patch.targets` lists).
- `deltas(stack, patch)`: the weight deltas the stack composes into parameters ({} for kinds
  that change no weight); the stack owns that arithmetic, since several patches add up on one
  parameter.
- `attach(stack, entry)` / `detach(stack, entry)`: make it live on the stack beyond its
  deltas, and undo that exactly. `detach` of an entry never (or half) attached is safe.
- `describe(patch)`: the fields `inspect` shows of it.
- `changes_forward`: whether attaching one changes what a forward pass of the model computes
  (when it does, the stack's verify pass runs after it is attached).

The kinds: `delta` and `side_module` (patches.builtin), `memory` (SERAC's edit memory,
patches.memory).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from patches.errors import PatchError

if TYPE_CHECKING:
    from patches.format import Delta, Patch
    from patches.stack import ActivePatch, PatchStack


class PatchKind(Protocol):
    name: str
    #: the prefix of every tensor name a patch of this kind holds (e.g. "memory.")
    tensor_prefix: str
    #: whether an attached patch of this kind changes what the model's forward pass computes
    changes_forward: bool

    def validate(self, patch: Patch) -> None: ...

    def check(self, stack: PatchStack, patch: Patch) -> None: ...

    def fingerprint_names(self, stack: PatchStack, patch: Patch) -> list[str]: ...

    def targets(self, patch: Patch) -> list[str]: ...

    def deltas(self, stack: PatchStack, patch: Patch) -> dict[str, Delta]: ...

    def attach(self, stack: PatchStack, entry: ActivePatch) -> None: ...

    def detach(self, stack: PatchStack, entry: ActivePatch) -> None: ...

    def describe(self, patch: Patch) -> dict: ...


PATCH_KINDS: dict[str, PatchKind] = {}


def register_patch_kind(kind: PatchKind) -> PatchKind:
    """Register a kind by name; a name registered twice is refused."""
    if kind.name in PATCH_KINDS and PATCH_KINDS[kind.name] is not kind:
        raise ValueError(f"patch kind {kind.name!r} is already registered")
    PATCH_KINDS[kind.name] = kind
    return kind


def known_kinds() -> list[str]:
    _load()
    return sorted(PATCH_KINDS)


def patch_kind(name: str) -> PatchKind:
    """The strategy of a kind; a one-line PatchError for an unknown one."""
    _load()
    kind = PATCH_KINDS.get(name) if isinstance(name, str) else None
    if kind is None:
        raise PatchError(f"unknown patch kind {name!r}; expected one of {', '.join(repr(k) for k in known_kinds())}")
    return kind


def _load() -> None:
    """Register the kinds (their modules import patches.format and patches.stack, so they are
    imported on first use, not with this module)."""
    import patches.builtin  # noqa: F401 - delta and side_module
    import patches.memory  # noqa: F401 - memory
