"""Export a low-rank patch as a PEFT LoRA adapter folder.

A delta W = B @ A on `P = <module>.weight` becomes PEFT's `lora_B` [out, r] and `lora_A`
[r, in] on `<module>` with lora_alpha = r, so PEFT's scaling alpha / r is 1 and the adapter
adds exactly B @ A. Deltas of lower rank are padded with zero rows/columns to the patch's
largest rank (B @ A is unchanged). The folder (adapter_config.json +
adapter_model.safetensors) loads with `peft.PeftModel.from_pretrained` and as a vLLM
`LoRARequest`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from patches.errors import PatchError
from patches.format import Patch, validate

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


def lora_tensors(patch: Patch) -> tuple[int, dict[str, torch.Tensor]]:
    """(rank, PEFT state dict) of a low-rank delta patch. Raises PatchError otherwise."""
    validate(patch)
    if patch.kind != "delta":
        raise PatchError("only weight-delta patches can be exported as a LoRA adapter; this one holds side modules")
    deltas = patch.deltas()
    other = sorted(f"{d.param} ({d.form})" for d in deltas.values() if d.form != "low_rank")
    if other:
        raise PatchError(
            f"only low-rank deltas (B @ A) can be exported as a LoRA adapter; this patch also has {', '.join(other)}"
        )
    bad = sorted(p for p in deltas if not p.endswith(".weight"))
    if bad:
        raise PatchError(f"LoRA adapts the weight of a linear layer; cannot export deltas on {', '.join(bad)}")
    rank = max(d.rank for d in deltas.values())
    tensors = {}
    for param, d in sorted(deltas.items()):
        module = param[: -len(".weight")]
        b, a = d.tensors["B"], d.tensors["A"]  # (out, r_d), (r_d, in)
        pad = rank - a.shape[0]
        prefix = f"base_model.model.{module}"
        tensors[f"{prefix}.lora_A.weight"] = torch.cat([a, a.new_zeros(pad, a.shape[1])]).contiguous()  # (r, in)
        tensors[f"{prefix}.lora_B.weight"] = torch.cat([b, b.new_zeros(b.shape[0], pad)], 1).contiguous()  # (out, r)
    return rank, tensors


def export_peft(patch: Patch, folder: str | os.PathLike, base_model_name_or_path: str | None = None) -> Path:
    """Write `patch` as a PEFT LoRA adapter into `folder` (created). Returns the folder."""
    from safetensors.torch import save_file

    rank, tensors = lora_tensors(patch)
    modules = sorted(param[: -len(".weight")] for param in patch.deltas())
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path or patch.base_model,
        "r": rank,
        "lora_alpha": rank,
        "lora_dropout": 0.0,
        "target_modules": modules,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "revision": None,
        "modules_to_save": None,
    }
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt", "edit_serve.id": patch.id})
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return out
