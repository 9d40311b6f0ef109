"""AlphaEdit (Fang et al., ICLR 2025): MEMIT with every update projected onto the null space
of the preserved keys (the corpus statistics) and kept off the keys of the edits already
active on the model, so sequential edits do not undo each other or the model's knowledge.

It is MEMIT's pipeline (editors.memit) with `null_space=True`; the closed form is in
editors.nullspace. Layers default to the profile's `alphaedit` entry, else its `memit` one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from editors.base import editor
from editors.memit import MEMITConfig, edit


@dataclass(frozen=True)
class AlphaEditConfig(MEMITConfig):
    method: ClassVar[str] = "alphaedit"

    null_space: bool = True


@editor("alphaedit", AlphaEditConfig, rephrasings=True)
def compute(ctx, requests, cfg: AlphaEditConfig):
    """AlphaEdit: null-space-constrained MEMIT for lifelong editing."""
    return edit(ctx, requests, cfg, "alphaedit")
