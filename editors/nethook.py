"""Tracing hooks that always remove themselves: `Trace` (one module), `TraceDict` (several),
and `StopForward` to run only the part of a network up to the last traced module.

In the spirit of ROME's `util/nethook.py`. Two differences matter for a server: the hooks act
only in the thread that installed them (the serving engine may run forward passes on the
same model in another thread at the same time, and must not see an editor's captures or
edits), and `Trace.edit` may replace a module's output so editors can try a change without
touching a weight.

    with TraceDict(model, ["model.layers.4.mlp.down_proj"], retain_input=True, stop=True) as td:
        model(**batch)                      # stops right after layer 4's MLP
    keys = td["model.layers.4.mlp.down_proj"].input   # (B, T, d_ff)
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from patches.format import factors_cost_more

EditFn = Callable[[torch.Tensor, str], torch.Tensor]


class StopForward(Exception):
    """Raised by a hook to end a forward pass early; `Trace(stop=True)` swallows it."""


def get_module(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise LookupError(f"the model has no module {name!r} (check the profile's module templates)") from None


def first_tensor(value):
    return value[0] if isinstance(value, tuple) else value


def replace_first(value, tensor):
    """`value` (a tensor, or a tuple led by one) with `tensor` in the first place."""
    return (tensor, *value[1:]) if isinstance(value, tuple) else tensor


def _copy(t: torch.Tensor, clone: bool, detach: bool) -> torch.Tensor:
    if detach:
        t = t.detach()
    return t.clone() if clone else t


class Trace(contextlib.AbstractContextManager):
    """Hook one module for the duration of a `with` block.

    retain_output / retain_input: keep the module's output / first positional input (the
    tensor, not a copy, unless clone=True; detach=True cuts it from the graph).
    edit: fn(output, name) -> new output, applied before the output is retained.
    edit_input: fn(input, name) -> new first positional input, applied before the module runs
    (and before the input is retained).
    retain_call: keep the arguments the module is called with besides its first positional
    input (`args`, `kwargs`).
    stop: raise StopForward right after the module runs (the `with` swallows it).
    """

    def __init__(self, model: nn.Module, layer: str, *, retain_output: bool = True,
                 retain_input: bool = False, clone: bool = False, detach: bool = False,
                 edit: EditFn | None = None, edit_input: EditFn | None = None, retain_call: bool = False,
                 stop: bool = False):
        self.layer = layer
        self.input: torch.Tensor | None = None
        self.args: tuple = ()
        self.kwargs: dict = {}
        self.output: torch.Tensor | None = None
        self._stop = stop
        owner = threading.get_ident()

        def hook(module, args, output):
            if threading.get_ident() != owner:
                return output  # another thread (e.g. the serving engine) is not traced
            if retain_input and args:
                self.input = _copy(args[0], clone, detach)
            if edit is not None:
                output = replace_first(output, edit(first_tensor(output), layer))
            if retain_output:
                self.output = _copy(first_tensor(output), clone, detach)
            if stop:
                raise StopForward()
            return output

        def pre_hook(module, args):
            if threading.get_ident() != owner or not args:
                return None
            return (edit_input(args[0], layer), *args[1:])

        def call_hook(module, args, kwargs):
            if threading.get_ident() == owner:
                self.args, self.kwargs = tuple(args[1:]), dict(kwargs)

        module = get_module(model, layer)
        self._handles = [module.register_forward_hook(hook)]
        if edit_input is not None:
            self._handles.append(module.register_forward_pre_hook(pre_hook))
        if retain_call:
            self._handles.append(module.register_forward_pre_hook(call_hook, with_kwargs=True))

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()

    def __exit__(self, exc_type, exc, tb):
        self.close()
        return bool(self._stop and exc_type is not None and issubclass(exc_type, StopForward))


class TraceDict(OrderedDict, contextlib.AbstractContextManager):
    """`Trace` on several modules; `td[name]` is each one's Trace. With stop=True the forward
    pass ends after the LAST module in `layers` (list them in execution order)."""

    def __init__(self, model: nn.Module, layers: Iterable[str], *, retain_output: bool = True,
                 retain_input: bool = False, clone: bool = False, detach: bool = False,
                 edit: EditFn | None = None, stop: bool = False):
        super().__init__()
        layers = list(dict.fromkeys(layers))
        self._stop = stop
        try:
            for i, layer in enumerate(layers):
                self[layer] = Trace(model, layer, retain_output=retain_output, retain_input=retain_input,
                                    clone=clone, detach=detach, edit=edit,
                                    stop=stop and i == len(layers) - 1)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for trace in self.values():
            trace.close()

    def __exit__(self, exc_type, exc, tb):
        self.close()
        return bool(self._stop and exc_type is not None and issubclass(exc_type, StopForward))


class ReplaceForward(contextlib.AbstractContextManager):
    """Run `fns[module](*args, **kwargs)` instead of each module's own forward for the `with`
    block, in the calling thread only (another thread still runs the module's own forward).
    Hooks still run around the call. A module whose forward is already replaced is refused."""

    def __init__(self, fns: dict[nn.Module, Callable]):
        owner = threading.get_ident()
        self._modules: list[nn.Module] = []
        try:
            for module, fn in fns.items():
                if "forward" in vars(module):
                    raise RuntimeError(f"{type(module).__name__}'s forward is already replaced")
                plain = module.forward

                def forward(*args, _plain=plain, _fn=fn, **kwargs):
                    if threading.get_ident() != owner:
                        return _plain(*args, **kwargs)
                    return _fn(*args, **kwargs)

                module.forward = forward
                self._modules.append(module)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for module in self._modules:
            del module.forward
        self._modules = []

    def __exit__(self, exc_type, exc, tb):
        self.close()
        return False


def block_of(model: nn.Module, name: str) -> tuple[str, int] | None:
    """(the name of the list of repeated blocks, the index) of the block that holds module
    `name`: the nearest ModuleList on its path ("model.layers", 3 for
    "model.layers.3.mlp.down_proj"), or None."""
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:i])
        if parts[i].isdigit() and isinstance(get_module(model, prefix), nn.ModuleList):
            return prefix, int(parts[i])
    return None


def lowest_module(model, modules: Sequence[str]) -> str | None:
    """The module in the lowest block, where all of `modules` sit in one list of blocks (not
    the encoder's and the decoder's of a T5): nothing below its block changes with an edit."""
    found = [block_of(model, m) for m in modules]
    if not found or None in found or len({prefix for prefix, _ in found}) != 1:
        return None
    return min(zip(found, modules))[1]


class BlocksBelow:
    """Run the blocks below the one that holds `module` once and replay them after: where the
    calls change nothing below `module` (v*'s steps: the edit only changes what follows it),
    `keep()` records what the last of those blocks returns in one call and, inside
    `replay()`, each of them returns that again, for the rows `rows` of it (None: all), so
    they are not run. So does `module` itself where it is a whole block (MEMIT's v* at a
    block's output: the edit's hook still adds delta to what it returns). Nothing is replayed
    for `module` None, where a model has no list of blocks, `module` sits in the first block,
    a hook on one of those blocks would see the replayed output as new (it would act twice),
    or one's forward is wrapped already (accelerate's device hooks)."""

    def __init__(self, model, module: str | None):
        found = block_of(model, module) if module is not None else None
        blocks = []
        if found is not None:
            prefix, index = found
            upto = index + (module == f"{prefix}.{index}")  # a block edited at its output: that block too
            blocks = [get_module(model, f"{prefix}.{i}") for i in range(upto)]
        hooked = any(b._forward_hooks or b._forward_pre_hooks or "forward" in vars(b) for b in blocks)
        self.blocks = [] if hooked else blocks
        self.output = None  # what the last block below returned in the kept call (all rows)
        self.rows: torch.Tensor | None = None

    def keep(self):
        if not self.blocks:
            return contextlib.nullcontext()
        last = self.blocks[-1]
        plain = last.forward

        def kept(*args, **kwargs):
            self.output = plain(*args, **kwargs)
            return self.output

        return ReplaceForward({last: kept})

    def replay(self):
        if not self.blocks or self.output is None:
            return contextlib.nullcontext()
        hidden = first_tensor(self.output).detach()

        def replayed(*args, **kwargs):
            return replace_first(self.output, hidden if self.rows is None else hidden[self.rows])

        return ReplaceForward({b: replayed for b in self.blocks})


class AddToWeights(contextlib.AbstractContextManager):
    """Run Linear modules as if `deltas[name]` (a tensor of the weight's shape, a callable
    returning one, or low-rank factors (B, A)) were added to their weights, without writing a
    weight: each output gains `input @ delta^T`. Gradients flow into the deltas, so an optimizer can train them while
    the model's own parameters stay bit-identical. Thread-scoped like `Trace`.

    Factors of a rank at which they cost more per input than the weight itself (a MEMIT batch
    of thousands: rank 10,000 on a 576 x 1,536 weight) run as their product, formed once
    (`overlay_form`)."""

    def __init__(self, model: nn.Module,
                 deltas: dict[str, torch.Tensor | Callable[[], torch.Tensor] | tuple[torch.Tensor, torch.Tensor]]):
        owner = threading.get_ident()
        self._handles = []

        def make_hook(delta):
            def hook(module, args, output):
                if threading.get_ident() != owner:
                    return output
                x = args[0]  # (..., in)
                if isinstance(delta, tuple):
                    b, a = delta  # (out, r), (r, in)
                    return output + (x @ a.T.to(x.dtype)) @ b.T.to(x.dtype)  # (..., out)
                d = delta() if callable(delta) else delta  # (out, in)
                return output + torch.nn.functional.linear(x, d.to(x.dtype))  # (..., out)

            return hook

        try:
            for name, delta in deltas.items():
                self._handles.append(get_module(model, name).register_forward_hook(make_hook(overlay_form(delta))))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()

    def __exit__(self, exc_type, exc, tb):
        self.close()
        return False


def overlay_form(delta):
    """`delta` as `AddToWeights` runs it: low-rank factors (B (out, r), A (r, in)) become B @ A
    when x @ A^T @ B^T would take at least as many multiplications per input as x @ (B A)^T
    (`factors_cost_more`); anything else is returned as it is."""
    if isinstance(delta, tuple):
        b, a = delta
        if factors_cost_more(b.shape[1], b.shape[0], a.shape[1]):
            return b @ a
    return delta
