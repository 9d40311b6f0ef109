"""Tracing hooks: capture, edit, stop early, always removed, invisible to other threads."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from editors.nethook import AddToWeights, StopForward, Trace, TraceDict, overlay_form


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_trace_captures_input_and_output_and_removes_itself():
    model, x = net(), torch.randn(2, 4)
    with Trace(model, "2", retain_input=True) as tr:
        y = model(x)
    assert torch.equal(tr.output, y)
    assert torch.equal(tr.input, torch.relu(model[0](x)))
    assert hooks(model) == 0


def test_edit_and_edit_input_change_the_forward_only_inside():
    model, x = net(), torch.randn(2, 4)
    plain = model(x)
    with Trace(model, "2", edit=lambda out, name: out + 1):
        assert torch.allclose(model(x), plain + 1)
    with Trace(model, "2", edit_input=lambda h, name: torch.zeros_like(h)):
        assert torch.allclose(model(x), model[2].bias.expand(2, 3))
    assert torch.equal(model(x), plain)


def test_stop_forward_runs_part_of_the_network():
    model, x = net(), torch.randn(2, 4)
    seen = []
    model[2].register_forward_hook(lambda *a: seen.append(1))
    with TraceDict(model, ["0", "1"], stop=True) as td:
        model(x)
        pytest.fail("the forward pass should have stopped")
    assert not seen and td["1"].output.shape == (2, 8)
    with pytest.raises(StopForward):  # a Trace without stop=True does not swallow it
        with Trace(model, "0"):
            raise StopForward()


def test_hooks_are_removed_when_the_block_raises():
    model = net()
    with pytest.raises(RuntimeError):
        with TraceDict(model, ["0", "2"]), AddToWeights(model, {"2": torch.zeros(3, 8)}):
            raise RuntimeError("boom")
    assert hooks(model) == 0
    with pytest.raises(LookupError, match="no module"):
        TraceDict(model, ["0", "nope"])
    assert hooks(model) == 0  # the first hook is not left behind


def test_add_to_weights_matches_a_written_weight_and_trains_the_delta():
    model, x = net(), torch.randn(5, 4)
    delta = torch.randn(3, 8)
    b, a = torch.randn(3, 2), torch.randn(2, 8)
    ref = net()
    with torch.no_grad():
        ref[2].weight += delta
    with AddToWeights(model, {"2": delta}):
        assert torch.allclose(model(x), ref(x), atol=1e-6)
    with torch.no_grad():
        ref[2].weight += b @ a
    with AddToWeights(model, {"2": delta + b @ a}), torch.no_grad():
        dense = model(x)
    with AddToWeights(model, {"2": delta}), AddToWeights(model, {"2": (b, a)}), torch.no_grad():
        assert torch.allclose(model(x), dense, atol=1e-5)
    trainable = torch.zeros(3, 8, requires_grad=True)
    with AddToWeights(model, {"2": trainable}):
        model(x).sum().backward()
    assert trainable.grad is not None and trainable.grad.abs().sum() > 0


def test_factors_of_a_rank_that_costs_more_than_the_weight_run_as_their_product():
    model, x = net(), torch.randn(5, 4)  # layer "2": 8 -> 3, 24 weights
    low, high = (torch.randn(3, 2), torch.randn(2, 8)), (torch.randn(3, 3), torch.randn(3, 8))
    assert overlay_form(low) is low  # rank 2: 2 * (3 + 8) = 22 multiplications per input, under 24
    dense = overlay_form(high)  # rank 3: 33
    assert isinstance(dense, torch.Tensor) and torch.allclose(dense, high[0] @ high[1])
    ref = net()
    with torch.no_grad():
        ref[2].weight += high[0] @ high[1]
    with AddToWeights(model, {"2": high}), torch.no_grad():
        assert torch.allclose(model(x), ref(x), atol=1e-5)
    b = high[0].clone().requires_grad_()
    with AddToWeights(model, {"2": (b, high[1])}):
        model(x).sum().backward()
    assert b.grad is not None and b.grad.abs().sum() > 0  # the product still trains its factors


def test_hooks_do_not_touch_other_threads():
    """The serving engine runs forward passes in its own thread while an editor traces."""
    model, x = net(), torch.randn(2, 4)
    plain = model(x)
    result = {}
    with AddToWeights(model, {"2": torch.ones(3, 8)}), Trace(model, "2", edit=lambda out, name: out * 0) as tr:
        worker = threading.Thread(target=lambda: result.setdefault("y", model(x)))
        worker.start()
        worker.join()
        assert tr.output is None  # the other thread's pass was not captured
        assert torch.equal(model(x), torch.zeros(2, 3))
    assert torch.equal(result["y"], plain)
