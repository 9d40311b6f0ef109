"""The target value v*: the output of one module at the last subject token that makes the new
target likely. Shared by ROME (module = the MLP output projection of the edited layer) and
MEMIT (module = the block at the last edited layer, so v* lives in the residual stream).

For each request a vector delta is added to the module's output at the last subject token of
the prompt under every context template (and of each of the request's rephrasings, as they
are: editors.keys.fitted), and optimized with Adam on
    mean NLL(target | prompt)  +  kl_factor * KL(p(. | "{subject} is a") before || after)
    +  weight_decay * |delta| / |v_init|^2
with |delta| clamped to clamp_norm_factor * |v_init|; v* = v_init + delta (Meng et al. 2022).
Requests are optimized together in chunks, each with its own delta; a request whose loss is
below `stop_loss`, or whose target NLL is below `stop_nll` (the target is already likely: the
loss then only creeps down through the weight decay while |delta| keeps growing), stops
moving, exactly as if it had been optimized alone. With `memo` (an edit context's `part`) each
chunk's result is kept as it finishes, so an interrupted search over thousands of requests
resumes at the chunk where it stopped (editors.context).

Only what the edit can change runs at each step: the tokens before each prompt's lookup token
run once (editors.lm.SuffixBatch), and after step 0 the blocks below the one that holds the
edited module are not run either: they return what they returned at step 0
(editors.nethook.BlocksBelow). `steps` counts the passes as the original does, steps - 1
updates after as many passes; the pass after the last update would only measure the loss, so
it is not run (v* is the same to the bit; `nll` is the target's NLL before that update).

With `dtype` bfloat16 (or `auto` where it pays, editors.precision) every step after the first
runs the model's Linears in bfloat16: step 0, which fixes v_init and the KL reference, stays
float32, so v* = v_init + delta starts from the exact output and only the search for delta
runs at the lower precision.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from tqdm.auto import tqdm

from editors import precision
from editors.base import EditRequest
from editors.keys import CONTEXT_TEMPLATES, check_templates, contextual, fitted
from editors.lm import from_lookup, logits_at, scored_positions, target_batch, target_nll
from editors.nethook import BlocksBelow, Trace
from editors.nullspace import NullSpaceConfig
from editors.precision import LowPrecisionLinears, resolve, resolved_name
from editors.stats import StatsSettings

log = logging.getLogger(__name__)

KL_TEMPLATES = ("{} is a",)


@dataclass(frozen=True)
class VStarConfig:
    steps: int = 20
    lr: float = 0.5
    weight_decay: float = 0.5
    kl_factor: float = 0.0625
    clamp_norm_factor: float = 4.0
    stop_loss: float = 5e-2
    stop_nll: float = 0.0  # 0: off
    chunk: int = 8  # requests optimized in one batch
    dtype: str = "float32"  # the Linears' dtype after step 0 (editors.precision: float32, bfloat16, auto)


@dataclass(frozen=True)
class KeyValueConfig(StatsSettings):
    """The settings ROME and MEMIT share: the layers, v*'s search, the key statistics and
    AlphaEdit's constraint. Each method's config sets its own defaults and checks."""

    method: ClassVar[str] = ""

    layers: list[int] | None = None  # default: the profile's entry for the method
    v_steps: int = 20
    v_lr: float = 0.5
    v_weight_decay: float = 0.5
    kl_factor: float = 0.0625
    v_stop_nll: float = 0.0  # stop a request's v* once its target NLL is below this (0: off)
    v_templates: int = len(CONTEXT_TEMPLATES)  # the first this many context templates make v*'s prompts
    v_dtype: str = "auto"  # v*'s steps after the first: float32, bfloat16 or auto (module doc)
    clamp_norm_factor: float = 4.0
    prompt_key_weight: float = 0.0  # weight of the bare prompt's key beside the templated ones (the method's doc)
    null_space: bool = False  # AlphaEdit's constraint (the method's doc)
    protect_edits: float = 0.0  # weight of the earlier edits' keys in C (the method's doc; 0: off)
    null_threshold: float = NullSpaceConfig.threshold
    null_l2: float = NullSpaceConfig.l2

    def __post_init__(self):
        if not 0 <= self.prompt_key_weight <= 1 or self.protect_edits < 0:
            raise ValueError(f"{self.method} needs 0 <= prompt_key_weight <= 1 and protect_edits >= 0")
        check_templates(self.method, self.v_templates)
        precision.check(self.method, self.v_dtype)
        NullSpaceConfig(self.null_threshold, self.null_l2)  # checks the values

    def templates(self) -> tuple[str, ...]:
        return tuple(CONTEXT_TEMPLATES[:self.v_templates])

    def vstar(self, chunk: int = 1) -> VStarConfig:
        return VStarConfig(steps=self.v_steps, lr=self.v_lr, weight_decay=self.v_weight_decay,
                           kl_factor=self.kl_factor, clamp_norm_factor=self.clamp_norm_factor,
                           stop_nll=self.v_stop_nll, chunk=chunk, dtype=self.v_dtype)


@dataclass
class VStar:
    target: torch.Tensor  # (n, d) v*
    init: torch.Tensor  # (n, d) the module's output before the edit
    nll: torch.Tensor  # (n,) mean NLL of the target on the edit prompts at the last pass (before the last update)
    steps: torch.Tensor  # (n,) forward passes each request took part in (steps - 1 for one that never stops)


#: memo(kind, key, make) -> make()'s tensors, or those kept from an earlier call with that key
Memo = Callable[[str, Mapping, Callable[[], Mapping[str, torch.Tensor]]], Mapping[str, torch.Tensor]]


def compute_vstar(model, tokenizer, module: str, requests: Sequence[EditRequest], templates: Sequence[str],
                  cfg: VStarConfig, memo: Memo | None = None) -> VStar:
    fields = [f.name for f in dataclasses.fields(VStar)]
    parts = []
    with tqdm(total=len(requests), desc="v* search", unit="edit", leave=False,
              disable=len(requests) <= cfg.chunk) as bar:  # a batch of hundreds takes many minutes on a CPU
        for i in range(0, len(requests), cfg.chunk):
            chunk = requests[i:i + cfg.chunk]

            def make(chunk=chunk):
                return vars(_optimize(model, tokenizer, module, chunk, templates, cfg))

            if memo is None:
                part = make()
            else:
                device = next(model.parameters()).device
                config = {**dataclasses.asdict(cfg), "dtype": resolved_name(cfg.dtype, device)}
                key = {"module": module, "requests": [r.to_dict() for r in chunk], "templates": list(templates),
                       "config": config, "device": str(device)}  # `auto` as what it ran: a CPU may lack bfloat16
                part = memo("vstar", key, make)
            parts.append(VStar(**{f: part[f] for f in fields}))
            bar.update(len(chunk))
    return VStar(*(torch.cat([getattr(p, f) for p in parts]) for f in fields))


def _optimize(model, tokenizer, module: str, requests: Sequence[EditRequest], templates: Sequence[str],
              cfg: VStarConfig) -> VStar:
    # rows: each request under every context template and its rephrasings (scored), then its KL prompts (not scored)
    rows, spans, owner, is_kl = [], [], [], []
    for r, req in enumerate(requests):
        for text, span in fitted(req, templates):
            rows.append((text, req.target_new)), spans.append(span), owner.append(r), is_kl.append(False)
        for kl in KL_TEMPLATES:
            (text, span), = contextual(EditRequest(kl, req.subject, req.target_new), ("{}",))
            rows.append((text, None)), spans.append(span), owner.append(r), is_kl.append(True)
    full = from_lookup(model, target_batch(model, tokenizer, rows, spans))  # only what follows the lookup changes
    device = full.lookup.device
    owner_all = torch.tensor(owner, device=device)  # (B,)
    kl_all = torch.tensor(is_kl, device=device)  # (B,)
    first_row = torch.tensor([owner.index(r) for r in range(len(requests))], device=device)  # (n,)
    kl_slot = torch.cumsum(kl_all, 0) - 1  # (B,) each KL row's index among the KL rows

    deltas = [torch.zeros(_width(model, module), device=device, requires_grad=True) for _ in requests]
    optimizer = torch.optim.Adam(deltas, lr=cfg.lr)
    init = kl_init = None  # (n, d) the module's output; (n_kl, V) KL reference log-probs (at step 0)
    active = torch.ones(len(requests), dtype=torch.bool, device=device)
    nll_final = torch.zeros(len(requests))
    steps = torch.zeros(len(requests), dtype=torch.long)
    below = BlocksBelow(model, module)
    with contextlib.ExitStack() as phase:
        for step in range(max(cfg.steps - 1, 1)):  # a last pass would only measure: its loss moves nothing
            idx = active[owner_all].nonzero()[:, 0]  # the rows of the requests still moving
            if step == 0:
                phase.enter_context(below.keep())
            if step == 1:  # step 0 fixed v_init, the KL reference and what the blocks below send
                phase.close()
                phase.enter_context(LowPrecisionLinears(model, resolve(cfg.dtype, device)))
                phase.enter_context(below.replay())
            below.rows = idx
            batch = full if len(idx) == len(owner) else full.select(idx)
            own, kl_rows = owner_all[idx], kl_all[idx]
            at = torch.arange(len(idx), device=device)
            hit = torch.zeros(*batch.inputs["input_ids"].shape, 1, device=device)  # (b, T, 1)
            hit[at, batch.lookup] = 1.0
            captured = {}

            def edit(output, _name):
                captured["out"] = output
                d = torch.stack(deltas)[own]  # (b, d)
                return output + (hit * d[:, None, :]).to(output.dtype)  # (b, T, d)

            score_rows, score_cols = scored_positions(batch)
            kl_at = at[kl_rows]
            with Trace(model, module, edit=edit, retain_output=False):
                logits = logits_at(model, batch.model_inputs(), torch.cat([score_rows, kl_at]),
                                   torch.cat([score_cols, batch.lookup[kl_at]]))  # (N + n_kl, V) only where needed
            kl_logp = torch.log_softmax(logits[len(score_rows):].float(), dim=-1)  # (n_kl, V)
            if step == 0:  # every row runs at step 0
                init = captured["out"][first_row, full.lookup[first_row]].detach().float()  # (n, d)
                init_norm = init.norm(dim=-1)  # (n,)
                kl_init = kl_logp.detach()
            nll_rows = target_nll(logits[:len(score_rows)], batch)  # (b,)
            kl_each = torch.nn.functional.kl_div(kl_logp, kl_init[kl_slot[idx[kl_rows]]], log_target=True,
                                                 reduction="none").sum(-1)  # (n_kl,)
            live, total = [], []
            for r in active.nonzero()[:, 0].tolist():
                nll = nll_rows[(own == r) & ~kl_rows].mean()
                kl = kl_each[own[kl_rows] == r].mean()
                loss = nll + cfg.kl_factor * kl + cfg.weight_decay * deltas[r].norm() / init_norm[r] ** 2
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("v* step %d request %d: nll %.3f kl %.3f loss %.3f |delta| %.2f", step, r,
                              float(nll.detach()), float(kl.detach()), float(loss.detach()),
                              float(deltas[r].norm().detach()))
                nll_final[r] = float(nll.detach())
                steps[r] += 1
                if float(loss.detach()) < cfg.stop_loss or float(nll.detach()) < cfg.stop_nll:
                    active[r] = False
                else:
                    live.append(r)
                    total.append(loss)
            if step == cfg.steps - 1 or not live:  # steps == 1: v* = v_init
                break
            grads = torch.autograd.grad(sum(total), [deltas[r] for r in live])
            for d in deltas:
                d.grad = None  # Adam skips requests that have stopped
            for r, g in zip(live, grads):
                deltas[r].grad = g
            optimizer.step()
            with torch.no_grad():
                for r in live:
                    limit = cfg.clamp_norm_factor * init_norm[r]
                    norm = deltas[r].norm()
                    if norm > limit:
                        deltas[r].mul_(limit / norm)
    target = init + torch.stack(deltas).detach()
    log.debug("v* at %s: final NLL %s", module, [round(float(x), 3) for x in nll_final])
    return VStar(target.cpu(), init.cpu(), nll_final, steps)


def _width(model, module: str) -> int:
    """The output width of `module` (a Linear's out_features or the model's hidden size)."""
    mod = model.get_submodule(module)
    out = getattr(mod, "out_features", None)
    return int(out) if out is not None else int(model.config.hidden_size)
