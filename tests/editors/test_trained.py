"""The trained editors (MEND, KE) on the tiny GPT-J and Llama models: training lowers the loss,
a checkpoint round-trips, a checkpoint of another model or method is refused in one line.
(The editor table in test_editors.py runs their patches through compute -> apply -> revert.)"""

from __future__ import annotations

import pytest
import torch

from editors import EditError, EditRequest, compute_patch
from editors.context import EditContext
from editors.keys import other_subject_keys
from editors.trained import editor_cache_file, grad_factors, load_editor, net_class, read_editor_info, save_editor
from editors.training import Example, TrainConfig, Trainer, train_editor
from tests.conftest import load_tiny

WORDS = "France Paris Rome Italy English French Philadelphia".split()
EXAMPLES = [Example(EditRequest("the capital of {} is", s, t), (f"{s} is the city of",),
                    (("the language of Italy is", "French"),))
            for s in WORDS for t in WORDS if s != t]
#: tiny-model settings: a small network, and edit scales large enough to move random weights
SETTINGS = {"mend": {"rank": 16, "init_lr": 1e-2, "lr": 1e-3},
            "ke": {"lstm_hidden": 16, "hidden": 16, "init_lr": 1.0, "lr": 1e-3}}


@pytest.fixture(scope="module", params=["gpt-j-6b", "llama-3-8b"])
def tiny_lm(request, tmp_path_factory):
    return load_tiny(request.param, tmp_path_factory.mktemp(f"trained-{request.param}"))


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDIT_SERVE_CACHE", str(tmp_path / "cache"))


def make_trainer(lm, method, tmp_path, **train):
    ctx = EditContext.from_loaded(lm)
    net_cls = net_class(method)
    layers = [1, 2, 3]
    shapes = {lm.profile.mlp_out(x): tuple(lm.model.get_parameter(lm.profile.mlp_out(x) + ".weight").shape)
              for x in layers}
    settings = {**net_cls.model_defaults(lm.model), **{k: v for k, v in SETTINGS[method].items() if k != "lr"}}
    torch.manual_seed(0)
    net = net_cls(net_cls.config_cls(**settings), shapes)
    cfg = TrainConfig(lr=SETTINGS[method]["lr"], val_size=0, edits_per_step=2, **train)
    return Trainer(ctx, net, layers, EXAMPLES, cfg, tmp_path / f"{method}.safetensors")


@pytest.mark.parametrize("method", ["mend", "ke"])
def test_a_few_steps_lower_the_loss(method, tiny_lm, tmp_path):
    trainer = make_trainer(tiny_lm, method, tmp_path, steps=12, save_every=100)
    fixed = EXAMPLES[:4]
    trainer.net.train()
    for _ in range(2):  # the running statistics see a few batches first
        trainer.net.observe(grad_factors(tiny_lm.model, tiny_lm.tokenizer, trainer.modules,
                                         [(e.request.text, e.request.target_new) for e in fixed])[0])
    before = trainer.loss(fixed)[0].item()
    for _ in range(12):
        trainer.step(fixed)
    after = trainer.loss(fixed)[0].item()
    assert after < before, (before, after)


@pytest.mark.parametrize("method", ["mend", "ke"])
def test_a_step_runs_the_blocks_below_the_edit_once_per_batch(method, tiny_lm, tmp_path):
    """The request rows with their paraphrases, and the unrelated rows, each run the blocks below
    the lowest edited layer once (unedited) and replay them under the edit; the loss and its
    gradient are those of running every block each time."""
    trainer = make_trainer(tiny_lm, method, tmp_path)
    fixed = EXAMPLES[:3]
    trainer.net.eval()  # no running-statistics update between the two losses
    calls = []
    # inside block 0 (a hook on the block would stop the replay)
    lowest = tiny_lm.model.get_submodule(tiny_lm.profile.mlp_out(0))
    handle = lowest.register_forward_hook(lambda *_: calls.append(1))
    try:
        replayed = trainer.loss(fixed)[0]
    finally:
        handle.remove()
    grads = torch.autograd.grad(replayed, [p for p in trainer.net.parameters() if p.requires_grad])
    assert len(calls) == 2  # the edit batch and the unrelated batch, unedited; never under the edit
    trainer.first = None  # run every block each time
    full = trainer.loss(fixed)[0]
    again = torch.autograd.grad(full, [p for p in trainer.net.parameters() if p.requires_grad])
    torch.testing.assert_close(replayed, full, rtol=1e-5, atol=1e-6)
    for g1, g2 in zip(grads, again):
        torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-6)


def test_the_checkpoint_holds_the_moving_average_and_a_resume_goes_on_from_the_live_weights(tiny_lm, tmp_path):
    from safetensors.torch import load_file

    trainer = make_trainer(tiny_lm, "mend", tmp_path, steps=3, save_every=100, ema=0.5)
    trainer.run(progress=False)
    saved, live = load_file(str(trainer.output)), trainer.net.state_dict()
    assert torch.equal(saved["log_lrs"], trainer.ema["log_lrs"]) and not torch.equal(saved["log_lrs"], live["log_lrs"])
    again = make_trainer(tiny_lm, "mend", tmp_path, steps=3, save_every=100, ema=0.5)
    assert again.resume()
    for name, value in again.net.state_dict().items():
        assert torch.equal(value, live[name]), name
    for name, value in trainer.ema.items():
        assert torch.equal(again.ema[name], value), name


@pytest.mark.parametrize("method", ["mend", "ke"])
def test_checkpoint_round_trips_and_resumes(method, tiny_lm, tmp_path):
    ctx = EditContext.from_loaded(tiny_lm)
    out = tmp_path / "editor.safetensors"
    settings = {**SETTINGS[method], "steps": 4, "save_every": 2, "val_size": 2, "val_every": 2, "log_every": 1}
    path, state = train_editor(ctx, method, EXAMPLES, out, layers=[2, 3], settings=settings, progress=False)
    assert state.step == 4 and len(state.val_curve) == 3  # steps 0, 2, 4
    info = read_editor_info(path)
    assert (info.method, info.fingerprint, info.layers) == (method, ctx.fingerprint, [2, 3])
    assert info.base_model == tiny_lm.profile.name and info.config["init_lr"] == SETTINGS[method]["init_lr"]
    assert info.extra["train"]["steps"] == 4 and info.extra["step"] == 4
    assert editor_cache_file(ctx.fingerprint, method).is_file()  # installed for the model

    net, _ = load_editor(path, net_class(method), fingerprint=ctx.fingerprint)
    factors, _ = grad_factors(tiny_lm.model, tiny_lm.tokenizer, list(info.shapes), [(EXAMPLES[0].request.text, "Rome")])
    again = load_editor(save_editor(net, tmp_path / "copy.safetensors", base_model=info.base_model,
                                    fingerprint=info.fingerprint, layers=info.layers), net_class(method))[0]
    with torch.no_grad():
        for (b1, a1), (b2, a2) in zip(net.updates(factors).values(), again.updates(factors).values()):
            assert torch.equal(b1, b2) and torch.equal(a1, a2)

    # resume: the run continues from step 4 to 6
    settings["steps"] = 6
    _, resumed = train_editor(ctx, method, EXAMPLES, out, layers=[2, 3], settings=settings, resume=True, progress=False)
    assert resumed.step == 6 and resumed.train_curve[0]["step"] == 1 and resumed.train_curve[-1]["step"] == 6

    # an edit with the checkpoint, named or found in the cache, gives the same patch
    request = EditRequest("the capital of {} is", "France", "Rome")
    named = compute_patch(method, tiny_lm.model, tiny_lm.tokenizer, tiny_lm.profile, [request], {"editor": str(out)})
    cached = compute_patch(method, tiny_lm.model, tiny_lm.tokenizer, tiny_lm.profile, [request], {})
    assert named.tensors.keys() == cached.tensors.keys()
    assert all(torch.equal(named.tensors[k], cached.tensors[k]) for k in named.tensors)


def test_mlp_in_edits_the_input_projections_too(tiny_lm, tmp_path):
    """With `mlp_in`, the editor (as the original MEND) edits each layer's MLP input projections
    as well as its output projection, and a patch carries a delta for every one of them."""
    ctx = EditContext.from_loaded(tiny_lm)
    out = tmp_path / "mend-in.safetensors"
    settings = {**SETTINGS["mend"], "steps": 2, "val_size": 0, "mlp_in": True}
    train_editor(ctx, "mend", EXAMPLES, out, layers=[2, 3], settings=settings, progress=False, cache=False)
    modules = [m for layer in (2, 3) for m in (*tiny_lm.profile.mlp_in(layer), tiny_lm.profile.mlp_out(layer))]
    assert sorted(read_editor_info(out).shapes) == sorted(modules)
    request = EditRequest("the capital of {} is", "France", "Rome")
    patch = compute_patch("mend", tiny_lm.model, tiny_lm.tokenizer, tiny_lm.profile, [request], {"editor": str(out)})
    edited = {name.removeprefix("delta.").rsplit(".weight.", 1)[0] for name in patch.tensors}
    assert edited == set(modules)


def test_foreign_missing_and_wrong_method_checkpoints_are_refused(tmp_path, tmp_path_factory):
    llama = load_tiny("llama-3-8b", tmp_path_factory.mktemp("foreign-llama"))
    gptj = load_tiny("gpt-j-6b", tmp_path_factory.mktemp("foreign-gptj"))
    ctx = EditContext.from_loaded(llama)
    out = tmp_path / "llama-mend.safetensors"
    train_editor(ctx, "mend", EXAMPLES, out, settings={**SETTINGS["mend"], "steps": 1, "val_size": 0}, progress=False,
                 cache=False)
    request = EditRequest("the capital of {} is", "France", "Rome")
    with pytest.raises(EditError, match="was trained for llama-3-8b") as e:
        compute_patch("mend", gptj.model, gptj.tokenizer, gptj.profile, [request], {"editor": str(out)})
    assert "\n" not in str(e.value) and "edit_serve train" in str(e.value)
    with pytest.raises(EditError, match="is a mend editor, not a ke editor"):
        compute_patch("ke", llama.model, llama.tokenizer, llama.profile, [request], {"editor": str(out)})
    with pytest.raises(EditError, match="no trained mend editor for llama-3-8b"):
        compute_patch("mend", llama.model, llama.tokenizer, llama.profile, [request], {})
    with pytest.raises(EditError, match="no editor checkpoint at"):
        compute_patch("mend", llama.model, llama.tokenizer, llama.profile, [request], {"editor": str(tmp_path / "x")})
    with pytest.raises(EditError, match="cannot edit layers"):
        compute_patch("mend", llama.model, llama.tokenizer, llama.profile, [request],
                      {"editor": str(out), "layers": [0]})
    with pytest.raises(EditError, match="no setting"):
        train_editor(ctx, "mend", EXAMPLES, tmp_path / "y.safetensors", settings={"nope": 1}, progress=False)


def test_same_relation_prompts_join_the_locality_loss(tiny_lm, tmp_path):
    """With `loc_same_relation` = k, each edit's unrelated prompts gain k other training examples'
    prompts of the same template, never its own, answered with their true (else new) targets."""
    trainer = make_trainer(tiny_lm, "mend", tmp_path, loc_same_relation=3)
    example = EXAMPLES[0]
    drawn = trainer._same_relation(example)
    assert len(drawn) == 3 and len(set(drawn)) == 3
    own = example.request.text
    assert all(p != own and p.startswith("the capital of ") and p.endswith(" is") for p, _ in drawn)
    assert trainer._same_relation(example) == drawn  # the same draw within a step (a resume repeats it)
    trainer.net.eval()
    with_them = trainer.loss(EXAMPLES[:2])[1]["loc_loss"]
    plain = make_trainer(tiny_lm, "mend", tmp_path / "plain")
    plain.net.load_state_dict(trainer.net.state_dict())
    plain.net.eval()
    assert plain.loss(EXAMPLES[:2])[1]["loc_loss"] != pytest.approx(with_them)


RE_SOLVED = EditRequest("the capital of {} is", "France", "Rome")  # the re-solve tests' edit


def _plain_and_re_solved(lm, folder, method: str, options: dict):
    """(context, editor file, the trained editor's patch for RE_SOLVED, the patch with `options`)
    with an editor for layers 2 and 3 trained for two steps."""
    ctx = EditContext.from_loaded(lm)
    out = folder / "editor.safetensors"
    train_editor(ctx, method, EXAMPLES, out, layers=[2, 3], settings={**SETTINGS[method], "steps": 2, "val_size": 0},
                 progress=False)
    plain, re_solved = (compute_patch(method, lm.model, lm.tokenizer, lm.profile, [RE_SOLVED],
                                      {"editor": str(out), **extra}) for extra in ({}, options))
    return ctx, out, plain, re_solved


def _general_text(data_dir) -> dict:
    """The statistics options of a re-solve against general text (small, for the tiny models)."""
    return {"stats_corpus": str(data_dir / "wikitext2_valid.txt"), "stats_samples": 50, "stats_length": 32}


def _general_mom2(ctx, options: dict, layer: int) -> torch.Tensor:
    """C = E[k k^T] at `layer` from the statistics `options` name."""
    from editors.stats import StatsConfig

    spec = StatsConfig(corpus=options["stats_corpus"], samples=options["stats_samples"], length=options["stats_length"])
    return ctx.stats([layer], spec)[layer]


@pytest.mark.parametrize("method", ["mend", "ke"])
def test_general_weight_re_solves_the_update_to_spare_general_text(method, tiny_lm, tmp_path, data_dir):
    """With general_weight the update does to the edit's tokens what the editor's does (to a
    small ridge), and moves general text (C = E[k k^T]) less than the editor's update."""
    stats = _general_text(data_dir)
    ctx, out, plain, spared = _plain_and_re_solved(tiny_lm, tmp_path, method, {"general_weight": 1e-4, **stats})
    factors, _ = grad_factors(tiny_lm.model, tiny_lm.tokenizer, list(read_editor_info(out).shapes),
                              [(RE_SOLVED.text, RE_SOLVED.target_new)])
    for layer in (2, 3):
        module = tiny_lm.profile.mlp_out(layer)
        keys = factors[module].u  # the edit's tokens' keys
        dense = {"plain": _dense(tiny_lm.model, plain, module), "spared": _dense(tiny_lm.model, spared, module)}
        assert torch.allclose(keys @ dense["spared"].T, keys @ dense["plain"].T, rtol=1e-3, atol=1e-4 * float(
            (keys @ dense["plain"].T).abs().max()))
        c = _general_mom2(ctx, stats, layer)
        moved = {name: float(torch.trace(d @ c @ d.T)) for name, d in dense.items()}
        assert moved["spared"] < 0.5 * moved["plain"], moved
    with pytest.raises(ValueError, match="general_weight"):
        compute_patch(method, tiny_lm.model, tiny_lm.tokenizer, tiny_lm.profile, [RE_SOLVED],
                      {"editor": str(out), "general_weight": -1.0})


def _dense(model, patch, module: str) -> torch.Tensor:
    """The (out, in) change the patch makes to `module`'s weight (its delta added to zeros)."""
    w = torch.zeros_like(model.get_parameter(f"{module}.weight"), dtype=torch.float32)
    patch.deltas()[f"{module}.weight"].add_to(w)
    return w


def _own_and_other_keys(ctx, lm, out) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per edited module: (RE_SOLVED's tokens' keys, the keys of its prompt about other subjects,
    which of its tokens' keys every other subject's prompt shares: "the capital of")."""
    modules = list(read_editor_info(out).shapes)
    factors, _ = grad_factors(lm.model, lm.tokenizer, modules, [(RE_SOLVED.text, RE_SOLVED.target_new)])
    others = other_subject_keys(ctx, modules, [RE_SOLVED])
    found = {}
    for module in modules:
        keys, other = factors[module].u, others[module].float()
        found[module] = keys, other, torch.cdist(keys, other).min(dim=1).values < 1e-3 * keys.norm(dim=1)
    return found


def test_spare_subjects_keeps_the_edit_off_its_prompt_about_other_subjects(tiny_lm, tmp_path):
    """With spare_subjects the update does to the edit's own tokens (the subject's and after)
    what the editor's does, gives up part of it at the tokens every other subject's prompt shares
    (those before the subject), and moves the prompt about other subjects (OTHER_SUBJECTS) less than
    the editor's update (a quarter as much on the tiny random models)."""
    ctx, out, plain, spared = _plain_and_re_solved(tiny_lm, tmp_path, "mend", {"spare_subjects": True})
    for module, (keys, other, shared) in _own_and_other_keys(ctx, tiny_lm, out).items():
        assert len(other) > 10 * len(keys)  # every token of the prompt about each other subject
        assert 0 < int(shared.sum()) < len(keys)
        dense = {"plain": _dense(tiny_lm.model, plain, module), "spared": _dense(tiny_lm.model, spared, module)}
        own, kept = keys @ dense["plain"].T, keys @ dense["spared"].T
        change = (kept - own).norm(dim=1) / own.norm(dim=1)
        assert change[~shared].max() < 0.02 and change[shared].min() > 0.1, change
        moved = {name: float((other @ d.T).norm()) for name, d in dense.items()}
        assert moved["spared"] < 0.5 * moved["plain"], moved


def test_general_weight_and_spare_subjects_spare_both(tiny_lm, tmp_path, data_dir):
    """Both at once: M is general text's C plus the other-subject keys (scaled to C's trace),
    and the update moves each of them less than the editor's, while the edit's own tokens
    from the subject on still get what the editor gives them."""
    stats = _general_text(data_dir)
    ctx, out, plain, both = _plain_and_re_solved(tiny_lm, tmp_path, "mend",
                                                 {"general_weight": 1e-4, "spare_subjects": True, **stats})
    layer_of = {tiny_lm.profile.mlp_out(layer): layer for layer in (2, 3)}
    for module, (keys, other, shared) in _own_and_other_keys(ctx, tiny_lm, out).items():
        dense = {"plain": _dense(tiny_lm.model, plain, module), "both": _dense(tiny_lm.model, both, module)}
        own, kept = keys @ dense["plain"].T, keys @ dense["both"].T
        assert ((kept - own).norm(dim=1) / own.norm(dim=1))[~shared].max() < 0.05
        c = _general_mom2(ctx, stats, layer_of[module])
        general = {name: float(torch.trace(d @ c @ d.T)) for name, d in dense.items()}
        subjects = {name: float((other @ d.T).norm()) for name, d in dense.items()}
        # measured on the tiny models: 0.4-2.7% of the general text's change, 30-53% of the subjects'
        assert general["both"] < 0.1 * general["plain"] and subjects["both"] < 0.7 * subjects["plain"], (
            general, subjects)


def _gives_target(lm, request: EditRequest, deltas: dict) -> bool:
    """Whether the model, with `deltas` ({module: (out, in)}) overlaid, gives the request's target
    as its top prediction at every target token after its prompt."""
    from editors.lm import logits_at, scored_positions, target_batch
    from editors.nethook import AddToWeights

    batch = target_batch(lm.model, lm.tokenizer, [(request.text, request.target_new)])
    rows, cols = scored_positions(batch)
    with torch.no_grad(), AddToWeights(lm.model, deltas):
        top = logits_at(lm.model, batch.inputs, rows, cols).argmax(-1)
    return bool((top == batch.labels[rows, cols]).all())


@pytest.mark.parametrize("method", ["mend", "ke"])
def test_fit_scale_scales_each_request_to_the_least_update_that_gives_its_target(method, tiny_lm, tmp_path):
    """With fit_scale a request's update is the editor's times one factor: the least (to the
    search's resolution, 2^(10/256)) at which its prompt gives its target; in a patch of two
    requests each gets its own factor."""
    ctx = EditContext.from_loaded(tiny_lm)
    out = tmp_path / "editor.safetensors"
    train_editor(ctx, method, EXAMPLES, out, layers=[2, 3], settings={**SETTINGS[method], "steps": 2, "val_size": 0},
                 progress=False)
    modules = list(read_editor_info(out).shapes)
    requests = [EditRequest("the capital of {} is", "France", "Rome"),
                EditRequest("{} is the city of", "Paris", "Italy")]
    fitted_cfg = {"editor": str(out), "fit_scale": True, "max_scale": 16.0}
    weights = {m: tiny_lm.model.get_parameter(m + ".weight").clone() for m in modules}

    def dense(requests, config):
        patch = compute_patch(method, tiny_lm.model, tiny_lm.tokenizer, tiny_lm.profile, requests, config)
        return {m: _dense(tiny_lm.model, patch, m) for m in modules}

    plain = [dense([r], {"editor": str(out)}) for r in requests]
    scales = []
    for request, own in zip(requests, plain):
        fitted = dense([request], fitted_cfg)
        flat_own, flat_fit = (torch.cat([d[m].flatten() for m in modules]) for d in (own, fitted))
        scale = float(flat_fit @ flat_own / (flat_own @ flat_own))
        assert torch.allclose(flat_fit, scale * flat_own, atol=1e-5 * float(flat_fit.abs().max()))
        assert _gives_target(tiny_lm, request, fitted)
        assert not _gives_target(tiny_lm, request, {m: d * 0.9 for m, d in fitted.items()}), scale
        scales.append(scale)
    assert max(scales) > 1.2 * min(scales), scales
    both = dense(requests, fitted_cfg)  # one patch: each request's share scaled by its own factor
    basis = torch.stack([torch.cat([d[m].flatten() for m in modules]) for d in plain], 1)  # (P, 2)
    target = torch.cat([both[m].flatten() for m in modules])
    coef = torch.linalg.lstsq(basis, target[:, None]).solution[:, 0]
    assert torch.allclose(basis @ coef, target, atol=1e-3 * float(target.abs().max()))
    assert torch.allclose(coef, torch.tensor(scales), rtol=0.15), (coef, scales)
    for m in modules:  # computing the patches never wrote a weight
        assert torch.equal(tiny_lm.model.get_parameter(m + ".weight"), weights[m])
    with pytest.raises(ValueError, match="max_scale"):
        compute_patch(method, tiny_lm.model, tiny_lm.tokenizer, tiny_lm.profile, requests[:1],
                      {"editor": str(out), "fit_scale": True, "max_scale": 0})
