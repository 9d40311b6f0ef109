"""One table drives every editor on the tiny GPT-J, Llama and T5 models:
compute -> model unchanged -> save -> load -> apply -> the prediction changes -> revert -> bit-identical."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from editors import EditError, EditRequest, compute_patch, get_editor, list_editors
from editors.lm import logits_at, scored_positions, target_batch
from patches import PatchStack, load, save
from tests.conftest import DECODERS, TINY

# Settings for tiny random-weight models: their MLP outputs are small (ROME's weight decay,
# relative to |v|^2, would pin v*) and their logits nearly flat, so pretrained-model defaults
# barely move them. ROME/MEMIT edit early layers (the subject's position must reach the
# answer's through later attention). Statistics: few samples.
STATS = {"stats_samples": 64, "stats_length": 16}
VSTAR = {"v_weight_decay": 1e-3, "clamp_norm_factor": 50.0}
TABLE = {
    "rome": {**STATS, **VSTAR, "layers": [1]},
    "memit": {**STATS, **VSTAR, "layers": [1, 2], "mom2_update_weight": 10.0},
    "alphaedit": {**STATS, **VSTAR, "layers": [1, 2], "null_threshold": 1e-4, "null_l2": 1e-6},
    "ft": {"lr": 0.05, "norm_constraint": 0.05, "objective": "target"},
    "ft-lora": {"lr": 0.05},
    "kn": {"layers": [2, 3], "scale": 100.0, "ig_steps": 8, "prompts": 2},
    "t-patcher": {"layers": [3], "steps": 20, "lr": 0.1},
    "calinet": {"layers": [2, 3], "steps": 20, "lr": 0.05},
    "serac": {},
    "mend": {},  # the editor trained for the model (trained_editor below), found in the cache
    "ke": {},
}
#: trained editors: a few training steps on the tiny model first (tests/editors/test_trained.py
#: covers the training itself)
TRAINED = {"mend": {"rank": 16, "init_lr": 1e-2, "lr": 1e-3}, "ke": {"lstm_hidden": 16, "hidden": 16, "init_lr": 1.0}}
SIDE_MODULE_METHODS = ("t-patcher", "calinet")
NEEDS_DECODER_ONLY = {"rome", "memit", "alphaedit", "serac"}  # serac: its default answer mode "target"
MEMORY_METHODS = ("serac",)  # weights untouched: the edit shows through the router (editors.serac)

REQUESTS = [
    EditRequest("the capital of {} is", "France", "Rome", "Paris"),
    EditRequest("{} speaks", "Danielle Darrieux", "English", "French"),
]


def trained_editor(lm, method: str) -> None:
    """Train `method`'s editor for a few steps and install it in the (test) cache for the model."""
    from editors.context import EditContext
    from editors.trained import editor_cache_file
    from editors.training import Example, train_editor

    ctx = EditContext.from_loaded(lm)
    target = editor_cache_file(ctx.fingerprint, method)
    if target.is_file():
        return
    words = "France Paris Rome Italy English French".split()
    examples = [Example(EditRequest("the capital of {} is", s, t), (), (("the language of Italy is", "French"),))
                for s in words for t in words if s != t]
    train_editor(ctx, method, examples, target, settings={**TRAINED[method], "steps": 3, "val_size": 0},
                 progress=False, cache=False)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_same(model, before: dict[str, torch.Tensor]) -> None:
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()
    changed = [n for n, p in after.items() if not torch.equal(p, before[n])]
    assert not changed, f"weights changed: {changed[:5]}"


def assert_no_hooks(model) -> None:
    for name, module in model.named_modules():
        assert not module._forward_hooks and not module._forward_pre_hooks, f"hook left on {name!r}"


@torch.no_grad()
def first_prediction(model, tokenizer, request: EditRequest, stack: PatchStack | None = None) -> tuple[int, float]:
    """(top-1 token, log-prob of the new target's first token) where the answer starts; with a
    `stack` carrying SERAC memory, as its router answers (the forced target, else the model)."""
    if stack is not None and stack.memory is not None and len(stack.memory):
        from editors.serac import ScopeRouter, SentenceEncoder

        (routed,) = ScopeRouter(stack.memory, tokenizer,
                                SentenceEncoder.load).route([tokenizer(request.text).input_ids])
        if routed.forced:
            return routed.forced[0], 0.0
    batch = target_batch(model, tokenizer, [(request.text, request.target_new)])
    rows, cols = scored_positions(batch)
    logp = torch.log_softmax(logits_at(model, batch.inputs, rows[:1], cols[:1])[0].float(), -1)  # (V,)
    return int(logp.argmax()), float(logp[batch.labels[rows[0], cols[0]]])


def assert_prediction_changed(before, after) -> None:
    """The top-1 answer changed, or the new target became more likely (the tiny models' logits
    are nearly flat, so a faithful edit may move the target up without making it top-1)."""
    assert after[0] != before[0] or after[1] > before[1] + 0.05, (before, after)


def test_registry_lists_every_method():
    assert set(TABLE) <= set(list_editors())


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("EDIT_SERVE_CACHE", str(tmp_path_factory.getbasetemp() / "edit-serve-cache"))


@pytest.mark.parametrize("method", sorted(TABLE))
def test_editor_round_trip(method, tiny, tmp_path):
    model, tok, profile = tiny.model, tiny.tokenizer, tiny.profile
    before = snapshot(model)
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    if method in NEEDS_DECODER_ONLY and model.config.is_encoder_decoder:
        with pytest.raises(EditError, match="encoder-decoder"):
            compute_patch(method, model, tok, profile, REQUESTS[:1], TABLE[method])
        assert_same(model, before)
        return

    if method in TRAINED:
        trained_editor(tiny, method)
        before = snapshot(model)
    request = REQUESTS[0]
    old = first_prediction(model, tok, request)
    patch = compute_patch(method, model, tok, profile, [request], TABLE[method])
    assert_same(model, before)
    assert_no_hooks(model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert patch.method == method and patch.requests == [request.to_dict()]
    assert patch.config == {**patch.config, **TABLE[method]}

    loaded = load(save(patch, tmp_path / "p.safetensors"))
    assert loaded.id == patch.id
    stack = PatchStack(model, base_model=profile.name, architecture=profile.architecture)
    stack.apply(loaded)
    try:
        assert_prediction_changed(old, first_prediction(model, tok, request, stack))
        if method in MEMORY_METHODS:
            assert len(stack.memory) == 1
    finally:
        stack.revert(loaded.id)
    assert_same(model, before)
    assert_no_hooks(model)


@pytest.mark.parametrize("method, tiny", [  # T5's refusal of the decoder-only methods: test_editor_round_trip
    (method, model) for method in sorted(TABLE) if get_editor(method).rephrasings
    for model in (DECODERS if method in NEEDS_DECODER_ONLY else sorted(TINY))], indirect=["tiny"])
def test_the_methods_that_take_rephrasings_fit_them(method, tiny):
    """A rephrasing reaches what the method fits: the patch records it and, but for kn (whose
    change is the answers' embeddings at the neurons found), differs from the prompt's alone."""
    model, tok, profile = tiny.model, tiny.tokenizer, tiny.profile
    request = dataclasses.replace(REQUESTS[0], rephrasings=("Everyone knows that {} has its capital in",))
    patch = compute_patch(method, model, tok, profile, [request], TABLE[method])
    assert patch.requests == [request.to_dict()] and patch.requests[0]["rephrasings"] == list(request.rephrasings)
    if method != "kn":
        plain = compute_patch(method, model, tok, profile, [REQUESTS[0]], TABLE[method])
        assert any(not torch.equal(a, plain.tensors[k]) for k, a in patch.tensors.items()), method


def test_side_module_memory_holds_the_other_edits_rephrasings(tiny):
    """The text a new neuron must stay silent on holds the active edits' and the patch's other
    requests' rephrasings as well as their prompts (editors.side.silent_rows)."""
    from editors.context import EditContext
    from editors.side import silent_rows

    ctx = EditContext(tiny.model, tiny.tokenizer, tiny.profile)
    active = dataclasses.replace(REQUESTS[1], rephrasings=("{} grew up speaking",))
    ctx.stack.apply(compute_patch("t-patcher", tiny.model, tiny.tokenizer, tiny.profile, [active],
                                  TABLE["t-patcher"]))
    other = EditRequest("{} flows into", "The Nile", "the Mediterranean", rephrasings=("{} empties into",))
    try:
        rows = silent_rows(ctx, REQUESTS[0], [other])
    finally:
        ctx.stack.revert_all()
    assert rows[:4] == [("Danielle Darrieux speaks", "English"), ("Danielle Darrieux grew up speaking", "English"),
                        ("The Nile flows into", "the Mediterranean"), ("The Nile empties into", "the Mediterranean")]


@pytest.mark.parametrize("method", ["rome", "memit", "alphaedit", "ft", "kn", *SIDE_MODULE_METHODS, *MEMORY_METHODS,
                                    *TRAINED])
def test_every_request_is_edited(method, tiny):
    """Two requests give one patch that carries both (no request silently dropped)."""
    if method in TRAINED:
        trained_editor(tiny, method)
    if method in NEEDS_DECODER_ONLY and tiny.model.config.is_encoder_decoder:
        with pytest.raises(EditError, match="encoder-decoder"):
            compute_patch(method, tiny.model, tiny.tokenizer, tiny.profile, REQUESTS, TABLE[method])
        return
    patch = compute_patch(method, tiny.model, tiny.tokenizer, tiny.profile, REQUESTS, TABLE[method])
    assert len(patch.requests) == 2
    if method in NEEDS_DECODER_ONLY:
        assert [d.rank for d in patch.deltas().values()] == [2] * len(patch.deltas())  # one per request
    if method in MEMORY_METHODS:  # one memory row per request
        assert patch.tensors["memory.keys"].shape[0] == 2
    if method == "t-patcher":  # one neuron per target token of each request
        assert patch.tensors["side.t_patcher.keys"].shape[0] == 2


def test_side_module_patches_revert_to_identical_logits(tiny):
    """Side-module patches of both methods attached together, then all reverted: the logits on
    20 prompts are bit-identical to the unpatched model's."""
    model, tok, profile = tiny.model, tiny.tokenizer, tiny.profile
    words = "the capital of France is Paris Rome Italy English French city language".split()
    prompts = [" ".join(words[i % len(words):] + words[:i % len(words)]) for i in range(20)]
    batch = target_batch(model, tok, [(p, "Rome") for p in prompts])
    with torch.no_grad():
        before = model(**batch.inputs).logits
    stack = PatchStack(model, base_model=profile.name, architecture=profile.architecture)
    for method, request in zip(SIDE_MODULE_METHODS, REQUESTS):
        stack.apply(compute_patch(method, model, tok, profile, [request], TABLE[method], stack=stack))
    with torch.no_grad():
        assert not torch.equal(model(**batch.inputs).logits, before)
        stack.revert_all()
        assert torch.equal(model(**batch.inputs).logits, before)
    assert_no_hooks(model)


def test_bad_config_and_layers_are_refused(tiny):
    with pytest.raises(EditError, match="no setting"):
        compute_patch("ft", tiny.model, tiny.tokenizer, tiny.profile, REQUESTS[:1], {"learning_rate": 1})
    with pytest.raises(EditError, match="not in"):
        compute_patch("ft", tiny.model, tiny.tokenizer, tiny.profile, REQUESTS[:1], {"layers": [99]})
    with pytest.raises(EditError, match="bad ft config"):
        compute_patch("ft", tiny.model, tiny.tokenizer, tiny.profile, REQUESTS[:1], {"objective": "nope"})


def test_tail_replay_matches_a_full_forward_pass(tiny):
    """Side-module training's replay from the attach layer on (editors.side.tail) gives the
    logits of a full forward pass with the neurons attached, at the last FFN and an earlier one."""
    from editors.context import EditContext
    from editors.side import Neurons, attached, tail

    model, tok, profile = tiny.model, tiny.tokenizer, tiny.profile
    ctx = EditContext(model, tok, profile)
    batch = target_batch(model, tok, [(r.text, r.target_new) for r in REQUESTS])
    rows, cols = scored_positions(batch)
    torch.manual_seed(1)
    for layer in (profile.num_layers - 1, profile.num_layers - 3):
        module = profile.mlp(layer)
        found = tail(ctx, module, batch, rows, cols, {})
        assert found is not None, f"no replay after {module}"
        neurons = Neurons(torch.randn(3, found.inputs.shape[-1]), torch.zeros(3),
                          torch.randn(3, found.residual.shape[-1]), "relu")
        with torch.no_grad(), attached(model, {module: [neurons]}):
            full = model(**batch.inputs).logits[rows, cols]
        torch.testing.assert_close(found.logits(neurons), full, rtol=1e-4, atol=1e-4)
    assert_no_hooks(model)


def test_alphaedit_borrows_memit_layers_where_a_profile_names_none(tiny):
    """What MEMIT's pipeline and the benchmarks' statistics step both ask for."""
    from editors.common import method_layers

    if "alphaedit" in tiny.profile.editing or "memit" not in tiny.profile.editing:
        pytest.skip(f"{tiny.profile.name} names alphaedit's layers itself or has no memit entry")
    assert method_layers(tiny.profile, "alphaedit", None) == method_layers(tiny.profile, "memit", None)
