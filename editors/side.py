"""What the side-module editors (T-Patcher, CaliNET) share: extra FFN neurons trained while
attached through hooks, the inputs an attach point sees, the memory of text the neurons must
leave alone, and the side-module patch they produce.

The memory is built at edit time from what the context knows, never from a data set: the
prompts and rephrasings (with their targets) of the edits already active on the model and of
the patch's other requests about other subjects, the edit's own
relation template filled with a fixed list of other subjects, and a fixed set of neutral
sentences (`NEUTRAL_TEXT`), each split into a prompt and its last word.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from editors.base import EditError, EditRequest
from editors.common import canonical
from editors.lm import TargetBatch, fill, logits_at, mlp_positions, output_head, target_batch
from editors.nethook import Trace, first_tensor
from patches import Patch
from patches.side import ffn_neurons

log = logging.getLogger(__name__)

#: subjects of many kinds, put into an edit's template as prompts its neurons must not answer
MEMORY_SUBJECTS: tuple[str, ...] = (
    "Barack Obama", "Toyota", "the Nile", "Mozart", "Microsoft", "Tokyo", "Albert Einstein", "Germany",
    "Pablo Picasso", "Canada", "Lionel Messi", "Harvard University", "Marie Curie", "the BBC", "Brazil",
    "William Shakespeare", "Angela Merkel", "Volkswagen", "Mount Everest", "Beethoven", "Apple", "Cairo",
    "Isaac Newton", "Japan", "Vincent van Gogh", "Australia", "Roger Federer", "Oxford University",
    "Nelson Mandela", "CNN", "India", "Leo Tolstoy", "Napoleon", "Sony", "the Danube", "Frida Kahlo",
    "Google", "Madrid", "Charles Darwin", "Mexico", "Claude Monet", "Sweden", "Michael Jordan",
    "Stanford University", "Queen Elizabeth II", "Al Jazeera", "Nigeria", "Victor Hugo", "Elvis Presley",
    "Nokia", "Lake Geneva", "Johann Sebastian Bach", "Intel", "Istanbul", "Galileo Galilei", "Argentina",
    "Rembrandt", "Norway", "Serena Williams", "Yale University", "Mahatma Gandhi", "Reuters", "Egypt",
    "Franz Kafka", "Boeing", "Windows 95", "the Beatles", "FC Barcelona", "the French language",
)

#: entities close to a subject, that share its attributes but not its edit
SUBJECT_VARIANTS: tuple[str, ...] = (
    "a rival of {}", "the successor of {}", "the predecessor of {}", "a neighbour of {}", "a partner of {}",
    "a relative of {}", "something like {}", "a copy of {}", "the maker of {}", "the home of {}",
)

#: neutral sentences: the prompt is all but the last word, the target the last word
NEUTRAL_TEXT: tuple[str, ...] = (
    "The weather today is sunny and warm",
    "She opened the door and walked into the kitchen",
    "Water boils at one hundred degrees",
    "The train leaves the station at noon",
    "He wrote a long letter to his friend",
    "The museum is open every day of the week",
    "Children like to play in the park",
    "The river flows into the sea",
    "Our team won the final match",
    "The book was published last year",
    "Paris is the capital of France",
    "The sun rises in the east",
)


@dataclass
class Neurons:
    """Trainable extra neurons at one attach point: keys (n, d_in), key_bias (n,), values
    (n, d_out); their output act(x @ keys.T + key_bias) @ values is added to the attach
    point's output (patches.side's `ffn_neurons`)."""

    keys: torch.Tensor
    key_bias: torch.Tensor
    values: torch.Tensor
    activation: str

    def params(self) -> list[torch.Tensor]:
        return [self.keys, self.key_bias, self.values]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return ffn_neurons(x, self.keys, self.key_bias, self.values, self.activation)

    @classmethod
    def cat(cls, parts: Sequence["Neurons"]) -> "Neurons":
        """The neurons of several groups as one module (detached)."""
        return cls(*(torch.cat([getattr(p, f).detach() for p in parts]) for f in ("keys", "key_bias", "values")),
                   parts[0].activation)


def _adding(model, module: str, neurons: Sequence[Neurons]) -> Trace:
    """A trace that adds the neurons' output on the module's input to its output."""
    trace: Trace | None = None

    def add(output, _name):
        return output + sum(n(trace.input) for n in neurons)  # input retained before `edit` runs

    trace = Trace(model, module, retain_input=True, retain_output=False, edit=add)
    return trace


@contextlib.contextmanager
def attached(model, groups: Mapping[str, Sequence[Neurons]]) -> Iterator[None]:
    """Run `model` with each attach point's neuron groups added to its output, as the
    patch's hooks will once applied; the hooks go when the block ends."""
    with contextlib.ExitStack() as stack:
        for module, neurons in groups.items():
            stack.enter_context(_adding(model, module, neurons))
        yield


@torch.no_grad()
def attach_inputs(model, module: str, batch: TargetBatch) -> torch.Tensor:
    """(B, T, d_in) the input of `module` over the batch, on the model as it runs now (the
    forward pass stops after `module`)."""
    with Trace(model, module, retain_input=True, retain_output=False, detach=True, stop=True) as trace:
        model(**batch.inputs, use_cache=False)
    return trace.input.float()


@dataclass
class Tail:
    """The network after an FFN attach point, replayed from cached activations: logits at the
    scored positions as a function of a side module's output there. The attach layer's output
    is cached; what the side module adds goes into it and runs through the later layers
    (called with the arguments the model gave them), the final norm and the head. At
    the last layer only the scored positions need computing."""

    module: str  # the attach point
    inputs: torch.Tensor  # (B, T, d_in) the attach point's input
    residual: torch.Tensor  # (B, T, d) the attach layer's output, before anything is added
    layers: list[torch.nn.Module]  # the layers after it
    args: tuple  # what the model passed them besides the hidden states
    kwargs: dict
    norm: torch.nn.Module
    head: torch.nn.Module
    rows: torch.Tensor  # (N,) the scored positions
    cols: torch.Tensor

    @property
    def scored_inputs(self) -> torch.Tensor:  # (N, d_in)
        return self.inputs[self.rows, self.cols]

    def logits(self, side: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:  # -> (N, V)
        if not self.layers:
            h = self.residual[self.rows, self.cols] + side(self.scored_inputs).to(self.residual.dtype)  # (N, d)
        else:
            h = self.residual + side(self.inputs).to(self.residual.dtype)  # (B, T, d)
            for layer in self.layers:
                h = first_tensor(layer(h, *self.args, **self.kwargs))
            h = h[self.rows, self.cols]
        return self.head(self.norm(h))


def _layer_index(profile, module: str) -> int | None:
    return next((i for i in range(profile.num_layers) if module.startswith(profile.layer(i) + ".")), None)


def tail(ctx, module: str, batch: TargetBatch, rows: torch.Tensor, cols: torch.Tensor,
         groups: Mapping[str, Sequence[Neurons]], seed: int = 0) -> Tail | None:
    """The Tail of the FFN block `module` over `batch` (with `groups` attached), or None where
    a replay would not be exact: no final norm in the profile, no output head, `module` not in
    one of the profile's layers, or a trial neuron whose output, replayed through the tail,
    gives other logits than a full forward pass with it attached (a layer that takes its hidden
    states otherwise, a scaled or soft-capped head)."""
    model, profile, final, head = ctx.model, ctx.profile, ctx.profile.modules.final_norm, output_head(ctx.model)
    at = _layer_index(profile, module)
    if final is None or head is None or at is None:
        return None
    later = [profile.layer(i) for i in range(at + 1, profile.num_layers)]
    with torch.no_grad():
        with attached(model, groups), Trace(model, module, retain_input=True, retain_output=False, detach=True) as x, \
                Trace(model, profile.layer(at), detach=True) as out, \
                Trace(model, later[0] if later else final, retain_output=False, retain_call=True) as nxt:
            model(**batch.inputs, use_cache=False)
        found = Tail(module, x.input.float(), out.output, [model.get_submodule(n) for n in later], nxt.args, nxt.kwargs,
                     model.get_submodule(final), model.get_submodule(head), rows, cols)
        d_in, d_out = found.inputs.shape[-1], found.residual.shape[-1]
        generator = torch.Generator().manual_seed(seed)
        trial = Neurons(torch.randn(4, d_in, generator=generator).to(found.inputs) / found.inputs.norm(dim=-1).mean(),
                        torch.zeros(4).to(found.inputs), torch.randn(4, d_out, generator=generator).to(found.inputs),
                        "relu")
        with attached(model, {**groups, module: [*groups.get(module, []), trial]}):
            full = model(**batch.inputs, use_cache=False).logits[rows, cols]
        try:
            short = found.logits(trial)
        except (TypeError, ValueError, RuntimeError):  # a layer that wants its inputs otherwise
            log.debug("no tail replay after %s", module, exc_info=True)
            return None
    scale = full.abs().max().clamp(min=1.0)
    return found if short.shape == full.shape and bool((short - full).abs().max() <= 1e-3 * scale) else None


def side_logits(model, rest: Tail | None, batch: TargetBatch, rows: torch.Tensor, cols: torch.Tensor,
                groups: Mapping[str, Sequence[Neurons]]) -> torch.Tensor:
    """(N, V) logits at (rows, cols) of `batch` with `groups` attached: replayed through `rest`
    (whose attach point must come first among the groups'; the others run as hooks in the
    replayed layers), or a full forward pass where `rest` is None."""
    if rest is None:
        with attached(model, groups):
            return logits_at(model, batch.inputs, rows, cols)
    own = groups.get(rest.module, [])
    with attached(model, {m: g for m, g in groups.items() if m != rest.module}):
        return rest.logits(lambda x: sum(n(x) for n in own))


def silent_rows(ctx, request: EditRequest, others: Sequence[EditRequest], templates: Sequence[str] = ("{}",)
                ) -> list[tuple[str, str]]:
    """(prompt, target) pairs the request's neurons must stay silent on (see the module doc);
    `others` are the other requests of the same patch; the edit's template with other
    subjects comes under each of the context `templates` (editors.keys)."""
    active = [EditRequest.from_dict(r) for entry in ctx.stack.active for r in entry.patch.requests]
    rows = [(text, r.target_new) for r in [*active, *others] if r.subject != request.subject for text in r.texts]
    rows += [(fill(t.replace("{}", request.template, 1), s)[0], request.target_new)
             for t in templates for s in MEMORY_SUBJECTS if s != request.subject]
    rows += [tuple(t.rsplit(" ", 1)) for t in NEUTRAL_TEXT]
    rows += [(fill(request.template, v.format(request.subject))[0], request.target_new) for v in SUBJECT_VARIANTS]
    return rows


def memory_inputs(ctx, module: str, rows: Sequence[tuple[str, str]], batch_size: int = 32) -> torch.Tensor:
    """(M, d_in) the attach point's inputs at every position of the memory rows."""
    parts = []
    for i in range(0, len(rows), batch_size):
        batch = target_batch(ctx.model, ctx.tokenizer, rows[i:i + batch_size])
        parts.append(attach_inputs(ctx.model, module, batch)[mlp_positions(batch)])
    return torch.cat(parts)


def side_patch(method: str, groups: Mapping[str, Neurons], names: Mapping[str, str]) -> Patch:
    """A side-module patch of one ffn_neurons module per attach point (`names`: attach point
    -> module name); `compute_patch` fills in requests, config and the base fingerprint."""
    tensors, modules = {}, {}
    for attach, neurons in groups.items():
        name = names[attach]
        for field, t in zip(("keys", "key_bias", "values"), neurons.params()):
            if not bool(torch.isfinite(t).all()):
                raise EditError(f"{method} produced non-finite {field} at {attach} (the training diverged; "
                                "lower the learning rate)")
            tensors[f"side.{name}.{field}"] = canonical(t)
        modules[name] = {"type": "ffn_neurons", "attach": attach, "config": {"activation": neurons.activation}}
    return Patch(kind="side_module", method=method, base_model="", base_fingerprint="", tensors=tensors,
                 side_modules=modules)
