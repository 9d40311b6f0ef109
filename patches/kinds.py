"""Patch kinds as strategies: one small object per kind of patch, in the spirit of PEFT's
`LoraVariant`, so adding a kind adds a class instead of `kind == ...` branches.

A kind answers four questions about its patches:
- `validate(patch)`: is the file well formed (everything that needs no model)? Raise PatchError.
- `check(stack, patch)`: does it fit this model (beyond the base fingerprint, which the stack
  checks for every kind over `fingerprint_names`)? Raise PatchError.
- `attach(stack, entry)` / `detach(stack, entry)`: make it live on the stack, and undo that
  exactly. Neither may fail halfway: `attach` checks first, then changes state.
- `describe(patch)`: what `inspect` shows of it.
- `changes_forward`: whether attaching one changes what a forward pass of the model computes
  (when it does, the stack's verify pass runs after it is attached; taken as True if absent).

The `memory` kind (SERAC's edit memory, `patches.memory`) is the first one registered here.
`delta` and `side_module` are still handled by `patches.format` and `patches.stack` directly
and are to move behind this interface next (issue 13, deliverable 1).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from patches.errors import PatchError

if TYPE_CHECKING:
    from patches.format import Patch
    from patches.stack import ActivePatch, PatchStack

#: kinds `patches.format` and `patches.stack` still handle themselves
BUILTIN_KINDS = ("delta", "side_module")


class PatchKind(Protocol):
    name: str
    #: the prefix of every tensor name a patch of this kind holds (e.g. "memory.")
    tensor_prefix: str
    #: whether an attached patch of this kind changes what the model's forward pass computes
    changes_forward: bool

    def validate(self, patch: Patch) -> None: ...

    def check(self, stack: PatchStack, patch: Patch) -> None: ...

    def fingerprint_names(self, stack: PatchStack, patch: Patch) -> list[str]: ...

    def attach(self, stack: PatchStack, entry: ActivePatch) -> None: ...

    def detach(self, stack: PatchStack, entry: ActivePatch) -> None: ...

    def describe(self, patch: Patch) -> dict: ...


PATCH_KINDS: dict[str, PatchKind] = {}


def register_patch_kind(kind: PatchKind) -> PatchKind:
    """Register a kind by name; a name registered twice (or a built-in one) is refused."""
    if kind.name in BUILTIN_KINDS or (kind.name in PATCH_KINDS and PATCH_KINDS[kind.name] is not kind):
        raise ValueError(f"patch kind {kind.name!r} is already registered")
    PATCH_KINDS[kind.name] = kind
    return kind


def patch_kind(name: str) -> PatchKind | None:
    """The strategy of a registered kind; None for the built-in kinds."""
    _load()
    return PATCH_KINDS.get(name)


def known_kinds() -> list[str]:
    _load()
    return [*BUILTIN_KINDS, *sorted(PATCH_KINDS)]


def require_kind(name: str) -> None:
    if name not in known_kinds():
        raise PatchError(f"unknown patch kind {name!r}; expected one of {', '.join(repr(k) for k in known_kinds())}")


def _load() -> None:
    if "memory" not in PATCH_KINDS:
        import patches.memory  # noqa: F401 - registers the memory kind
