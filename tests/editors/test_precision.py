"""Low-precision Linears for an editor's optimization loop: only inside the block, only in the
calling thread, the model untouched after; v* computed with them stays close to float32's."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from editors.precision import LowPrecisionLinears, check, resolve


def net() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    return model.requires_grad_(False)


def test_bfloat16_inside_the_block_in_this_thread_only():
    model, x = net(), torch.randn(4, 16)
    plain = model(x)
    expected = nn.functional.linear(torch.relu(nn.functional.linear(x.bfloat16(), model[0].weight.bfloat16(),
                                                                     model[0].bias.bfloat16())),
                                    model[2].weight.bfloat16(), model[2].bias.bfloat16())
    other = {}
    with LowPrecisionLinears(model, torch.bfloat16):
        low = model(x)
        worker = threading.Thread(target=lambda: other.setdefault("out", model(x)))
        worker.start()
        worker.join()
    assert low.dtype == torch.bfloat16 and torch.equal(low, expected)
    assert not torch.equal(low.float(), plain)
    assert torch.equal(other["out"], plain)  # another thread (a serving engine) kept float32
    assert all("forward" not in vars(m) for m in model.modules())
    assert torch.equal(model(x), plain)


def test_float32_is_a_no_op_and_gradients_reach_an_input():
    model, x = net(), torch.randn(4, 16, requires_grad=True)
    with LowPrecisionLinears(model, torch.float32):
        assert all("forward" not in vars(m) for m in model.modules())
    with LowPrecisionLinears(model, torch.bfloat16):
        (grad,) = torch.autograd.grad(model(x).float().sum(), [x])
    assert grad.shape == x.shape and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_a_tied_weight_runs_in_bfloat16_in_both_places():
    a, b = nn.Linear(8, 8, bias=False), nn.Linear(8, 8, bias=False)
    b.weight = a.weight
    model, x = nn.Sequential(a, b).requires_grad_(False), torch.randn(2, 8)
    w = a.weight.bfloat16()
    with LowPrecisionLinears(model, torch.bfloat16):
        assert torch.equal(model(x), x.bfloat16() @ w.T @ w.T)


def test_settings():
    assert resolve("float32", "cpu") == torch.float32 and resolve("bfloat16", "cpu") == torch.bfloat16
    assert resolve("auto", "cpu") in (torch.float32, torch.bfloat16)
    with pytest.raises(ValueError, match="v_dtype"):
        check("rome", "float16")


def test_rome_v_star_in_bfloat16_is_close_to_float32(smollm):
    """On the real model: the same request's v* with bfloat16 steps after the first lands
    within a few percent of the float32 one, from the same (exact) v_init."""
    from editors.base import EditRequest
    from editors.keys import CONTEXT_TEMPLATES
    from editors.vstar import VStarConfig, compute_vstar

    request = EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English")
    module = smollm.profile.mlp_out(smollm.profile.default_layers("rome")[0])
    full, low = (compute_vstar(smollm.model, smollm.tokenizer, module, [request], CONTEXT_TEMPLATES[:4],
                               VStarConfig(steps=8, chunk=1, dtype=dtype)) for dtype in ("float32", "bfloat16"))
    assert torch.equal(full.init, low.init)
    shift_full, shift_low = full.target - full.init, low.target - low.init
    assert float((shift_low - shift_full).norm()) < 0.05 * float(shift_full.norm())
    assert float(low.nll[0]) < float(full.nll[0]) + 0.5


def test_a_linear_whose_forward_is_wrapped_already_keeps_it():
    """accelerate's device hooks (device_map models) wrap forward on the instance."""
    model, x = net(), torch.randn(4, 16)
    plain = model[0].forward
    model[0].forward = lambda h: plain(h)
    with LowPrecisionLinears(model, torch.bfloat16):
        assert model[0](x).dtype == torch.float32 and model[2](torch.randn(4, 32)).dtype == torch.bfloat16
    assert "forward" in vars(model[0]) and "forward" not in vars(model[2])


def test_cpu_copies_are_kept_and_refilled_from_the_current_weights():
    """A second block reuses the first one's buffers (no fresh memory to fault in) and still
    runs the weights as they are then: a patch applied between two edits is seen."""
    from editors import precision

    model, x = net(), torch.randn(4, 16)
    with LowPrecisionLinears(model, torch.bfloat16):
        model(x)
    kept = {id(t): precision._BUFFERS[id(t)][1] for t in (model[0].weight, model[2].weight)}
    with torch.no_grad():
        model[0].weight.add_(1.0)  # what PatchStack does to a live model between edits
    expected = nn.functional.linear(torch.relu(nn.functional.linear(x.bfloat16(), model[0].weight.bfloat16(),
                                                                     model[0].bias.bfloat16())),
                                    model[2].weight.bfloat16(), model[2].bias.bfloat16())
    with LowPrecisionLinears(model, torch.bfloat16):
        assert torch.equal(model(x), expected)
        assert all(precision._BUFFERS[i][1] is buffer for i, buffer in kept.items())
    key = id(model[0].weight)
    del model
    assert key not in precision._BUFFERS  # a dropped model's buffers go with it


def test_a_second_block_while_the_buffers_are_in_use_makes_its_own_copies():
    a, b, x = net(), net(), torch.randn(4, 16)
    with torch.no_grad():
        b[0].weight.mul_(2.0)
    with LowPrecisionLinears(a, torch.bfloat16), LowPrecisionLinears(b, torch.bfloat16):
        out_a, out_b = a(x), b(x)
    with LowPrecisionLinears(a, torch.bfloat16):
        assert torch.equal(a(x), out_a)
    with LowPrecisionLinears(b, torch.bfloat16):
        assert torch.equal(b(x), out_b)
    assert not torch.equal(out_a, out_b)
