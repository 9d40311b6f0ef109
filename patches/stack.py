"""PatchStack: the live set of patches on one model, applied and reverted exactly.

The stack keeps a copy of every base parameter some active patch touches. A touched weight is
always recomputed as base + the active patches' deltas in the order they were applied, summed
in float32 and cast to the parameter's dtype; so the weights are a function of the active set
alone, a revert (of any patch, in any order) is exact, and reverting everything restores the
original tensors bit for bit. Side modules attach as forward hooks and detach by removing them.

Every change is a change-set (`replace`: the new active list, with the patches it adds):
apply and revert are its simplest cases, a compaction (many patches out, the one that makes
their change in) another. It is checked first and committed all at once: a failure halfway
through rolls the touched tensors back, so a change is either wholly made or not at all.

The optional `verify` (a short forward pass that must stay finite) runs after a change that
alters the forward pass: one that writes weights or attaches hooks, not one that only adds
memory rows. It is told which parameters and attach points changed since it last passed, so an
engine can replay its pass from the first layer they touch (edit_serve.engines.verify). A patch
set that passed it once is not verified again when it comes back (a revert and a re-apply, a
rollback): the weights are a function of the active set, so they are bit for bit the ones that
passed.

Not thread-safe by design beyond a lock: the engine calls it between forward passes.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from patches.errors import PatchError
from patches.fingerprint import combine, tensor_digest
from patches.format import Delta, Patch, add_all
from patches.format import validate as validate_structure
from patches.kinds import patch_kind
from patches.side import module_dims

BASE_VERSION = "base"


@dataclass(eq=False)
class ActivePatch:
    patch: Patch
    deltas: dict[str, Delta]
    applied_at: float = field(default_factory=time.time)
    handles: list = field(default_factory=list)
    id: str = field(init=False)  # the patch's id and edit key, read in every scan of the active list
    edit_key: str = field(init=False)

    def __post_init__(self):
        self.id, self.edit_key = self.patch.id, self.patch.edit_key


#: a patch may not make a touched weight's largest magnitude grow past this many times the
#: base's (or past this absolute value, for weights that are near zero): such a delta is
#: broken, not an edit, and would overflow activations in a forward pass.
MAX_GROWTH = 1e3
#: patch sets (ordered active ids) whose verify passed, remembered so that coming back to one
#: does not run the forward pass again; the least recently reached are forgotten first
VERIFIED_SETS = 256


def add_output(side: nn.Module) -> Callable:
    """A forward hook adding `side(input)` to an attach point's (tensor) output; the input is
    the first positional argument, or the first keyword argument when called by keyword."""

    def hook(module, args, kwargs, output):
        x = args[0] if args else next(iter(kwargs.values()))
        return output + side(x)

    return hook


def check_side_magnitudes(name: str, tensors, module: nn.Module) -> None:
    """A side module's numbers stay within MAX_GROWTH x the attach point's largest weight
    (or MAX_GROWTH, for small weights): beyond that it overflows on some inputs, not others."""
    base = max((float(p.detach().abs().max()) for p in module.parameters() if p.numel()), default=0.0)
    limit = MAX_GROWTH * max(base, 1.0)
    for tensor_name, t in tensors.items():
        peak = float(t.abs().max()) if t.numel() else 0.0
        if peak > limit:
            raise PatchError(f"side module {name!r}: {tensor_name} reaches {peak:.3g}, over {MAX_GROWTH:g}x the "
                             "attach point's largest weight: a broken module, not an edit")


def attach_dims(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of an attach point, after checking that a side-module hook can run
    there: the module, called on one (1, 1, d_in) tensor, returns one (1, 1, d_out) tensor
    (a linear layer or an FFN block; not attention, a decoder layer, a container or a model)."""
    d_in, d_out = module_dims(module)
    ref = next(module.parameters(), None)
    x = torch.zeros(1, 1, d_in, dtype=ref.dtype if ref is not None else torch.float32,
                    device=ref.device if ref is not None else "cpu")
    what = type(module).__name__
    try:
        with torch.no_grad():
            out = module(x)
    except Exception:  # noqa: BLE001 - any failure means the hook could not run here
        raise PatchError(
            f"cannot attach a side module to a {what}: it does not map one hidden-state tensor to "
            "another (attach to an MLP block or a linear layer)"
        ) from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (1, 1, d_out):
        raise PatchError(
            f"cannot attach a side module to a {what}: its output is not one [.., {d_out}] tensor "
            "(attach to an MLP block or a linear layer)"
        )
    return d_in, d_out


class PatchStack:
    """`verify`, when given, runs after a patch is written and attached and before it counts
    as applied: an engine passes a short forward pass that must give finite outputs, so a
    patch whose numbers are finite but whose effect overflows is refused and rolled back."""

    def __init__(self, model: nn.Module, *, base_model: str | None = None, architecture: str | None = None,
                 verify: Callable[[frozenset[str]], bool] | None = None):
        self.model = model
        self.base_model = base_model
        self.architecture = architecture
        self.verify = verify
        self._active: list[ActivePatch] = []
        self._base: dict[str, torch.Tensor] = {}  # name -> original tensor (model dtype/device)
        self._digests: dict[str, str] = {}  # name -> digest of the base tensor
        self._base_peaks: dict[str, float] = {}  # name -> largest magnitude in the base tensor
        self._names: dict[int, str] | None = None  # id(parameter) -> its canonical name
        self._lock = threading.RLock()
        self._verified: OrderedDict[str, None] = OrderedDict()  # digests of patch sets that passed `verify`
        self._unverified: set[str] = set()  # parameters and attach points changed since `verify` last passed
        self.memory = None  # the edit memory of the active memory patches (patches.memory), made on first use

    # --- state -------------------------------------------------------------------------
    @property
    def active(self) -> list[ActivePatch]:
        return list(self._active)

    @property
    def ids(self) -> list[str]:
        return [a.id for a in self._active]

    @property
    def version(self) -> str:
        return patchset_version(self.ids)

    def base_bytes(self) -> int:
        """Memory held by base copies of touched parameters."""
        return sum(t.numel() * t.element_size() for t in self._base.values())

    # --- fingerprints ---------------------------------------------------------------------
    def parameter(self, name: str) -> torch.Tensor:
        """The live parameter `name` (PatchError if the model has none)."""
        return self._param(name)

    def _param(self, name: str) -> torch.Tensor:
        try:
            return self.model.get_parameter(name)
        except AttributeError:
            raise PatchError(
                f"unknown tensor target {name!r}: this {self.architecture or 'model'} has no such "
                "parameter (a patch for another architecture?)"
            ) from None

    def canonical(self, name: str) -> str:
        """The registered name of the tensor `name` resolves to: aliases (an attribute path
        such as `base_model.`, or a tied head and embedding) share one storage, so they share
        one name, one base copy and one sum of deltas. A model view whose parameters are not
        registered modules (vLLM's) resolves names itself (`canonical_name`)."""
        own = getattr(self.model, "canonical_name", None)
        if own is not None:
            return own(name)
        if self._names is None:
            self._names = {id(p): n for n, p in self.model.named_parameters()}
        param = self._param(name)
        try:
            return self._names[id(param)]
        except KeyError:
            raise PatchError(f"{name!r} is not a registered parameter of this model") from None

    def canonical_deltas(self, patch: Patch) -> dict[str, Delta]:
        """The patch's deltas keyed by canonical name; two names for one tensor are refused."""
        out: dict[str, Delta] = {}
        for name, delta in patch.deltas().items():
            key = self.canonical(name)
            if key in out:
                raise PatchError(
                    f"the patch changes {out[key].param} and {name}, which are the same tensor "
                    f"({key}); give one delta per tensor"
                )
            out[key] = delta
        return out

    def _module(self, name: str) -> nn.Module:
        try:
            return self.model.get_submodule(name)
        except AttributeError:
            raise PatchError(
                f"unknown attach point {name!r}: this {self.architecture or 'model'} has no such module "
                "(a patch for another architecture?)"
            ) from None

    def attach_point(self, name: str) -> nn.Module:
        """The module a side module named `name` would hook (PatchError if there is none)."""
        module = self._module(name)
        if module is self.model:
            raise PatchError("cannot attach a side module to the whole model; attach to an MLP block")
        return module

    def fingerprint_names(self, patch: Patch) -> list[str]:
        """The base parameters a patch's fingerprint covers."""
        return patch_kind(patch.kind).fingerprint_names(self, patch)

    def base_fingerprint(self, names: list[str]) -> str:
        """Fingerprint of the named parameters as they were before any patch."""
        for name in names:
            if name not in self._digests:
                tensor = self._base.get(self.canonical(name))  # a patched tensor's base copy
                self._digests[name] = tensor_digest(name, tensor if tensor is not None else self._param(name))
        return combine(self._digests, names)

    def stamp(self, patch: Patch) -> Patch:
        """A copy of `patch` carrying this model's base fingerprint and identity."""
        return patch.replace(
            base_fingerprint=self.base_fingerprint(self.fingerprint_names(patch)),
            base_model=self.base_model or patch.base_model,
            architecture=self.architecture or patch.architecture,
        )

    # --- checks ---------------------------------------------------------------------------
    def check(self, patch: Patch, active: Sequence[ActivePatch] | None = None) -> None:
        """Raise PatchError unless `patch` can be applied to this model now (next to
        `active`, by default the active patches)."""
        validate_structure(patch)
        active = self._active if active is None else active
        if patch.id in {a.id for a in active}:
            raise PatchError(f"patch {patch.id} is already applied")
        same = {a.edit_key: a.id for a in reversed(active)}.get(patch.edit_key)  # the first one with it
        if same is not None:
            raise PatchError(f"patch {patch.id} makes the same change as active patch {same}")
        if patch.architecture and self.architecture and patch.architecture != self.architecture:
            raise PatchError(
                f"patch is for a {patch.architecture} ({patch.base_model}); this server runs a "
                f"{self.architecture} ({self.base_model})"
            )
        patch_kind(patch.kind).check(self, patch)
        expected = self.base_fingerprint(self.fingerprint_names(patch))
        if patch.base_fingerprint != expected:
            raise PatchError(
                f"wrong base model: the patch was made for {patch.base_model!r} (fingerprint "
                f"{patch.base_fingerprint[:12]}), this server runs {self.base_model or 'another model'!r} "
                f"(fingerprint {expected[:12]})"
            )

    # --- arithmetic -----------------------------------------------------------------------
    def _compose(self, name: str, stack: list[ActivePatch]) -> torch.Tensor | None:
        """base + deltas of `stack` for one parameter, in the parameter's dtype; None when no
        patch in `stack` touches it (the base tensor itself is then the answer)."""
        touching = [a.deltas[name] for a in stack if name in a.deltas]
        if not touching:
            return None
        param = self._param(name)
        base = self._base.get(name, param.detach())
        w = base.to(torch.float32, copy=True)
        add_all(touching, w)
        value = w.to(param.dtype)
        if not bool(torch.isfinite(value).all()):  # in the parameter's own dtype: float16 overflows early
            raise PatchError(f"applying the patch would make {name} non-finite in {str(param.dtype)[6:]} "
                             "(overflow); nothing was changed")
        limit = MAX_GROWTH * max(self._base_peak(name, base), 1.0)
        peak = float(w.abs().max()) if w.numel() else 0.0
        if peak > limit:
            raise PatchError(f"applying the patch would raise the largest magnitude of {name} to {peak:.3g}, over "
                             f"{MAX_GROWTH:g}x the base's: a broken delta, not an edit; nothing was changed")
        return value

    def _base_peak(self, name: str, base: torch.Tensor) -> float:
        """The largest magnitude in a parameter's base tensor, measured once (a base never
        changes; on a 6B model the scan costs tens of milliseconds per apply)."""
        if name not in self._base_peaks:
            self._base_peaks[name] = float(base.abs().max()) if base.numel() else 0.0
        return self._base_peaks[name]

    def _write(self, names: list[str], stack: list[ActivePatch]) -> None:
        """Make the named parameters equal base + deltas of `stack` (all computed first)."""
        values = {name: self._compose(name, stack) for name in names}
        for name, value in values.items():
            if value is None:
                if name in self._base:  # untouched parameters are already base
                    self._assign(name, self._base[name])
                    del self._base[name]
            else:
                if name not in self._base:
                    self._base[name] = self._param(name).detach().clone()
                self._assign(name, value)

    def _assign(self, name: str, value: torch.Tensor) -> None:
        self._param(name).data.copy_(value)

    # --- operations -----------------------------------------------------------------------
    def apply(self, patch: Patch, position: int | None = None) -> str:
        """Apply `patch` on top of the active ones (or at `position` in the apply order: how a
        failed revert puts a patch back exactly where it was). Returns the new version."""
        with self._lock:
            ids = self.ids
            if patch.id in ids:
                raise PatchError(f"patch {patch.id} is already applied")
            return self.replace(patchset_with(ids, patch.id, position=position), [patch])

    def position(self, patch_id: str) -> int:
        """Where an active patch stands in the apply order."""
        return self.ids.index(patch_id)

    def revert(self, patch_id: str) -> str:
        """Revert one active patch (any of them). Returns the new patch-set version."""
        with self._lock:
            if patch_id not in self.ids:
                raise PatchError(f"patch {patch_id} is not applied")
            return self.replace([i for i in self.ids if i != patch_id], [])

    def replace(self, ids: Sequence[str], new: Sequence[Patch]) -> str:
        """One change-set: make the active patches exactly `ids`, in this order; `new` holds
        those of them that are not active yet (each is checked first). Active patches left
        out are reverted. All at once or not at all: a failure rolls every touched tensor
        back. Apply, revert and compaction (many patches out, one in) are its cases.
        Returns the new patch-set version."""
        with self._lock:
            current = {a.id: a for a in self._active}
            given = {p.id: p for p in new}
            if len(set(ids)) != len(ids):
                raise PatchError("a patch id appears twice in the new patch set")
            unknown = [i for i in ids if i not in current and i not in given]
            if unknown:
                raise PatchError(f"patch {unknown[0]} is neither active nor given")
            kept = [current[i] for i in ids if i in current]
            added: list[ActivePatch] = []
            for patch in (given[i] for i in ids if i not in current):
                self.check(patch, kept + added)
                added.append(ActivePatch(patch, patch_kind(patch.kind).deltas(self, patch)))
            entries = {a.id: a for a in kept + added}
            new_stack = [entries[i] for i in ids]
            removed = [a for a in self._active if a.id not in entries]
            reordered = [a.id for a in kept] != [a.id for a in self._active if a.id in entries]
            changed = (self._active + added) if reordered else (added + removed)  # whose tensors are recomputed
            names = sorted({name for a in changed for name in a.deltas})
            self._unverified.update(t for a in changed if _changes_forward(a)
                                    for t in patch_kind(a.patch.kind).targets(a.patch))
            try:
                self._write(names, new_stack)
                for entry in added:
                    _attach(self, entry)
                verified = self._verify(new_stack, bool(names) or any(map(_changes_forward, added))) \
                    if added else None
            except BaseException:
                for entry in added:
                    _detach(self, entry)
                self._write(names, self._active)  # roll back to the previous stack
                raise
            for entry in removed:
                _detach(self, entry)
            self._active = new_stack
            if verified is not None:
                self._remember_verified(verified)
            return self.version

    def _verify(self, stack: list[ActivePatch], forward_changed: bool) -> str | None:
        """Run `verify` on the model as `stack` makes it, unless the change left the forward
        pass as it was or this patch set passed before. Returns the set's digest when the
        check ran and passed (to remember), None when it did not run; raises when it failed."""
        if self.verify is None or not forward_changed:
            return None
        key = _set_digest([a.id for a in stack])
        if key in self._verified:
            self._verified.move_to_end(key)
            return None
        if not self.verify(frozenset(self._unverified)):
            raise PatchError("the patch makes the model's output non-finite (overflow) on a test input; "
                             "nothing was changed")
        return key

    def _remember_verified(self, key: str) -> None:
        self._verified[key] = None
        self._unverified.clear()
        while len(self._verified) > VERIFIED_SETS:
            self._verified.popitem(last=False)

    def revert_all(self) -> str:
        with self._lock:
            for entry in reversed(self._active):
                self.revert(entry.id)
            return self.version


def warm_up(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> None:
    """Run the whole path of a patch once on a tiny model of its own (serialize, parse and
    validate, check, stamp, apply, revert): the lazy imports and the first calls of the
    kernels it uses are paid at start-up, not by the first patch a server applies."""
    toy = nn.Module()
    toy.w = nn.Parameter(torch.zeros(2, 2, dtype=dtype, device=device), requires_grad=False)
    stack = PatchStack(toy)
    patch = stack.stamp(Patch(kind="delta", method="warm-up", base_model="", base_fingerprint="",
                              tensors={"delta.w.B": torch.ones(2, 1), "delta.w.A": torch.ones(1, 2)}))
    from patches.format import from_bytes, to_bytes

    stack.apply(from_bytes(to_bytes(patch)))
    stack.revert(patch.id)


def prepare(stack: PatchStack, names: Sequence[str]) -> None:
    """Do now what the first patch on the named weights (2-D) would do once: digest them for
    fingerprints, measure their peaks, allocate the buffers of their float32 sums, and on
    vLLM's CPU backend read their plain weights back (edit_serve.engines.vllm_worker). A zero
    rank-one delta on all of them is applied and reverted: the weights end bit for bit as they
    were (a zero delta composes to the base) and the active patch set is unchanged. On
    SmolLM2 a server's first rank-one apply over HTTP (a new client) took 65-70 ms without it,
    about 25 ms with it; the next ones 7-15 ms."""
    tensors = {}
    for name in names:
        rows, cols = stack.parameter(name).shape
        tensors[f"delta.{name}.B"], tensors[f"delta.{name}.A"] = torch.zeros(rows, 1), torch.zeros(1, cols)
    if tensors:
        patch = stack.stamp(Patch(kind="delta", method="warm-up", base_model="", base_fingerprint="",
                                  tensors=tensors))
        stack.apply(patch)
        stack.revert(patch.id)


def _changes_forward(entry: ActivePatch) -> bool:
    """Whether attaching `entry` changes what a forward pass computes (its kind says so: weight
    deltas and side modules do; an edit memory does not, its rows route requests outside the
    model)."""
    return patch_kind(entry.patch.kind).changes_forward


def _set_digest(ids: Sequence[str]) -> str:
    """sha256 of an ordered patch set (the version's full-length digest)."""
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()


def _attach(stack: PatchStack, entry: ActivePatch) -> None:
    patch_kind(entry.patch.kind).attach(stack, entry)


def _detach(stack: PatchStack, entry: ActivePatch) -> None:
    """Undo `_attach`; for an entry that was never attached (a rollback) it changes nothing."""
    patch_kind(entry.patch.kind).detach(stack, entry)


def patchset_with(ids: Sequence[str], patch_id: str, replaces: Sequence[str] = (),
                  position: int | None = None) -> list[str]:
    """The apply order `ids` with `patch_id` in it: in the place of the first of `replaces`
    still in `ids` (they all leave: a compaction), else at `position`, else on top. The one
    rule for where a patch goes, wherever an order is computed (stack, engines, service, log)."""
    kept = [i for i in ids if i not in replaces]
    at = min((ids.index(i) for i in replaces if i in ids), default=len(kept) if position is None else position)
    kept.insert(at, patch_id)
    return kept


def patchset_version(ids: list[str]) -> str:
    """A name for an ordered set of active patches; the same set gives the same name on every
    replica and after every restart."""
    if not ids:
        return BASE_VERSION
    digest = hashlib.sha256("\n".join(ids).encode()).hexdigest()[:12]
    return f"{len(ids)}-{digest}"
