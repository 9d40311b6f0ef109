"""Training a trained editor (MEND, KE): one loop for every `EditorNet`.

Each step takes `edits_per_step` training examples, computes the gradient factors of their
requests on the unedited model, lets the network turn them into low-rank updates, and runs the
model with the updates overlaid (W + B @ A through hooks: the weights are never written, and
the loss is a function of the network's parameters):

    loss = c_edit * L_edit + c_loc * L_loc
    L_edit: mean target NLL of the requests' prompts and paraphrases under the edit
    L_loc:  KL(p_unedited || p_edited) at the answer tokens of unrelated prompts (the examples'
            neighbourhood prompts; every token of them with `loc_all_tokens`), plus, with
            `loc_same_relation` = k, the prompts of k other training examples that share the
            edit's template ("The mother tongue of {} is"), answered with their true targets:
            the same-relation neighbours that CounterFact's locality asks about

With `ema` > 0 the validation and the checkpoint use an exponential moving average of the
network's parameters (decay `ema`, warmed up as min(ema, (1 + t) / (10 + t))) rather than the
last step's, whose learned edit scales swing from one step to the next.

Every `val_every` steps the network edits each validation example alone and the step logs
edit success (top-1 accuracy of the new target's tokens on the edit prompt) and locality
(share of neighbourhood target tokens whose top-1 prediction is unchanged). Every `save_every`
steps the checkpoint and a resume state (`<checkpoint>.state.pt`: optimizer, step, data order,
curves) are written; `resume=True` continues from them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from editors.base import EditError, EditRequest
from editors.lm import logits_at, target_batch
from editors.nethook import AddToWeights, BlocksBelow, lowest_module
from editors.trained import EditorNet, batch_grad_factors, edit_rows, save_editor

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """The training run (recorded in the checkpoint)."""

    steps: int = 2000
    lr: float = 1e-4  # Adam, the network's parameters (the edit scales have their own, see EditorNet)
    edits_per_step: int = 2
    c_edit: float = 1.0
    c_loc: float = 1.0
    loc_all_tokens: bool = False  # KL over every token of the unrelated prompts, not only their answer's
    mlp_in: bool = False  # edit each layer's MLP input projections too, as the original MEND does (not only its output)
    loc_same_relation: int = 0  # extra unrelated prompts per edit: other examples' with the same template
    grad_clip: float = 10.0
    ema: float = 0.0  # > 0: validate and save an exponential moving average of the network's parameters
    val_every: int = 100
    val_size: int = 20
    save_every: int = 100
    log_every: int = 10
    max_minutes: float | None = None  # stop (and save) after this much wall time
    seed: int = 0

    def __post_init__(self):
        if min(self.steps, self.edits_per_step, self.val_every, self.save_every, self.log_every) < 1:
            raise ValueError("steps, edits_per_step, val_every, save_every and log_every must be at least 1")
        if self.lr <= 0 or min(self.c_edit, self.c_loc, self.val_size, self.loc_same_relation) < 0:
            raise ValueError("training needs lr > 0, c_edit >= 0, c_loc >= 0, val_size >= 0 and "
                             "loc_same_relation >= 0")
        if not 0 <= self.ema < 1:
            raise ValueError("ema must be in [0, 1)")


@dataclass(frozen=True)
class Example:
    """One training edit: the request, prompts that should follow it (paraphrases), and
    unrelated (prompt, target) pairs whose predictions must not move."""

    request: EditRequest
    paraphrases: tuple[str, ...] = ()
    unrelated: tuple[tuple[str, str], ...] = ()


@dataclass
class TrainState:
    step: int = 0
    order: list[int] = field(default_factory=list)
    cursor: int = 0
    epoch: int = 0
    train_curve: list[dict] = field(default_factory=list)
    val_curve: list[dict] = field(default_factory=list)
    seconds: float = 0.0


# --- the pieces of a step ---------------------------------------------------------------------


def _positions(batch, scored_only: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) of the scored tokens, or of every real token of the sequence the logits
    come from (the decoder's on an encoder-decoder model)."""
    if scored_only:
        at = batch.mask.nonzero()
    else:
        at = batch.inputs.get("decoder_attention_mask", batch.inputs["attention_mask"]).nonzero()
    return at[:, 0], at[:, 1]


def _token_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(-1) == labels).float().mean()) if len(labels) else float("nan")


def edit_objective(model, batch):
    """(mean target NLL, top-1 token accuracy) of the batch's rows under whatever overlay is active."""
    rows_, cols = _positions(batch, True)
    logits = logits_at(model, batch.inputs, rows_, cols)  # (N, V)
    logp = torch.log_softmax(logits.float(), -1)
    labels = batch.labels[rows_, cols]
    picked = logp.gather(-1, labels[:, None])[:, 0]  # (N,)
    per_row = torch.zeros(batch.mask.shape[0], device=picked.device).index_add(0, rows_, picked) / batch.mask.sum(1)
    return -per_row.mean(), _token_accuracy(logits.detach(), labels)


class Locality:
    """Unrelated prompts: the unedited model's distributions over their tokens, then the KL and
    the top-1 agreement of the edited model against them. The blocks below `first` (the lowest
    edited module) run in the unedited pass only and are replayed after."""

    def __init__(self, model, tokenizer, rows: Sequence[tuple[str, str]], all_tokens: bool = True,
                 first: str | None = None):
        self.model, self.rows = model, list(rows)
        self.batch = target_batch(model, tokenizer, self.rows) if self.rows else None
        if self.batch is None:
            return
        self.at = _positions(self.batch, not all_tokens)
        self.below = BlocksBelow(model, first)
        with torch.no_grad(), self.below.keep():
            self.base = torch.log_softmax(logits_at(model, self.batch.inputs, *self.at).float(), -1)  # (N, V)

    def _edited(self) -> torch.Tensor:
        with self.below.replay():
            return logits_at(self.model, self.batch.inputs, *self.at)

    def kl(self) -> torch.Tensor:
        if self.batch is None:
            return torch.zeros(())
        post = torch.log_softmax(self._edited().float(), -1)
        return (self.base.exp() * (self.base - post)).sum(-1).mean()

    @torch.no_grad()
    def agreement(self) -> float:
        if self.batch is None:
            return float("nan")
        return _token_accuracy(self._edited(), self.base.argmax(-1))


def _load1() -> float | None:
    """The machine's 1-minute load average (wall times on a shared CPU need it)."""
    import os

    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


# --- the loop -------------------------------------------------------------------------------


class Trainer:
    """Trains `net` to edit `model` on `examples` (see the module doc)."""

    def __init__(self, ctx, net: EditorNet, layers: Sequence[int], examples: Sequence[Example], cfg: TrainConfig,
                 output: str | Path, on_log: Callable[[dict], None] | None = None):
        if len(examples) <= cfg.val_size:
            raise EditError(f"{len(examples)} training examples leave none to train on after {cfg.val_size} "
                            "for validation")
        self.ctx, self.net, self.layers, self.cfg = ctx, net, list(layers), cfg
        self.model, self.tokenizer = ctx.model, ctx.tokenizer
        self.modules = list(net.shapes)
        self.first = lowest_module(self.model, self.modules)
        self.output = Path(output)
        self.state_file = self.output.with_name(self.output.name + ".state.pt")
        pool = list(examples)
        random.Random(cfg.seed).shuffle(pool)
        self.val, self.train = pool[:cfg.val_size], pool[cfg.val_size:]
        self.optimizer = torch.optim.Adam(net.param_groups(cfg.lr))
        self.state = TrainState()
        self.on_log = on_log
        self.ema = self._params_copy() if cfg.ema else None  # name -> the averaged parameter
        self.by_template: dict[str, list[Example]] = {}
        for e in self.train:
            self.by_template.setdefault(e.request.template, []).append(e)

    # --- state ----------------------------------------------------------------------------
    def resume(self) -> bool:
        """Continue from the resume state next to the checkpoint, if there is one."""
        from editors.trained import read_editor_info
        from safetensors.torch import load_file

        if not (self.state_file.is_file() and self.output.is_file()):
            return False
        info = read_editor_info(self.output)
        if info.method != self.net.method or info.layers != self.layers or info.fingerprint != self.ctx.fingerprint:
            raise EditError(f"{self.output} is another run (method {info.method}, layers {info.layers}, "
                            f"fingerprint {info.fingerprint}); remove it or write elsewhere to start afresh")
        if info.config != dataclasses.asdict(self.net.config):
            raise EditError(f"{self.output} was trained with network settings {info.config}; resume with the same")
        saved = torch.load(self.state_file, weights_only=False)
        self.net.load_state_dict(load_file(str(self.output)))
        if saved.get("live") is not None:  # with a moving average the checkpoint holds the average, not these
            self.net.load_state_dict(saved["live"], strict=False)
        if self.ema is not None:
            self.ema = saved["ema"] if saved.get("ema") is not None else self._params_copy()
        self.optimizer.load_state_dict(saved["optimizer"])
        self.state = TrainState(**saved["state"])
        torch.set_rng_state(saved["torch_rng"])
        log.info("resuming %s at step %d", self.output, self.state.step)
        return True

    def save(self) -> None:
        self.net.eval()
        with self._averaged() as live:  # the live parameters (None without `ema`): a resume goes on from them
            extra = {"train": dataclasses.asdict(self.cfg), "step": self.state.step,
                     "seconds": round(self.state.seconds, 1), "val_curve": self.state.val_curve,
                     "net": self.net.describe()}
            save_editor(self.net, self.output, base_model=self.ctx.profile.name, fingerprint=self.ctx.fingerprint,
                        layers=self.layers, extra=extra)
        tmp = self.state_file.with_name(self.state_file.name + ".tmp")
        torch.save({"optimizer": self.optimizer.state_dict(), "state": dataclasses.asdict(self.state),
                    "torch_rng": torch.get_rng_state(), "live": live, "ema": self.ema}, tmp)
        tmp.replace(self.state_file)

    def _params_copy(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.net.named_parameters()}

    def _update_ema(self) -> None:
        decay = min(self.cfg.ema, (1 + self.state.step) / (10 + self.state.step))
        with torch.no_grad():
            for n, p in self.net.named_parameters():
                self.ema[n].lerp_(p.detach(), 1 - decay)

    @contextlib.contextmanager
    def _averaged(self):
        """The averaged parameters in the network for the block, which gets a copy of the live
        ones (nothing to do, and None, without `ema`)."""
        if self.ema is None:
            yield None
            return
        live = self._params_copy()
        params = dict(self.net.named_parameters())
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(self.ema[n])
        try:
            yield live
        finally:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(live[n])

    def _next_examples(self) -> list[Example]:
        s, k = self.state, self.cfg.edits_per_step
        if not s.order or s.cursor + k > len(s.order):
            s.order = list(range(len(self.train)))
            random.Random(self.cfg.seed + 1 + s.epoch).shuffle(s.order)
            s.cursor, s.epoch = 0, s.epoch + 1
        picked = [self.train[i] for i in s.order[s.cursor:s.cursor + k]]
        s.cursor += k
        return picked

    def _same_relation(self, example: Example) -> list[tuple[str, str]]:
        """`loc_same_relation` other training examples' prompts with the edit's template, each
        with its true target (its new one where the record has none), drawn afresh each step."""
        k = self.cfg.loc_same_relation
        if not k:
            return []
        others = [e for e in self.by_template.get(example.request.template, ()) if e is not example]
        rng = random.Random(f"{self.cfg.seed}:{self.state.step}:{example.request.text}")
        picked = rng.sample(others, min(k, len(others)))
        return [(e.request.text, e.request.target_true or e.request.target_new) for e in picked]

    # --- steps ----------------------------------------------------------------------------
    def _factors(self, rows: Sequence[tuple[str, str]], n: int):
        """(the batch of `rows`, the BlocksBelow that replays its lower blocks, the gradient
        factors of its first `n` rows, their NLLs) from one unedited pass."""
        batch = target_batch(self.model, self.tokenizer, list(rows))
        below = BlocksBelow(self.model, self.first)
        with below.keep():
            factors, nll = batch_grad_factors(self.model, self.modules, batch, n)
        return batch, below, factors, nll

    def loss(self, examples: Sequence[Example]) -> tuple[torch.Tensor, dict]:
        """The training loss of editing `examples` together, and its parts."""
        requests = [e.request for e in examples]
        rows = edit_rows(requests) + [(p, e.request.target_new) for e in examples for p in e.paraphrases]
        # the requests first, then their paraphrases
        batch, below, factors, pre_nll = self._factors(rows, len(requests))
        if self.net.training:
            self.net.observe(factors)
        unrelated = Locality(self.model, self.tokenizer,
                             [u for e in examples for u in (*e.unrelated, *self._same_relation(e))],
                             all_tokens=self.cfg.loc_all_tokens, first=self.first)
        updates = self.net.updates(factors)
        with AddToWeights(self.model, updates):
            with below.replay():
                edit_loss, edit_acc = edit_objective(self.model, batch)
            loc_loss = unrelated.kl()
        loss = self.cfg.c_edit * edit_loss + self.cfg.c_loc * loc_loss
        return loss, {"loss": loss.item(), "edit_loss": edit_loss.item(), "loc_loss": loc_loss.item(),
                      "pre_nll": float(pre_nll.mean()), "edit_acc": edit_acc}

    def step(self, examples: Sequence[Example]) -> dict:
        """One optimizer step on `examples`."""
        self.net.train()
        loss, parts = self.loss(examples)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        if self.ema is not None:
            self._update_ema()
        return parts

    @torch.no_grad()
    def validate(self) -> dict:
        """Each validation example edited alone: mean edit success and locality."""
        self.net.eval()
        success, locality = [], []
        for e in self.val:
            batch, below, factors, _ = self._factors(edit_rows([e.request]), 1)
            unrelated = Locality(self.model, self.tokenizer, list(e.unrelated), all_tokens=False, first=self.first)
            with AddToWeights(self.model, self.net.updates(factors)):
                with below.replay():
                    success.append(edit_objective(self.model, batch)[1])
                agree = unrelated.agreement()
            if agree == agree:  # not nan
                locality.append(agree)
        mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
        return {"edit_success": mean(success), "locality": mean(locality)}

    def run(self, progress: bool = True) -> TrainState:
        cfg, s = self.cfg, self.state
        started = time.perf_counter() - s.seconds
        bar = tqdm(total=cfg.steps, initial=s.step, desc=f"train {self.net.method}", unit="step", disable=not progress)
        window: list[dict] = []
        try:
            if s.step == 0 and not s.val_curve and cfg.val_size:
                self._record_val(started)
            while s.step < cfg.steps:
                window.append(self.step(self._next_examples()))
                s.step += 1
                s.seconds = time.perf_counter() - started
                bar.update(1)
                if s.step % cfg.log_every == 0:
                    point = {"step": s.step, "seconds": round(s.seconds, 1), "load1": _load1(),
                             **{k: sum(w[k] for w in window) / len(window) for k in window[0]}}
                    s.train_curve.append(point)
                    window = []
                    bar.set_postfix(loss=f"{point['loss']:.3f}", acc=f"{point['edit_acc']:.2f}",
                                    kl=f"{point['loc_loss']:.3f}")
                    self._emit({"kind": "train", **point})
                if cfg.val_size and s.step % cfg.val_every == 0:
                    self._record_val(started)
                out_of_time = cfg.max_minutes is not None and s.seconds > cfg.max_minutes * 60
                if s.step % cfg.save_every == 0 or s.step == cfg.steps or out_of_time:
                    self.save()
                if out_of_time:
                    log.info("stopping at step %d: the %.1f-minute budget is spent", s.step, cfg.max_minutes)
                    break
        finally:
            bar.close()
        if s.step % cfg.save_every:
            self.save()
        return s

    def _record_val(self, started: float) -> None:
        with self._averaged():
            scores = self.validate()
        point = {"step": self.state.step, "seconds": round(time.perf_counter() - started, 1), **scores}
        self.state.val_curve.append(point)
        log.info("step %d: validation edit success %.3f, locality %.3f", point["step"], point["edit_success"],
                 point["locality"])
        self._emit({"kind": "val", **point})

    def _emit(self, point: dict) -> None:
        if self.on_log is not None:
            self.on_log(point)


# --- the whole run --------------------------------------------------------------------------


def train_editor(ctx, method: str, examples: Sequence[Example], output: str | Path, *,
                 layers: Sequence[int] | None = None, settings: dict | None = None, resume: bool = False,
                 progress: bool = True, cache: bool = True, on_log: Callable[[dict], None] | None = None
                 ) -> tuple[Path, TrainState]:
    """Train a `method` editor for the context's model and write its checkpoint to `output`
    (and, with `cache`, to the model's editor cache, where edits find it by default).
    `settings` mixes the network's settings and TrainConfig's (over the network's
    `train_defaults`); unknown ones are refused."""
    import shutil

    from editors.trained import editor_cache_file, editor_layers, net_class

    net_cls = net_class(method)
    settings = dict(settings or {})
    net_fields = {f.name for f in dataclasses.fields(net_cls.config_cls)}
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(settings) - net_fields - train_fields)
    if unknown:
        raise EditError(f"{method} training has no setting {', '.join(unknown)}; settings: "
                        f"{', '.join(sorted(net_fields | train_fields))}")
    try:
        net_cfg = net_cls.config_cls(**{**net_cls.model_defaults(ctx.model),
                                        **{k: v for k, v in settings.items() if k in net_fields}})
        train_cfg = TrainConfig(**{**net_cls.train_defaults,
                                   **{k: v for k, v in settings.items() if k in train_fields}})
    except (TypeError, ValueError) as e:
        raise EditError(f"bad {method} training settings: {e}") from None
    layers = editor_layers(ctx.profile, method, layers)
    shapes = {}
    for layer in layers:
        for module in [*(ctx.profile.mlp_in(layer) if train_cfg.mlp_in else []), ctx.profile.mlp_out(layer)]:
            shapes[module] = tuple(ctx.model.get_parameter(module + ".weight").shape)
    torch.manual_seed(train_cfg.seed)
    device = next(ctx.model.parameters()).device
    net = net_cls(net_cfg, shapes).to(device)
    trainer = Trainer(ctx, net, layers, examples, train_cfg, output, on_log=on_log)
    if resume:
        trainer.resume()
    state = trainer.run(progress=progress)
    if cache:
        target = editor_cache_file(ctx.fingerprint, method)
        target.parent.mkdir(parents=True, exist_ok=True)
        if Path(output).resolve() != target.resolve():
            shutil.copyfile(output, target)
        log.info("cached the %s editor for %s at %s", method, ctx.profile.name, target)
    return Path(output), state
