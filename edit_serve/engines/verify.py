"""The verify pass of the hf engine: one short forward pass that must give finite logits, run by
the PatchStack after a change that alters the forward pass (patches.stack).

A full forward pass of a small model on the CPU costs about as much as reading its weights once
(80 ms for SmolLM2-135M at one thread, 5 tokens), and most changes touch few layers: T-Patcher
and CaliNET attach at the last FFNs, ROME writes one layer. So the pass keeps, for its fixed
input, what each decoder layer received (hidden states and call arguments) when it last passed,
and after a change replays only from the first layer the change touched (the stack says which
parameters and attach points changed since the last pass): the layers before it compute what
they computed then. The replay is checked once against a full forward pass on the model it
serves; a model where they differ (or that is not a stack of decoder layers, like T5) always runs
the full pass.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass

import torch
from torch import nn

from editors.nethook import first_tensor

log = logging.getLogger(__name__)


@dataclass
class _LayerCall:
    hidden: torch.Tensor  # (1, T, d) the layer's input
    args: tuple
    kwargs: dict


class VerifyPass:
    """`__call__(changed)`: whether the model's logits on `ids` are finite, replayed from the
    first layer of `changed` (parameter names and attach points) where it can be; `prefill(ids)`
    is the engine's own forward pass (the last position's logits), for a model that does not
    replay."""

    def __init__(self, model: nn.Module, layers: list[str], final_norm: str | None, head: str | None,
                 ids: list[int], prefill: Callable[[list[int]], torch.Tensor]):
        self.model, self.ids, self.prefill = model, torch.tensor([ids]), prefill
        self.layer_names, self.tail_names = layers, [n for n in (final_norm, head) if n]
        replayable = bool(layers) and final_norm is not None and head is not None \
            and not getattr(model.config, "is_encoder_decoder", False)
        self.layers = [model.get_submodule(n) for n in layers] if replayable else []
        self.norm = model.get_submodule(final_norm) if replayable else None
        self.head = model.get_submodule(head) if replayable else None
        self.calls: list[_LayerCall] | None = None  # the inputs of each layer at the last pass that held
        self.checked = not replayable  # whether the replay was compared with a full pass (or is off)
        self.replays = 0  # passes that ran from a later layer (for tests and logs)
        self._param_at: dict[int, int] | None = None  # id(parameter) -> the first layer using it

    def start(self, changed: Collection[str]) -> int:
        """The first layer whose input a change of `changed` can alter: the lowest layer holding
        one of them (for a parameter, under any of its names: a tied head is the embedding);
        the last layer for the final norm and the head (the replay starts at a layer's input),
        0 for anything else (the embeddings, a name not known)."""
        if self._param_at is None:
            self._param_at = {}
            for name, param in self.model.named_parameters(remove_duplicate=False):
                self._param_at[id(param)] = min(self._param_at.get(id(param), len(self.layers) - 1), self._at(name))

        def at(name: str) -> int:
            try:
                return self._param_at.get(id(self.model.get_parameter(name)), 0)
            except AttributeError:  # a module (a side module's attach point)
                return self._at(name)

        return min(map(at, changed), default=len(self.layers) - 1)

    def _at(self, name: str) -> int:
        for i, prefix in enumerate([*self.layer_names, *self.tail_names]):
            if name == prefix or name.startswith(prefix + "."):
                return min(i, len(self.layers) - 1)
        return 0

    @torch.inference_mode()
    def prepare(self) -> None:
        """Keep each layer's input and check a replay against a full pass now (at engine start),
        so that the first change already replays."""
        if self.layers and self.calls is None:
            self(None)
        if self.layers and not self.checked:
            self._keep(*self._check(len(self.layers) - 1), 0)

    @torch.inference_mode()
    def __call__(self, changed: Collection[str] | None = None) -> bool:
        if not self.layers:
            return bool(torch.isfinite(self.prefill(self.ids[0].tolist())).all())
        start = self.start(changed) if changed is not None and self.calls is not None else 0
        if start > 0 and not self.checked:
            return self._keep(*self._check(start), 0)
        logits, calls = self._replay(start) if start > 0 else self._full()
        if start > 0:
            self.replays += 1
        return self._keep(logits, calls, start)

    def _check(self, start: int) -> tuple[torch.Tensor, list[_LayerCall]]:
        """A full pass, compared with a replay from `start`; a difference turns replays off."""
        self.checked = True
        replayed, _ = self._replay(start)
        full, calls = self._full()
        if not torch.allclose(replayed, full, rtol=1e-4, atol=1e-4 * float(full.abs().max().clamp(min=1))):
            log.info("the verify pass replays no layers on this model: a replay from layer %d differs from "
                     "a full pass", start)
            self.layers = []
        return full, calls

    def _keep(self, logits: torch.Tensor, calls: list[_LayerCall], start: int) -> bool:
        finite = bool(torch.isfinite(logits).all())
        if finite and self.layers:  # only what held: a refused change is rolled back
            self.calls = (self.calls[:start] if start else []) + calls
        return finite

    def _full(self) -> tuple[torch.Tensor, list[_LayerCall]]:
        calls: list[_LayerCall] = []

        def keep(module, args, kwargs):
            calls.append(_LayerCall(args[0] if args else kwargs["hidden_states"], tuple(args[1:]),
                                    {k: v for k, v in kwargs.items() if k != "hidden_states"}))

        handles = [layer.register_forward_pre_hook(keep, with_kwargs=True) for layer in self.layers]
        try:
            logits = self.model(input_ids=self.ids, use_cache=False).logits[:, -1]
        finally:
            for handle in handles:
                handle.remove()
        return logits.float(), calls

    def _replay(self, start: int) -> tuple[torch.Tensor, list[_LayerCall]]:
        calls: list[_LayerCall] = []
        h = self.calls[start].hidden
        for i in range(start, len(self.layers)):
            call = self.calls[i]
            calls.append(_LayerCall(h, call.args, call.kwargs))
            h = first_tensor(self.layers[i](h, *call.args, **call.kwargs))
        return self.head(self.norm(h[:, -1:]))[:, -1].float(), calls
