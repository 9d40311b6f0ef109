"""Fixtures for the evaluation harness: a tiny Llama with a matching profile file, records in its
vocabulary, and the real method (with settings for tiny models) that drives the harness."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from tests.conftest import load_tiny

#: a real editor and settings that edit the tiny random models quickly (the editors' own test
#: table uses these): constrained fine-tuning of one MLP output projection
METHOD = "ft"
CONFIG = {"lr": 0.05, "norm_constraint": 0.05, "objective": "target"}
#: the side-module methods (weights frozen, trained neurons as hooks) with tiny-model settings
SIDE_MODULE_CONFIGS = {"t-patcher": {"layers": [3], "steps": 10, "lr": 0.1},
                       "calinet": {"layers": [2, 3], "steps": 10, "lr": 0.05}}


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
