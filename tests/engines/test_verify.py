"""The hf engine's verify pass replays only from the first layer a change touches, computes what
a full forward pass computes, and still refuses a change whose output is not finite."""

from __future__ import annotations

import pytest
import torch

from edit_serve.engines.hf import HFEngine
from tests.patches.conftest import rank_one, snapshot, assert_identical


@pytest.fixture
def engine(tiny):
    """An hf engine on the session's tiny model, left as it was found (other tests share it)."""
    engine, state = HFEngine(tiny), snapshot(tiny.model)
    yield engine
    engine.stack.revert_all()
    assert_identical(tiny.model, state)


def _down(engine: HFEngine, layer: int) -> str:
    return engine.profile.mlp_out(layer) + ".weight"


def test_a_change_at_a_later_layer_is_verified_from_that_layer(engine):
    verify, stack = engine.verify_pass, engine.stack
    last = engine.profile.num_layers - 1
    stack.apply(rank_one(stack, _down(engine, 0), seed=1))  # the first pass: full (nothing kept yet)
    assert verify.replays == 0
    stack.apply(rank_one(stack, _down(engine, last), seed=2))
    if engine.model.config.is_encoder_decoder:  # T5: always the full pass
        assert not verify.layers and verify.replays == 0
        return
    assert verify.start({_down(engine, last)}) == last
    assert verify.replays == 0 and verify.checked  # the first replay is compared with a full pass, and agrees
    assert len(verify.layers) == engine.profile.num_layers
    stack.apply(rank_one(stack, _down(engine, last), seed=3))
    assert verify.replays == 1
    full, _ = verify._full()  # what was kept is what the model, as the stack makes it, computes now
    replayed, _ = verify._replay(last)
    torch.testing.assert_close(replayed, full, rtol=1e-5, atol=1e-5)


def test_a_non_finite_replay_is_refused_and_keeps_what_held(engine):
    if engine.model.config.is_encoder_decoder:  # T5 replays nothing: the full pass, as before
        assert not engine.verify_pass.layers
        return
    verify, stack = engine.verify_pass, engine.stack
    last = engine.profile.num_layers - 1
    for seed in (1, 2):  # a full pass, then a checked replay
        stack.apply(rank_one(stack, _down(engine, last), seed=seed))
    kept = [c.hidden.clone() for c in verify.calls]
    mlp = engine.model.get_submodule(engine.profile.mlp(last))
    handle = mlp.register_forward_hook(lambda module, args, out: out * float("inf"))
    try:
        assert verify({engine.profile.mlp(last)}) is False  # replayed from the last layer: caught
    finally:
        handle.remove()
    assert verify.replays == 1
    assert all(torch.equal(a.hidden, b) for a, b in zip(verify.calls, kept))
    assert verify({engine.profile.mlp(last)}) is True  # the fixture reverts all and checks the weights


def test_the_stack_names_what_changed_since_the_last_pass(tmp_path):
    from patches import PatchStack
    from tests.conftest import load_tiny

    llama = load_tiny("llama-3-8b", tmp_path)
    seen = []
    stack = PatchStack(llama.model, base_model=llama.profile.name, architecture=llama.profile.architecture,
                       verify=lambda changed: seen.append(changed) or True)
    one, two = (rank_one(stack, llama.profile.mlp_out(i) + ".weight", seed=i) for i in (1, 2))
    stack.apply(one)
    stack.revert(one.id)  # a revert runs no pass: its change is named by the next one
    stack.apply(two)
    stack.apply(one)
    assert seen == [{llama.profile.mlp_out(1) + ".weight"},
                    {llama.profile.mlp_out(1) + ".weight", llama.profile.mlp_out(2) + ".weight"},
                    {llama.profile.mlp_out(1) + ".weight"}]


def test_a_prepared_pass_replays_the_first_change(engine):
    verify, stack = engine.verify_pass, engine.stack
    verify.prepare()  # what the engine does at start
    last = engine.profile.num_layers - 1
    stack.apply(rank_one(stack, _down(engine, last), seed=1))
    assert verify.replays == (0 if engine.model.config.is_encoder_decoder else 1)


def test_a_tied_head_counts_as_the_embedding(engine):
    verify, model = engine.verify_pass, engine.model
    if model.config.is_encoder_decoder:  # T5 replays nothing: the full pass, as before
        assert not verify.layers
        return
    last = engine.profile.num_layers - 1
    assert verify.start({engine.profile.mlp(last)}) == last
    assert verify.start({_down(engine, 1)}) == 1
    head = next(n for n, m in model.named_modules() if m is model.get_output_embeddings())
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert verify.start({head + ".weight"}) == (0 if tied else last)  # the head: replayed from the last layer's input
    assert verify.start({"no.such.module"}) == 0


def test_smollm_tied_head_replays_from_the_embedding(smollm):
    verify = HFEngine(smollm).verify_pass
    assert smollm.model.get_output_embeddings().weight is smollm.model.get_input_embeddings().weight
    assert verify.start({"lm_head.weight"}) == 0 and verify.start({"model.norm.weight"}) == 29
