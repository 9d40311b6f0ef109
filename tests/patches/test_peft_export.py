"""Export of low-rank patches as PEFT LoRA adapters: PEFT's own loader must reproduce the
patched model, and patches that are not low rank are refused."""

from __future__ import annotations

import json

import pytest
import torch

from patches import Patch, PatchError, PatchStack
from patches.peft_export import CONFIG_FILE, export_peft
from tests.patches.conftest import rank_one

DOWN = "model.layers.{}.mlp.down_proj.weight"
GATE = "model.layers.{}.mlp.gate_proj.weight"


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_peft_adapter_reproduces_the_patched_model(llama, tmp_path):
    model = llama.model
    stack = PatchStack(model, base_model="tiny", architecture="LlamaForCausalLM")
    one = rank_one(stack, DOWN.format(1), scale=3.0, seed=1)
    two = rank_one(stack, GATE.format(2), scale=3.0, seed=2)
    b, a = two.tensors[f"delta.{GATE.format(2)}.B"], two.tensors[f"delta.{GATE.format(2)}.A"]
    tensors = {**one.tensors, f"delta.{GATE.format(2)}.B": torch.cat([b, -b], 1),  # rank 2 next to rank 1
               f"delta.{GATE.format(2)}.A": torch.cat([a, a * 0.5])}
    patch = stack.stamp(one.replace(tensors=tensors))
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    base = _logits(model, ids)

    folder = export_peft(patch, tmp_path / "adapter")
    config = json.loads((folder / CONFIG_FILE).read_text())
    assert config["r"] == config["lora_alpha"] == 2
    assert config["target_modules"] == ["model.layers.1.mlp.down_proj", "model.layers.2.mlp.gate_proj"]

    stack.apply(patch)
    patched = _logits(model, ids)
    stack.revert(patch.id)
    assert not torch.allclose(patched, base, atol=1e-3)

    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(model, str(folder))
    try:
        torch.testing.assert_close(_logits(peft_model, ids), patched, atol=1e-4, rtol=1e-4)
    finally:
        peft_model.unload()  # takes the LoRA layers out again; the session's model stays base
    torch.testing.assert_close(_logits(model, ids), base, atol=0, rtol=0)


def test_only_low_rank_weight_deltas_export(llama, tmp_path):
    stack = PatchStack(llama.model)
    w = llama.model.get_parameter(DOWN.format(0))
    dense = Patch(kind="delta", method="ft", base_model="", base_fingerprint="",
                  tensors={f"delta.{DOWN.format(0)}.full": torch.zeros_like(w)})
    with pytest.raises(PatchError, match=r"only low-rank deltas .*down_proj.weight \(dense\)"):
        export_peft(dense, tmp_path / "a")
    side = Patch(kind="side_module", method="tp", base_model="", base_fingerprint="",
                 tensors={"side.s.bias": torch.zeros(w.shape[0])},
                 side_modules={"s": {"type": "bias", "attach": "model.layers.0.mlp"}})
    with pytest.raises(PatchError, match="side modules"):
        export_peft(side, tmp_path / "b")
    norm = rank_one(stack, DOWN.format(0)).tensors
    bias_like = Patch(kind="delta", method="m", base_model="", base_fingerprint="",
                      tensors={"delta.model.norm.bias.B": norm[f"delta.{DOWN.format(0)}.B"][:4],
                               "delta.model.norm.bias.A": norm[f"delta.{DOWN.format(0)}.A"][:, :4]})
    with pytest.raises(PatchError, match="weight of a linear layer"):
        export_peft(bias_like, tmp_path / "c")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
