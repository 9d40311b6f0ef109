"""Model profiles: everything architecture-specific about a model, as data.

A profile is a TOML file. The built-in ones live in `edit_serve/profiles/`; users add their
own by passing a path (`--model my-model.toml`) or by dropping files into a folder named by
`EDIT_SERVE_PROFILES` (colon-separated folders, searched before the built-ins). Code never
branches on a model's name: module names are templates here (`"model.layers.{}.mlp.down_proj"`),
and default layers per editing method are lists here.
"""

from __future__ import annotations

import os
import tomllib
from importlib import resources
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ProfileError(ValueError):
    """A profile that cannot be found or does not validate."""


class Source(BaseModel):
    """Where the weights come from."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["gguf_package", "pretrained"] = Field(
        description="gguf_package: a GGUF file inside an installed Python package, dequantized "
        "once and cached; pretrained: a hub id or a local folder for from_pretrained."
    )
    package: str | None = Field(None, description="gguf_package: the importable package name.")
    file: str | None = Field(None, description="gguf_package: the GGUF file inside the package.")
    id: str | None = Field(None, description="pretrained: hub id or local folder.")

    @model_validator(mode="after")
    def _complete(self) -> "Source":
        if self.kind == "gguf_package" and not (self.package and self.file):
            raise ValueError("source kind 'gguf_package' needs 'package' and 'file'")
        if self.kind == "pretrained" and not self.id:
            raise ValueError("source kind 'pretrained' needs 'id' (a hub id or a folder)")
        return self


class Modules(BaseModel):
    """Module-name templates; `{}` is the layer index."""

    model_config = ConfigDict(extra="forbid")

    layer: str = Field(description="One transformer block.")
    mlp: str = Field(description="The MLP (FFN) of a block; side modules attach here.")
    mlp_in: list[str] = Field(description="The MLP input projections (keys of the FFN memory).")
    mlp_out: str = Field(description="The MLP output projection (the matrix ROME/MEMIT edit).")
    embed: str = Field(description="The input embedding (also the output head when tied).")
    final_norm: str | None = Field(None, description="The final norm before the output head.")

    @model_validator(mode="after")
    def _templates(self) -> "Modules":
        templates = {"layer": self.layer, "mlp": self.mlp, "mlp_out": self.mlp_out}
        templates.update({f"mlp_in[{i}]": t for i, t in enumerate(self.mlp_in)})
        for key, value in templates.items():
            if "{}" not in value:
                raise ValueError(f"module template {key}={value!r} has no '{{}}' for the layer index")
        return self


class Profile(BaseModel):
    """A named model and its architecture facts."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="The name clients use in the `model` field.")
    description: str = ""
    architecture: str = Field(description="The transformers class name, e.g. LlamaForCausalLM.")
    num_layers: int = Field(gt=0, description="Blocks that the `modules` templates index.")
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="Default serving dtype (override with --dtype)."
    )
    source: Source
    modules: Modules
    editing: dict[str, list[int]] = Field(
        default_factory=dict, description="Default layers per editing method."
    )
    path: str | None = Field(None, description="The file this profile was read from.")

    @model_validator(mode="after")
    def _layers_in_range(self) -> "Profile":
        for method, layers in self.editing.items():
            bad = [layer for layer in layers if not 0 <= layer < self.num_layers]
            if bad:
                raise ValueError(
                    f"editing.{method} names layers {bad} outside 0..{self.num_layers - 1}"
                )
        return self

    # --- module names -------------------------------------------------------------
    def mlp_out(self, layer: int) -> str:
        return self.modules.mlp_out.format(layer)

    def mlp_in(self, layer: int) -> list[str]:
        return [t.format(layer) for t in self.modules.mlp_in]

    def mlp(self, layer: int) -> str:
        return self.modules.mlp.format(layer)

    def layer(self, layer: int) -> str:
        return self.modules.layer.format(layer)

    def first_edit_layers(self) -> list[int]:
        """The layers rome, memit and alphaedit edit by default: where a first edit most likely
        lands (engines prepare their weights at start, an editor warms their statistics)."""
        return sorted({layer for m in ("rome", "memit", "alphaedit") for layer in self.editing.get(m, ())})

    def first_edit_weights(self) -> list[str]:
        """The weights a first edit most likely patches: the MLP output projections of
        `first_edit_layers` (patches.stack.prepare)."""
        return [f"{self.mlp_out(layer)}.weight" for layer in self.first_edit_layers()]

    def default_layers(self, method: str) -> list[int]:
        """The profile's default layers for an editing method (clear error if unset)."""
        try:
            return list(self.editing[method])
        except KeyError:
            raise ProfileError(
                f"profile {self.name!r} has no default layers for method {method!r}; "
                f"add `{method} = [...]` under [editing] in {self.path or 'the profile'} "
                "or pass layers explicitly"
            ) from None

    def with_weights(self, weights: str | os.PathLike, num_layers: int | None = None) -> "Profile":
        """The same profile loading from another folder or hub id (e.g. a local copy)."""
        update: dict = {"source": Source(kind="pretrained", id=str(weights))}
        if num_layers is not None:
            update["num_layers"] = num_layers
            update["editing"] = {
                m: [x for x in ls if x < num_layers] or [num_layers - 1] for m, ls in self.editing.items()
            }
        return self.model_copy(update=update)


def _builtin_dir() -> Path:
    return Path(str(resources.files("edit_serve") / "profiles"))


def _search_dirs() -> list[Path]:
    extra = [Path(p) for p in os.environ.get("EDIT_SERVE_PROFILES", "").split(os.pathsep) if p]
    return [*extra, _builtin_dir()]


def read_profile(path: str | os.PathLike) -> Profile:
    """Parse and validate one profile file."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ProfileError(f"profile file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ProfileError(f"profile {path} is not valid TOML: {e}") from None
    data["path"] = str(path)
    try:
        return Profile.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"]) or "profile"
        raise ProfileError(f"profile {path}: {where}: {first['msg']}") from None


def available_profiles() -> dict[str, Path]:
    """Profile name -> file, user folders first (a user file overrides a built-in)."""
    found: dict[str, Path] = {}
    for folder in reversed(_search_dirs()):
        if folder.is_dir():
            for f in sorted(folder.glob("*.toml")):
                found[f.stem] = f
    return found


def get_profile(name_or_path: str | os.PathLike) -> Profile:
    """A profile by name (built-in or in EDIT_SERVE_PROFILES) or by path to a .toml file."""
    text = str(name_or_path)
    if text.endswith(".toml") or os.sep in text:
        return read_profile(text)
    profiles = available_profiles()
    if text not in profiles:
        raise ProfileError(
            f"unknown model profile {text!r}; known: {', '.join(sorted(profiles))} "
            "(or pass a path to a .toml profile)"
        )
    return read_profile(profiles[text])
