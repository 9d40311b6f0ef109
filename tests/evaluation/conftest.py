"""Fixtures for the evaluation harness: a tiny Llama with a matching profile file, records in its
vocabulary, and `tiny-embed-ft`, a small real editor (a few Adam steps on the input-embedding
rows of the subject's tokens, a row-sparse delta) that drives the harness quickly and locally."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

from editors import editor
from editors.base import EditError, get_editor
from patches import Patch
from tests.conftest import load_tiny

TINY_FT = "tiny-embed-ft"


@dataclass(frozen=True)
class TinyFTConfig:
    steps: int = 25
    lr: float = 0.1


def _nll(model, tokenizer, requests) -> torch.Tensor:
    total = 0.0
    for r in requests:
        prompt = tokenizer(r.text).input_ids
        target = tokenizer(" " + r.target_new, add_special_tokens=False).input_ids
        ids = torch.tensor([prompt + target[:-1]])  # (1, T)
        logits = model(input_ids=ids).logits[0, len(prompt) - 1:]  # (len(target), V)
        total = total + torch.nn.functional.cross_entropy(logits, torch.tensor(target))
    return total / len(requests)


def tiny_embed_ft(model, tokenizer, profile, requests, cfg: TinyFTConfig) -> Patch:
    """Fine-tune the input-embedding rows of the subjects' tokens (read through a forward hook;
    the model's weights are never written). Only prompts that contain a subject see the edit."""
    module = model.get_submodule(profile.modules.embed)
    index = torch.tensor(sorted({t for r in requests for t in tokenizer(r.subject, add_special_tokens=False).input_ids}))
    rows = torch.zeros(len(index), module.weight.shape[1], requires_grad=True)  # (k, d)

    def add_rows(m, args, out):
        hits = (args[0][..., None] == index).float()  # (B, T, k)
        return out + hits @ rows  # (B, T, d)

    handle = module.register_forward_hook(add_rows)
    try:
        opt = torch.optim.Adam([rows], lr=cfg.lr)
        with torch.enable_grad():
            for _ in range(cfg.steps):
                opt.zero_grad()
                _nll(model, tokenizer, requests).backward()
                opt.step()
    finally:
        handle.remove()
    name = profile.modules.embed + ".weight"
    return Patch(kind="delta", method=TINY_FT, base_model="", base_fingerprint="",
                 tensors={f"delta.{name}.rows": rows.detach().clone(), f"delta.{name}.index": index})


try:
    get_editor(TINY_FT)
except EditError:
    editor(TINY_FT, TinyFTConfig)(tiny_embed_ft)


# --- a tiny Llama, its profile as a file, and records in its vocabulary ---------------------


def _toml_value(value) -> str:
    return json.dumps(value)  # strings, ints and lists of them read the same in TOML


def profile_toml(profile) -> str:
    data = profile.model_dump(exclude_none=True, exclude={"path"})
    lines = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for table in ("source", "modules", "editing"):
        lines.append(f"\n[{table}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in data[table].items()]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """(LoadedModel, profile file) of a tiny random Llama."""
    folder = tmp_path_factory.mktemp("tiny-llama-eval")
    lm = load_tiny("llama-3-8b", folder / "model")
    path = folder / "tiny-llama.toml"
    path.write_text(profile_toml(lm.profile.model_copy(update={"name": "tiny-llama", "dtype": "float32"})))
    return lm, path


def tiny_row(prompt, subject, target, paraphrase, neighbor, neighbor_target, portability=None):
    return {"prompt": prompt, "subject": subject, "target_new": target,
            "paraphrase_prompts": [paraphrase],
            "neighborhood_prompts": [{"prompt": neighbor, "target": neighbor_target}],
            "portability": [{"prompt": portability or paraphrase, "target": "w5", "target_aliases": [target]}]}


#: three facts in the tiny tokenizer's vocabulary; each record's neighborhood prompt is the next
#: record's edit prompt (with its old answer), so a later edit shows up in an earlier record's locality
TINY_ROWS = [
    tiny_row("Danielle Darrieux mother tongue is", "Danielle Darrieux", "English",
             "Danielle Darrieux speaks", "Laurent Cars was employed in", "Paris"),
    tiny_row("Laurent Cars was employed in", "Laurent Cars", "Rome",
             "Laurent Cars works in", "Eiffel Tower is located in", "Paris"),
    tiny_row("Eiffel Tower is located in", "Eiffel Tower", "Philadelphia",
             "Eiffel Tower is in", "Danielle Darrieux mother tongue is", "French"),
]


@pytest.fixture
def tiny_data(tmp_path):
    path = tmp_path / "tiny.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in TINY_ROWS))
    return path
