"""PatchStack: exact, order-free revert; atomic apply; side modules as hooks."""

from __future__ import annotations

import itertools

import pytest
import torch

from patches import BASE_VERSION, Patch, PatchError, PatchStack
from tests.conftest import load_tiny
from tests.patches.conftest import assert_identical, rank_one, snapshot

DOWN = "model.layers.{}.mlp.down_proj.weight"


def _stack(lm) -> PatchStack:
    return PatchStack(lm.model, base_model=lm.profile.name, architecture=lm.profile.architecture)


@pytest.fixture(params=["float32", "bfloat16"])
def lm(request, tmp_path_factory):
    return load_tiny("llama-3-8b", tmp_path_factory.mktemp("llama"), dtype=request.param)


def test_revert_any_order_is_exact(lm):
    stack = _stack(lm)
    original = snapshot(lm.model)
    # three patches, two on the same weight
    patches = [rank_one(stack, DOWN.format(1), seed=1), rank_one(stack, DOWN.format(1), seed=2),
               rank_one(stack, DOWN.format(2), seed=3)]
    for order in itertools.permutations(range(3)):
        for p in patches:
            stack.apply(p)
        assert not torch.equal(lm.model.get_parameter(DOWN.format(1)), original[DOWN.format(1)])
        for i in order:
            stack.revert(patches[i].id)
        assert stack.version == BASE_VERSION
        assert_identical(lm.model, original)
        assert stack.base_bytes() == 0  # base copies are released once nothing touches a weight


def test_weights_are_a_function_of_the_active_set(lm):
    """apply A, B, C then revert B == apply A, C: bit for bit, whatever the history."""
    stack = _stack(lm)
    a, b, c = (rank_one(stack, DOWN.format(1), seed=s) for s in (1, 2, 3))
    for p in (a, b, c):
        stack.apply(p)
    stack.revert(b.id)
    after_history = snapshot(lm.model)
    version_after_history = stack.version
    stack.revert_all()
    stack.apply(a)
    stack.apply(c)
    assert_identical(lm.model, after_history)
    assert stack.version == version_after_history
    stack.revert_all()


def test_apply_changes_the_output_and_revert_restores_it(lm):
    stack = _stack(lm)
    ids = torch.tensor([[3, 4, 5, 6]])
    before = lm.model(ids).logits
    p = rank_one(stack, DOWN.format(0), scale=5.0)
    version = stack.apply(p)
    assert version != BASE_VERSION and stack.ids == [p.id]
    assert not torch.allclose(lm.model(ids).logits, before)
    stack.revert(p.id)
    assert torch.equal(lm.model(ids).logits, before)


def test_apply_is_atomic_when_a_write_fails_halfway(lm, monkeypatch):
    stack = _stack(lm)
    first = rank_one(stack, DOWN.format(3), seed=9)
    stack.apply(first)
    state = snapshot(lm.model)
    two = stack.stamp(Patch(kind="delta", method="manual", base_model="", base_fingerprint="", tensors={
        **rank_one(stack, DOWN.format(1)).tensors, **rank_one(stack, DOWN.format(3), seed=4).tensors}))
    calls = []
    original_assign = PatchStack._assign

    def failing(self, name, value):
        calls.append(name)
        if len(calls) == 2:
            raise RuntimeError("device lost")  # the second tensor's write fails
        original_assign(self, name, value)

    monkeypatch.setattr(PatchStack, "_assign", failing)
    with pytest.raises(RuntimeError, match="device lost"):
        stack.apply(two)
    monkeypatch.setattr(PatchStack, "_assign", original_assign)
    assert stack.ids == [first.id]
    assert_identical(lm.model, state)
    stack.revert(first.id)


def test_overflow_is_refused_before_anything_changes(lm):
    stack = _stack(lm)
    state = snapshot(lm.model)
    w = lm.model.get_parameter(DOWN.format(1))
    huge = stack.stamp(Patch(kind="delta", method="manual", base_model="", base_fingerprint="", tensors={
        f"delta.{DOWN.format(1)}.B": torch.full((w.shape[0], 1), 3e38),
        f"delta.{DOWN.format(1)}.A": torch.full((1, w.shape[1]), 3e38)}))
    with pytest.raises(PatchError, match="non-finite"):
        stack.apply(huge)
    assert_identical(lm.model, state)


def test_double_apply_and_unknown_revert(lm):
    stack = _stack(lm)
    p = rank_one(stack, DOWN.format(1))
    stack.apply(p)
    with pytest.raises(PatchError, match="already applied"):
        stack.apply(p)
    with pytest.raises(PatchError, match="not applied"):
        stack.revert("0123abcd")
    stack.revert(p.id)


def test_side_modules_attach_and_detach_as_hooks(lm):
    stack = _stack(lm)
    state = snapshot(lm.model)
    ids = torch.tensor([[3, 4, 5, 6]])
    before = lm.model(ids).logits
    mlp = "model.layers.1.mlp"
    d = lm.model.config.hidden_size
    bias = stack.stamp(Patch(kind="side_module", method="manual", base_model="", base_fingerprint="",
                             side_modules={"shift": {"type": "bias", "attach": mlp}},
                             tensors={"side.shift.bias": torch.full((d,), 0.5)}))
    neurons = stack.stamp(Patch(kind="side_module", method="manual", base_model="", base_fingerprint="",
                                side_modules={"n": {"type": "ffn_neurons", "attach": mlp,
                                                    "config": {"activation": "relu"}}},
                                tensors={"side.n.keys": torch.randn(2, d), "side.n.key_bias": torch.zeros(2),
                                         "side.n.values": torch.randn(2, d)}))
    captured = {}

    def capture():  # registered after the stack's hooks, so it sees what they return
        return lm.model.get_submodule(mlp).register_forward_hook(lambda m, a, o: captured.__setitem__("out", o))

    handle = capture()
    lm.model(ids)
    plain = captured["out"]
    handle.remove()
    stack.apply(bias)
    handle = capture()
    lm.model(ids)
    assert torch.allclose(captured["out"], plain + 0.5)  # the hook added the bias to the MLP's output
    stack.apply(neurons)
    with_both = lm.model(ids).logits
    stack.revert(bias.id)
    assert not torch.equal(lm.model(ids).logits, with_both)
    stack.revert(neurons.id)
    handle.remove()
    assert torch.equal(lm.model(ids).logits, before)
    assert_identical(lm.model, state)
    assert not lm.model.get_submodule(mlp)._forward_hooks


def test_side_module_shape_mismatch_is_refused(lm):
    stack = _stack(lm)
    bad = stack.stamp(Patch(kind="side_module", method="manual", base_model="", base_fingerprint="",
                            side_modules={"s": {"type": "bias", "attach": "model.layers.1.mlp"}},
                            tensors={"side.s.bias": torch.zeros(7)}))
    with pytest.raises(PatchError, match="bias of shape"):
        stack.apply(bad)


def test_fingerprint_is_dtype_independent(tmp_path):
    """A patch made on the float32 model applies to the same checkpoint served in bfloat16."""
    fp32 = load_tiny("llama-3-8b", tmp_path / "m")
    bf16 = load_tiny("llama-3-8b", tmp_path / "m", dtype="bfloat16")
    p = rank_one(_stack(fp32), DOWN.format(1))
    stack = _stack(bf16)
    stack.check(p)
    stack.apply(p)
    stack.revert(p.id)


def test_where_a_patch_goes_in_the_apply_order():
    from patches import patchset_with

    assert patchset_with(["a", "b", "c"], "n") == ["a", "b", "c", "n"]  # on top
    assert patchset_with(["a", "b", "c"], "n", position=1) == ["a", "n", "b", "c"]  # back in its place
    assert patchset_with(["a", "b", "c", "d"], "n", ["b", "c"]) == ["a", "n", "d"]  # where the first replaced one was
    assert patchset_with(["a", "c"], "n", ["b", "c"]) == ["a", "n"]  # replaced ones already gone are skipped
    assert patchset_with(["a"], "n", ["x"]) == ["a", "n"]  # none of them active: on top


class _Verify:
    """A stand-in for the engine's verify pass: counts its runs, fails while `fail` is set."""

    def __init__(self, model):
        self.model, self.runs, self.fail = model, 0, False

    def __call__(self, changed: frozenset[str]) -> bool:
        self.runs += 1
        self.changed = changed
        return not self.fail and bool(torch.isfinite(self.model(torch.tensor([[3, 4, 5]])).logits).all())


def _verified_stack(lm) -> tuple[PatchStack, _Verify]:
    verify = _Verify(lm.model)
    return PatchStack(lm.model, base_model=lm.profile.name, architecture=lm.profile.architecture,
                      verify=verify), verify


def test_a_patch_that_fails_verify_is_refused_and_rolled_back(lm):
    stack, verify = _verified_stack(lm)
    state = snapshot(lm.model)
    verify.fail = True
    p = rank_one(stack, DOWN.format(1))
    with pytest.raises(PatchError, match="non-finite"):
        stack.apply(p)
    assert stack.ids == [] and verify.runs == 1
    assert_identical(lm.model, state)
    with pytest.raises(PatchError, match="non-finite"):  # refused again: a failed set is never remembered
        stack.apply(p)
    assert verify.runs == 2
    assert_identical(lm.model, state)


def test_a_patch_set_that_passed_verify_is_not_verified_again(lm):
    stack, verify = _verified_stack(lm)
    state = snapshot(lm.model)
    one, two = rank_one(stack, DOWN.format(1), seed=1), rank_one(stack, DOWN.format(2), seed=2)
    stack.apply(one)
    after_one = snapshot(lm.model)
    stack.revert(one.id)  # a revert runs no verify
    assert verify.runs == 1
    stack.apply(one)  # the same set again: the weights are the ones that passed
    assert verify.runs == 1
    assert_identical(lm.model, after_one)
    stack.apply(two)  # a new set: verified
    assert verify.runs == 2
    stack.revert(one.id)
    stack.apply(one)  # [two, one] is not [one, two]: another set, verified
    assert verify.runs == 3
    stack.revert_all()
    assert_identical(lm.model, state)


def test_a_remembered_set_is_verified_again_once_forgotten(lm, monkeypatch):
    import patches.stack as stack_module

    monkeypatch.setattr(stack_module, "VERIFIED_SETS", 1)
    stack, verify = _verified_stack(lm)
    one, two = rank_one(stack, DOWN.format(1), seed=1), rank_one(stack, DOWN.format(2), seed=2)
    for p in (one, two):
        stack.apply(p)
        stack.revert(p.id)
    assert verify.runs == 2
    stack.apply(one)  # forgotten when [two] passed: verified again
    assert verify.runs == 3


def test_a_memory_patch_runs_no_verify_pass(lm):
    from tests.patches.malformed import memory_patch

    stack, verify = _verified_stack(lm)
    memory = memory_patch(stack)
    stack.apply(memory)  # no weight or hook changes: the forward pass is the one before
    assert verify.runs == 0 and len(stack.memory) == 2
    stack.apply(rank_one(stack, DOWN.format(1)))  # weights change: verified
    assert verify.runs == 1
    stack.revert_all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_warm_up_runs_the_path_of_a_patch_on_its_own_model(dtype):
    from patches.stack import warm_up

    warm_up(dtype)  # imports, parses, checks, applies and reverts on a toy model; leaves nothing behind


def test_prepare_does_the_first_patchs_work_and_changes_nothing(lm, monkeypatch):
    from patches import stack as stack_module

    stack = _stack(lm)
    original = snapshot(lm.model)
    names = lm.profile.first_edit_weights()
    assert names and all(lm.model.get_parameter(n).dim() == 2 for n in names)
    stack_module.prepare(stack, names)
    assert_identical(lm.model, original)  # bit for bit: a zero delta composes to the base
    assert stack.ids == [] and stack.version == BASE_VERSION and stack.base_bytes() == 0
    digested = []
    monkeypatch.setattr(stack_module, "tensor_digest", lambda name, tensor: digested.append(name) or "recomputed")
    patch = rank_one(stack, names[-1], seed=1)  # stamping and checking it need the base digest prepare made
    stack.apply(patch)
    assert digested == [] and patch.base_fingerprint != "recomputed"
    stack.revert(patch.id)
    assert_identical(lm.model, original)
