"""T-Patcher (Huang et al. 2023, "Transformer-Patcher"): for each edit, a few neurons added to
the last FFN layer, out += relu(x . k + b) v, trained so they fire on the edit and nowhere else.

One neuron per target token (at most `max_neurons`): neuron j's key starts at the direction
from the memory's mean input to the edit's input at the position that predicts target token j.
Adam trains keys, biases and values on three losses (the paper's):
- edit loss: NLL of the target tokens, the prompt under the first `prompts` context templates
  of editors.keys (the bare prompt first);
- activation loss: mean relu(activation_margin - a) of each neuron's pre-activation a at its
  position of the edit's prompts, so it fires on its edit;
- memory loss: mean relu(a + memory_margin) over every position of the memory (editors.side:
  the active edits' prompts, the edit's template with other subjects, neutral sentences), so
  it stays silent there.
The requests of one patch are trained one after another, each with the others as memory and
the neurons already trained attached. The model's weights are never touched; the patch holds
one ffn_neurons side module at the FFN block (the profile's `mlp`) of the `side` layer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from tqdm import tqdm

from editors.base import editor
from editors.common import method_layers
from editors.keys import CONTEXT_TEMPLATES, check_templates, fitted
from editors.lm import scored_positions, target_batch, target_nll
from editors.side import Neurons, attach_inputs, memory_inputs, side_logits, side_patch, silent_rows, tail
from patches.side import module_dims

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TPatcherConfig:
    # Defaults chosen on SmolLM2 (CounterFact, records in sequence; README): the neuron's
    # boundary is pushed toward its edit (activation_margin 1, memory_margin 20), since
    # neighbouring prompts share the edit's last-layer state more than any memory text does.
    # 100 edits: reliability 1.000, generality 0.148, locality 0.936 (memory_margin 10: 1.000 /
    # 0.206 / 0.889); 20 edits, margins 2 / 1: 0.900 / 0.475 / 0.653.
    layers: list[int] | None = None  # one layer; default: the profile's `side` (the last FFN)
    max_neurons: int = 5  # one neuron per target token, at most this many (the survey: 1 to 5)
    prompts: int = 3  # context templates the edit is trained under (editors.keys.CONTEXT_TEMPLATES)
    steps: int = 120
    lr: float = 0.05
    activation_margin: float = 1.0  # pre-activation the neuron must reach on its edit
    memory_margin: float = 20.0  # pre-activation it must stay below, negated, on the memory
    activation_weight: float = 1.0
    memory_weight: float = 1.0
    stop_loss: float = 0.05  # stop once the edit loss is below this and the margins hold

    def __post_init__(self):
        if self.layers is not None and len(self.layers) != 1:
            raise ValueError("t-patcher adds its neurons to one layer; give one layer")
        check_templates("t-patcher", self.prompts, "prompts")
        if not 1 <= self.max_neurons <= 64:
            raise ValueError("t-patcher needs 1 <= max_neurons <= 64")
        if self.steps < 1 or self.lr <= 0 or self.activation_margin <= 0 or self.memory_margin < 0:
            raise ValueError("t-patcher needs steps >= 1, lr > 0, activation_margin > 0 and memory_margin >= 0")


def _init(x_edit: torch.Tensor, x_memory: torch.Tensor, d_out: int) -> Neurons:
    """Neurons whose keys point from the memory's mean input to the edit's inputs x_edit
    (n, d_in), biased to sit halfway between the edit and the memory's closest input."""
    keys = torch.nn.functional.normalize(x_edit - x_memory.mean(0), dim=-1)  # (n, d_in)
    on = (keys * x_edit).sum(-1)  # (n,)
    off = (x_memory @ keys.T).max(0).values  # (n,)
    bias = -(on + off) / 2
    values = torch.zeros(len(keys), d_out, device=keys.device)
    return Neurons(*(t.clone().requires_grad_(True) for t in (keys, bias, values)), "relu")


def _train_request(ctx, module: str, request, others, trained: list[Neurons], cfg: TPatcherConfig) -> Neurons:
    model, tokenizer = ctx.model, ctx.tokenizer
    rows = [(text, request.target_new) for text, _ in fitted(request, CONTEXT_TEMPLATES[:cfg.prompts])]
    batch = target_batch(model, tokenizer, rows)
    rows_at, cols_at = scored_positions(batch)  # row-major: each row's target tokens in order
    order = torch.cat([torch.arange(int(c)) for c in batch.mask.sum(1)])  # (N,) target token index
    owner = order.clamp(max=cfg.max_neurons - 1)  # (N,) the neuron each scored position belongs to
    n = int(owner.max()) + 1
    rest = tail(ctx, module, batch, rows_at, cols_at, {module: trained})
    x = rest.scored_inputs if rest is not None else attach_inputs(model, module, batch)[rows_at, cols_at]  # (N, d_in)
    memory_text = silent_rows(ctx, request, others, CONTEXT_TEMPLATES[:cfg.prompts])
    memory = memory_inputs(ctx, module, memory_text).to(x.device)  # (M, d_in)
    first = torch.stack([x[owner == j].mean(0) for j in range(n)])  # (n, d_in)
    neurons = _init(first, memory, module_dims(model.get_submodule(module))[1])
    optimizer = torch.optim.Adam(neurons.params(), lr=cfg.lr)
    mine = torch.nn.functional.one_hot(owner, n).bool()  # (N, n) each position's own neuron
    bar = tqdm(range(cfg.steps), desc="t-patcher", leave=False, disable=None)
    for _ in bar:
        # replayed from the attach layer on (the trained neurons are in its cached output)
        attach = {module: [neurons] if rest is not None else [*trained, neurons]}
        nll = target_nll(side_logits(model, rest, batch, rows_at, cols_at, attach), batch).mean()
        a_edit = x @ neurons.keys.T + neurons.key_bias  # (N, n)
        a_memory = memory @ neurons.keys.T + neurons.key_bias  # (M, n)
        act = torch.relu(cfg.activation_margin - a_edit[mine]).mean()
        mem = torch.relu(a_memory + cfg.memory_margin).mean()
        loss = nll + cfg.activation_weight * act + cfg.memory_weight * mem
        bar.set_postfix(nll=f"{nll.item():.3f}", act=f"{act.item():.3f}", mem=f"{mem.item():.3f}")
        if nll.item() < cfg.stop_loss and act.item() == 0 and mem.item() == 0:
            break
        for p, g in zip(neurons.params(), torch.autograd.grad(loss, neurons.params())):
            p.grad = g  # through autograd.grad, so the model's own parameters collect no gradient
        optimizer.step()
    log.info("t-patcher %r: %d neuron(s), edit loss %.4f, activation loss %.4f, memory loss %.4f (%d inputs)",
             request.subject, n, nll.item(), act.item(), mem.item(), len(memory))
    return neurons


@editor("t-patcher", TPatcherConfig, kind="side_module", rephrasings=True)
def compute(ctx, requests, cfg: TPatcherConfig):
    """T-Patcher: trained neurons added to the last FFN, firing only on their edit."""
    (layer,) = method_layers(ctx.profile, "side", cfg.layers)
    module = ctx.profile.mlp(layer)
    trained: list[Neurons] = []
    for i, request in enumerate(requests):
        others = [r for j, r in enumerate(requests) if j != i]
        trained.append(_train_request(ctx, module, request, others, trained, cfg))
    return side_patch("t-patcher", {module: Neurons.cat(trained)}, {module: "t_patcher"})
