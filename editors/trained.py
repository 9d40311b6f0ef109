"""What the trained editors (MEND, KE) share: the fine-tuning gradient's factors, the
checkpoint of an editor network, and the edit itself.

A trained editor is an `nn.Module` (`EditorNet`) that turns the gradient factors of a batch of
requests into a low-rank update of each edited MLP projection (the output projections, and with
training's `mlp_in` the input projections too, as in the original MEND):

    factors = grad_factors(model, tokenizer, modules, requests)   # per module: u (N, in), delta (N, out)
    updates = net.updates(factors)                                # per module: (B (out, r), A (r, in))

For a linear layer the gradient of the loss is sum_t delta_t u_t^T over the tokens t, so the
factors are the layer's input u_t and the gradient at its output delta_t, both exact and cheap
(one forward pass, and a backward pass through the edited layers and above only). Training
(editors.training) runs the model with W + B @ A overlaid through hooks (`AddToWeights`), so
the update stays a function of the editor's parameters and the model's weights are never
written; a patch stores B and A as an ordinary format-1 low-rank delta.

The checkpoint is a safetensors file of the network's tensors with metadata naming the method,
the base model and its fingerprint (editors.stats.model_fingerprint), the edited modules and
the network config; one made for another model is refused. Trained checkpoints are cached
under `cache_dir()/editors/<fingerprint>/<method>.safetensors`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from editors.base import EditError, EditRequest
from editors.common import delta_patch, low_rank, method_layers
from editors.files import save_tensors
from editors.keys import other_subject_keys
from editors.lm import IGNORE, TargetBatch, logits_at, mlp_positions, scored_positions, target_batch, target_nll
from editors.nethook import AddToWeights, BlocksBelow, TraceDict, lowest_module
from editors.stats import StatsSettings, mom2_lu, shrunk_mom2

log = logging.getLogger(__name__)

META = "edit_serve.editor."
CHECKPOINT_FORMAT = "1"


# --- the gradient factors -------------------------------------------------------------------


@dataclass
class Factors:
    """The fine-tuning gradient of one module, token by token: dL/dW = delta^T @ u.

    u: (N, in) the module's inputs; delta: (N, out) the loss gradient at its outputs; row: (N,)
    the request each token belongs to (0..n_requests-1)."""

    u: torch.Tensor
    delta: torch.Tensor
    row: torch.Tensor
    n_requests: int
    text: torch.Tensor | None = None  # (n_requests, T, d) the edit inputs' token embeddings (detached)
    text_mask: torch.Tensor | None = None  # (n_requests, T) their real tokens


def edit_rows(requests: Sequence[EditRequest]) -> list[tuple[str, str]]:
    return [(r.text, r.target_new) for r in requests]


def grad_factors(model, tokenizer, modules: Sequence[str], rows: Sequence[tuple[str, str]]
                 ) -> tuple[dict[str, Factors], torch.Tensor]:
    """The factors of the gradient of sum_i NLL_i (each row's mean target NLL) at each module
    in `modules`, and the (B,) per-row losses. Nothing but the modules' outputs takes a gradient:
    the backward pass runs from the logits down to the lowest module only."""
    return batch_grad_factors(model, modules, target_batch(model, tokenizer, list(rows)), len(rows))


def batch_grad_factors(model, modules: Sequence[str], batch: TargetBatch, n: int
                       ) -> tuple[dict[str, Factors], torch.Tensor]:
    """`grad_factors` of the first `n` rows of `batch`. Its other rows run in the same call
    (a trainer scores the edit's paraphrases later in the same batch) but are not scored,
    take no gradient and give no factors."""
    labels = batch.labels.clone()
    labels[n:] = IGNORE
    scored = TargetBatch(batch.inputs, labels, batch.lookup)
    with torch.enable_grad():
        with TraceDict(model, modules, retain_input=True, edit=_track) as td:
            nll = target_nll(logits_at(model, batch.inputs, *scored_positions(scored)), scored)[:n]  # (n,)
        outputs = [td[m].output for m in modules]
        grads = torch.autograd.grad(nll.sum(), outputs, allow_unused=True)
    keep = mlp_positions(batch).clone()  # (B, T)
    keep[n:] = False
    row = keep.nonzero()[:, 0]
    with torch.no_grad():
        text = model.get_input_embeddings()(batch.inputs["input_ids"][:n]).float()  # (n, T, d)
    text_mask = batch.inputs["attention_mask"][:n].bool()
    factors = {}
    for m, out, g in zip(modules, outputs, grads):
        g = torch.zeros_like(out) if g is None else g
        factors[m] = Factors(u=td[m].input.detach()[keep].float(), delta=g.detach()[keep].float(), row=row,
                             n_requests=n, text=text, text_mask=text_mask)
    return factors, nll.detach()


def _track(output: torch.Tensor, _name: str) -> torch.Tensor:
    """Make a module's output part of the graph even when no weight takes a gradient."""
    return output if output.requires_grad else output.detach().requires_grad_()


# --- the editor network ---------------------------------------------------------------------


class EditorNet(nn.Module):
    """A trained editor: `updates(factors)` -> {module: (B (out, r), A (r, in))}, differentiable
    in the editor's parameters. Subclasses set `method` and `config_cls` (a dataclass of the
    network's settings, with the starting edit learning rate `init_lr`) and are built as
    cls(config, shapes), shapes = {module: (out, in)}. Each edited module has a learned edit
    learning rate, kept in log space (`log_lrs`) and trained faster than the rest."""

    method: str = ""
    config_cls: type = object
    #: the training settings (editors.training.TrainConfig) this network is trained with by default
    train_defaults: dict = {}

    def __init__(self, config, shapes: Mapping[str, tuple[int, int]]):
        super().__init__()
        self.config = config
        self.shapes = dict(shapes)
        self.log_lrs = nn.Parameter(torch.full((len(self.shapes),), math.log(config.init_lr)))

    def updates(self, factors: Mapping[str, Factors]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError

    def owners(self, factors: Mapping[str, Factors]) -> dict[str, torch.Tensor]:
        """Per module, the request each column of `updates`' B (row of A) belongs to: one
        column per token here (`Factors.row`)."""
        return {m: f.row for m, f in factors.items()}

    @classmethod
    def model_defaults(cls, model) -> dict:
        """Network settings that follow from the model (e.g. its embedding width)."""
        return {}

    def observe(self, factors: Mapping[str, Factors]) -> None:
        """Called with each training batch's factors before `updates` (running statistics)."""

    def param_groups(self, lr: float) -> list[dict]:
        """Optimizer groups: the learned edit learning rates at 1e-2, the rest at `lr`."""
        rest = [p for n, p in self.named_parameters() if n != "log_lrs" and p.requires_grad]
        return [{"params": rest, "lr": lr}, {"params": [self.log_lrs], "lr": 1e-2}]

    def describe(self) -> dict:
        return {"edit_lrs": [round(float(x), 8) for x in self.log_lrs.detach().exp()]}


def updates_patch(method: str, model, updates: Mapping[str, tuple[torch.Tensor, torch.Tensor]]):
    """A format-1 delta patch from the editor's low-rank updates."""
    tensors = {}
    for module, (b, a) in updates.items():
        weight = model.get_parameter(module + ".weight")
        tensors.update(low_rank(module + ".weight", b.detach(), a.detach(), weight))
    return delta_patch(method, tensors)


#: the trained editors' networks, by method
NETS = {"mend": "editors.mend:MENDNet", "ke": "editors.ke:KENet"}


def net_class(method: str) -> type[EditorNet]:
    import importlib

    if method not in NETS:
        raise EditError(f"{method!r} is not a trained editor; trained editors: {', '.join(sorted(NETS))}")
    module, name = NETS[method].split(":")
    return getattr(importlib.import_module(module), name)


# --- checkpoints ----------------------------------------------------------------------------


def editor_cache_file(fingerprint: str, method: str) -> Path:
    from edit_serve.models import cache_dir

    return cache_dir() / "editors" / fingerprint / f"{method}.safetensors"


def save_editor(net: EditorNet, path: str | Path, *, base_model: str, fingerprint: str, layers: Sequence[int],
                extra: Mapping[str, object] | None = None) -> Path:
    """Write the network as a safetensors checkpoint (atomically)."""
    path = Path(path)
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in net.state_dict().items()}
    meta = {
        "format": CHECKPOINT_FORMAT, "method": net.method, "base_model": base_model,
        "base_fingerprint": fingerprint, "layers": json.dumps(list(layers)),
        "shapes": json.dumps({m: list(s) for m, s in net.shapes.items()}),
        "config": json.dumps(dataclasses.asdict(net.config)),
    }
    meta.update({k: json.dumps(v) for k, v in (extra or {}).items()})
    return save_tensors(path, tensors, metadata={META + k: v for k, v in meta.items()})


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    method: str
    base_model: str
    fingerprint: str
    layers: list[int]
    shapes: dict[str, tuple[int, int]]
    config: dict
    extra: dict


def read_editor_info(path: str | Path) -> CheckpointInfo:
    """The metadata of an editor checkpoint; a file that is not one is refused in one line."""
    path = Path(path)
    if not path.is_file():
        raise EditError(f"no editor checkpoint at {path} (train one with `edit_serve train`)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - safetensors raises several types
        raise EditError(f"{path} is not a safetensors editor checkpoint: {str(e).splitlines()[0]}") from None
    meta = {k[len(META):]: v for k, v in meta.items() if k.startswith(META)}
    if meta.get("format") != CHECKPOINT_FORMAT or "method" not in meta:
        raise EditError(f"{path} is not an edit_serve editor checkpoint (no {META}format {CHECKPOINT_FORMAT} metadata)")
    known = {"format", "method", "base_model", "base_fingerprint", "layers", "shapes", "config"}
    try:
        return CheckpointInfo(
            path=path, method=meta["method"], base_model=meta.get("base_model", ""),
            fingerprint=meta.get("base_fingerprint", ""), layers=json.loads(meta["layers"]),
            shapes={m: tuple(s) for m, s in json.loads(meta["shapes"]).items()},
            config=json.loads(meta["config"]), extra={k: json.loads(v) for k, v in meta.items() if k not in known})
    except (KeyError, ValueError) as e:
        raise EditError(f"{path}: malformed editor checkpoint metadata ({e})") from None


def check_editor(info: CheckpointInfo, method: str, fingerprint: str, model_name: str) -> None:
    """Refuse, in one line, a checkpoint of another method or made for another model."""
    if info.method != method:
        raise EditError(f"{info.path} is a {info.method} editor, not a {method} editor")
    if info.fingerprint != fingerprint:
        raise EditError(
            f"{info.path} was trained for {info.base_model or 'another model'} (fingerprint {info.fingerprint}), "
            f"not for this {model_name} (fingerprint {fingerprint}); train one for it with "
            f"`edit_serve train --method {method} --model {model_name} --data FILE -o editor.safetensors`")


def load_editor(path: str | Path, net_cls: type[EditorNet], *, fingerprint: str | None = None,
                model_name: str = "this model") -> tuple[EditorNet, CheckpointInfo]:
    """The network of a checkpoint, checked against the method and (when given) the model."""
    from safetensors.torch import load_file

    info = read_editor_info(path)
    if fingerprint is not None:
        check_editor(info, net_cls.method, fingerprint, model_name)
    elif info.method != net_cls.method:
        raise EditError(f"{info.path} is a {info.method} editor, not a {net_cls.method} editor")
    try:
        config = net_cls.config_cls(**info.config)
    except TypeError as e:
        raise EditError(f"{path}: the {info.method} config it records does not fit this version ({e})") from None
    net = net_cls(config, info.shapes)
    state = load_file(str(path))
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise EditError(f"{path}: the tensors do not fit a {info.method} editor "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    net.eval()
    return net, info


# --- editing with a trained editor ------------------------------------------------------------


@dataclass(frozen=True)
class TrainedEditConfig(StatsSettings):
    """The settings of an edit with a trained editor. `general_weight` > 0 and `spare_subjects`
    re-solve its update (`re_solve`): the first to spare general text (with the key statistics
    named by the stats_* fields), the second to spare the edit's own prompt about other subjects.
    `fit_scale` then sizes each request's update to what its own prompt needs (`fit_scale`)."""

    editor: str | None = None  # checkpoint path; None: the trained editor cached for this model
    layers: list[int] | None = None  # must match the checkpoint's, when given
    general_weight: float = 0.0  # lambda of the re-solve against general text; 0: not that
    spare_subjects: bool = False  # re-solve against the prompt with editors.keys.OTHER_SUBJECTS in the subject's place
    fit_scale: bool = False  # scale each request's update to the least that makes its prompt give its target
    max_scale: float = 4.0  # fit_scale: the largest scale tried (and used where none is enough)
    scale_margin: float = 1.0  # fit_scale: the least sufficient scale is multiplied by this

    def __post_init__(self):
        if self.general_weight < 0:
            raise ValueError("a trained editor's general_weight must be >= 0")
        if not self.max_scale > 0 or not self.scale_margin > 0:
            raise ValueError("a trained editor's max_scale and scale_margin must be > 0")

    def uses_stats(self) -> bool:
        return self.general_weight > 0


def resolve_editor(ctx, net_cls: type[EditorNet], cfg: TrainedEditConfig) -> tuple[EditorNet, CheckpointInfo]:
    """The editor for the context's model: the checkpoint named in the config, else the one
    cached for the model's fingerprint; loaded once per model object and file version."""
    fingerprint = ctx.fingerprint
    path = editor_file(net_cls.method, cfg.editor, fingerprint, ctx.profile.name)
    stat = path.stat()
    key = ("trained-editor", net_cls.method, str(path.resolve()), stat.st_mtime_ns, stat.st_size)

    def make():
        net, info = load_editor(path, net_cls, fingerprint=fingerprint, model_name=ctx.profile.name)
        return net.to(next(ctx.model.parameters()).device), info

    net, info = ctx.cached(key, make)
    if cfg.layers is not None and sorted(cfg.layers) != sorted(info.layers):
        raise EditError(f"{path} edits layers {info.layers}; it cannot edit layers {sorted(cfg.layers)} "
                        "(train an editor for those layers)")
    return net, info


def _editor_path(method: str, editor: str | None, fingerprint: str) -> Path:
    """The checkpoint a `method` edit uses: `editor`, else the one cached for the model of
    `fingerprint` (which may not exist)."""
    return Path(editor).expanduser() if editor else editor_cache_file(fingerprint, method)


def editor_file(method: str, editor: str | None, fingerprint: str, model_name: str) -> Path:
    """`_editor_path`, refused in one line where there is no such file."""
    path = _editor_path(method, editor, fingerprint)
    if not path.is_file():
        if editor:
            raise EditError(f"no editor checkpoint at {path} (train one with `edit_serve train --method {method}`)")
        raise EditError(f"no trained {method} editor for {model_name} (fingerprint {fingerprint}); "
                        f"train one with `edit_serve train --method {method} --data FILE -o "
                        f"editor.safetensors`, or name a checkpoint with the `editor` setting")
    return path


def editor_digest(method: str, editor: str | None, fingerprint: str) -> str | None:
    """The content digest of the checkpoint a `method` edit uses (`_editor_path`), None where
    there is none: what was computed with one editor is not another's (the evaluation's resume
    state, the survey's cells)."""
    import hashlib

    path = _editor_path(method, editor, fingerprint)
    return hashlib.sha256(path.read_bytes()).hexdigest()[:20] if path.is_file() else None


def compute_with(ctx, net_cls: type[EditorNet], requests: Sequence[EditRequest], cfg: TrainedEditConfig):
    """The patch of a trained editor for `requests` (all of them in one low-rank delta per
    module). The model is not changed."""
    net, info = resolve_editor(ctx, net_cls, cfg)
    modules = list(info.shapes)
    for m, shape in info.shapes.items():
        try:
            weight = ctx.model.get_parameter(m + ".weight")
        except AttributeError:
            raise EditError(f"{info.path} edits {m}, which this model does not have") from None
        if tuple(weight.shape) != tuple(shape):
            raise EditError(f"{info.path} edits {m} as {list(shape)}, but this model's is {list(weight.shape)}")
    factors, _ = grad_factors(ctx.model, ctx.tokenizer, modules, edit_rows(requests))
    with torch.no_grad():
        updates, owners = net.updates(factors), net.owners(factors)
        if cfg.general_weight or cfg.spare_subjects:
            updates = re_solve(ctx, updates, factors, requests, cfg)
            owners = {m: factors[m].row for m in updates}  # the re-solve's columns are the tokens'
        if cfg.fit_scale:
            updates = fit_scale(ctx, updates, owners, requests, cfg)
    return updates_patch(net.method, ctx.model, updates)


def scaled(updates: Mapping[str, tuple[torch.Tensor, torch.Tensor]], owners: Mapping[str, torch.Tensor],
           scales: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """`updates` with each request's columns of B multiplied by its entry of `scales` (n,)."""
    return {m: (b * scales.to(b)[owners[m]], a) for m, (b, a) in updates.items()}


def fit_scale(ctx, updates: Mapping[str, tuple[torch.Tensor, torch.Tensor]], owners: Mapping[str, torch.Tensor],
              requests: Sequence[EditRequest], cfg: TrainedEditConfig, steps: int = 8
              ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """`updates` with each request's share scaled to the least scale, up to `cfg.max_scale`,
    at which the model with the update gives the request's target as its top prediction at
    every target token after its prompt (teacher-forced), times `cfg.scale_margin`; a request
    that gets there at no scale up to max_scale keeps max_scale. The editor's learned step is
    one size for every edit: on CounterFact (benchmarks/results/trained-editors.md) it
    overshoots most edits, moving their neighbours more than the edit needs, and falls short of
    a few; on zsRE it falls short of more. The search is a bisection in log scale between
    max_scale / 1024 and max_scale, all requests at once: 1 + `steps` forward passes of the edit
    prompts without gradient, with the scaled update overlaid (`AddToWeights`: no weight is
    written) and the blocks below the lowest edited module run once (`BlocksBelow`)."""
    batch = target_batch(ctx.model, ctx.tokenizer, edit_rows(requests))
    rows, cols = scored_positions(batch)
    want = batch.labels[rows, cols]

    def gives_target(scales: torch.Tensor) -> torch.Tensor:  # (n,) bool
        with AddToWeights(ctx.model, scaled(updates, owners, scales)):
            top = logits_at(ctx.model, batch.inputs, rows, cols).argmax(-1)  # (N,)
        wrong = torch.zeros(len(requests), device=want.device).index_add(0, rows, (top != want).float())
        return (wrong == 0).cpu()

    n = len(requests)
    high = torch.full((n,), math.log2(cfg.max_scale))  # log2 of the least scale known to give the target
    low = high - 10.0
    below = BlocksBelow(ctx.model, lowest_module(ctx.model, list(updates)))  # the blocks below run once
    with below.keep():
        reachable = gives_target(torch.full((n,), cfg.max_scale))  # the others keep max_scale
    with below.replay():
        for _ in range(steps):
            mid = (low + high) / 2
            ok = gives_target(torch.where(reachable, mid, high).exp2())
            high = torch.where(reachable & ok, mid, high)
            low = torch.where(reachable & ~ok, mid, low)
    scales = torch.where(reachable, high.exp2() * cfg.scale_margin, high.exp2())
    log.debug("fit_scale: %s", [round(float(x), 3) for x in scales])
    return scaled(updates, owners, scales)


def re_solve(ctx, updates: Mapping[str, tuple[torch.Tensor, torch.Tensor]], factors: Mapping[str, Factors],
             requests: Sequence[EditRequest], cfg: TrainedEditConfig) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each output projection's update dW re-solved as MEMIT solves its own: the dW' that does
    to the keys K (in, N) of the edit's tokens what dW does, R = dW K, while moving least the
    keys a metric M weighs:
        dW' = argmin |dW' K - R|^2 + lambda tr(dW' M dW'^T) = R (lambda I + K^T M^-1 K)^-1 (M^-1 K)^T
    a low-rank delta of rank N. With `general_weight` (lambda), M is general text's C = E[k k^T]
    (editors.stats): the editor's dW also moves every direction its u~ leans on, most of them
    shared with unrelated text; dW' keeps only what the edit's own tokens see. (Keeping only the
    scored tokens' keys spared more general text but lost reliability: the prompt tokens' change
    reaches the target through attention.) With `spare_subjects`, M also holds the keys of the
    edit's prompt about other subjects (`other_subject_keys`, scaled to C's trace, or alone with
    a ridge of 1% of their mean energy and lambda 0.1% of K^T M^-1 K's mean diagonal): what the
    last layers' editors move most in a neighbour is its relation, "produced by -> Fiat" for
    every car (benchmarks/neighbour_shift.py), and that part of the edit's key is shared with
    the same prompt about anything else. At the tokens before the subject, which every other
    subject's prompt shares exactly, the two aims conflict and the solve gives up part of the
    editor's change (a third on the tiny test models); from the subject on it keeps it."""
    layer_of = {ctx.profile.mlp_out(layer): layer for layer in range(ctx.profile.num_layers)}
    foreign = [m for m in updates if m not in layer_of]
    if foreign:
        raise EditError(f"a re-solve (general_weight, spare_subjects) takes MLP output projections only; "
                        f"this editor also edits {foreign[0]}")
    s = cfg.stats()
    if cfg.general_weight:
        ctx.stats([layer_of[m] for m in updates], s)  # all layers' statistics in one pass when missing
    others = other_subject_keys(ctx, sorted(updates, key=layer_of.get), requests) if cfg.spare_subjects else {}
    result = {}
    for m, (b, a) in updates.items():
        k = factors[m].u.double().to(a.device)  # (N, in)
        if m in others and cfg.general_weight:
            o = others[m]
            c = shrunk_mom2(ctx, layer_of[m], s).to(k.device)
            mk = torch.linalg.solve(c + o.T @ o * (c.trace() / o.pow(2).sum()), k.T)  # (in, N) M^-1 K
        elif m in others:  # M = O^T O / n + eps I, inverted through the n x n Gram (Woodbury)
            o = others[m]  # (n, in)
            eps_n = 0.01 * float(o.pow(2).sum()) / o.shape[1]  # eps * n, eps 1% of M's mean diagonal
            gram_o = o @ o.T + eps_n * torch.eye(len(o), dtype=o.dtype, device=o.device)
            mk = (k.T - o.T @ torch.linalg.solve(gram_o, o @ k.T)) * (len(o) / eps_n)
        else:
            lu, pivots = mom2_lu(ctx, layer_of[m], s)
            mk = torch.linalg.lu_solve(lu, pivots, k.T.to(lu.device)).to(k.device)
        gram = k @ mk
        lam = cfg.general_weight or 1e-3 * float(gram.diagonal().mean())
        a_new = torch.linalg.solve(gram + lam * torch.eye(len(k), dtype=k.dtype, device=k.device), mk.T)  # (N, in)
        r = b.double() @ (a.double() @ k.T)  # (out, N) what dW does to those keys
        result[m] = (r.float(), a_new.float())
    return result


def editor_layers(profile, method: str, layers: Sequence[int] | None) -> list[int]:
    """Layers from the argument, else the profile's for `method`, else the last three (MEND's)."""
    if layers is None and method not in getattr(profile, "editing", {}):
        layers = list(range(max(0, profile.num_layers - 3), profile.num_layers))
    return method_layers(profile, method, layers)
