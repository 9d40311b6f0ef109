"""The edit context: one loaded model as every editor, the evaluation harness and the edit
worker see it.

    ctx = EditContext(model, tokenizer, profile)           # or EditContext.from_loaded(lm)
    job = prepare("rome", [{"prompt": ..., ...}], {"layers": [3]})   # validated once, at the door
    patch = ctx.compute(job)                               # stamped once, with the BASE fingerprint

The context holds the model, tokenizer and profile, the live `PatchStack` (the patches active
on the model: an edit is computed against the model *with* them), and the per-model caches
(key statistics, null-space projectors, the keys of the edits made so far), which live as
long as the model object and are keyed on disk by the model fingerprint. Editors get the
context and never mutate the model; applying a patch is the stack's job.

A long edit (a MEMIT batch of thousands takes hours on a CPU) can be resumed: with `parts` set
to a folder, each finished part of it (v* of a chunk of requests) is kept there under a key of
everything it depends on (the part's inputs, the base fingerprint, the active patches), and the
same edit computed again on the same model takes the kept parts instead of redoing them. The
seconds the kept parts cost when they were made are added up in `resumed_seconds`, so an edit
timed across an interruption reports its whole cost.

Each edit ends by handing the C heap's free memory back to the OS (`release_free_memory`): an
edit allocates and frees hundreds of MB of tensors, and glibc keeps the freed blocks mapped, in
pieces too scattered to reuse, so a process making edits one after another grew by ~25-60 MB per
AlphaEdit edit until a 1,000-edit stream was killed at 24 GB.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from editors.base import EditError, EditorSpec, EditRequest, get_editor, make_config
from patches import Patch, PatchStack

log = logging.getLogger(__name__)


def release_free_memory(collect: bool = False) -> bool:
    """Hand the C heap's free memory back to the OS (glibc `malloc_trim`), after a garbage
    collection if `collect`. Keeps a process that edits for months at the size of what is live;
    lets a meter see an edit's own peak rather than the high-water mark of earlier work. False
    where there is no glibc."""
    if collect:
        gc.collect()
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0) or True)
    except (OSError, AttributeError):
        return False


#: the most requests one patch may carry
MAX_REQUESTS = 10_000


@dataclass(frozen=True)
class EditJob:
    """A validated edit: the method, its parsed requests and its typed config."""

    spec: EditorSpec
    requests: tuple[EditRequest, ...]
    config: object  # the method's config dataclass

    @property
    def method(self) -> str:
        return self.spec.name


def prepare(method: str | EditJob, requests: Sequence[EditRequest | Mapping] = (),
            config: Mapping | object | None = None) -> EditJob:
    """Check an edit once: a known method, known settings, well-formed requests within the
    limit. Everything downstream takes the EditJob and checks nothing again."""
    if isinstance(method, EditJob):
        return method
    spec = get_editor(method)
    cfg = config if dataclasses.is_dataclass(config) and not isinstance(config, type) else make_config(spec, config)
    if not requests:
        raise EditError("no edit requests")
    if len(requests) > MAX_REQUESTS:
        raise EditError(f"{len(requests)} requests in one edit is over the limit of {MAX_REQUESTS}")
    parsed = tuple(r if isinstance(r, EditRequest) else EditRequest.from_dict(r) for r in requests)
    return EditJob(spec, parsed, cfg)


class EditContext:
    """One loaded model with its live patch stack and per-model caches (see the module doc)."""

    def __init__(self, model: torch.nn.Module, tokenizer, profile, stack: PatchStack | None = None):
        self.model, self.tokenizer, self.profile = model, tokenizer, profile
        if stack is not None and stack.model is not model:
            raise EditError("the patch stack belongs to another model object")
        self.stack = stack or PatchStack(model, base_model=profile.name, architecture=profile.architecture)
        self._pending_keys: dict[str, dict[str, torch.Tensor]] = {}
        self.parts: Path | None = None  # where a long edit keeps its finished parts (module doc); None: nowhere
        self.resumed_seconds = 0.0  # what the kept parts taken by the last compute() cost when made

    @classmethod
    def from_loaded(cls, lm, stack: PatchStack | None = None) -> "EditContext":
        """From an `edit_serve.models.LoadedModel`."""
        return cls(lm.model, lm.tokenizer, lm.profile, stack)

    # --- caches ---------------------------------------------------------------------------
    @property
    def cache(self) -> dict:
        """The per-model cache (held as long as the model object, shared with editors.stats)."""
        from editors.stats import model_memory

        return model_memory(self.model)

    @property
    def fingerprint(self) -> str:
        """The model fingerprint that keys the disk caches (unchanged by edit patches)."""
        from editors.stats import fingerprint_of

        return fingerprint_of(self.model, self.profile)

    def cached(self, key: tuple, make: Callable[[], object]):
        """`make()` once per model for `key`, then from memory."""
        cache = self.cache
        if key not in cache:
            cache[key] = make()
        return cache[key]

    def stats(self, layers: Sequence[int], cfg) -> dict[int, torch.Tensor]:
        """C = E[k k^T] for each layer's MLP output projection (editors.stats)."""
        from editors.stats import layer_stats

        return layer_stats(self.model, self.tokenizer, self.profile, layers, cfg)

    # --- the keys of the edits the model carries ------------------------------------------
    def remember_keys(self, module: str, keys: Mapping[str, torch.Tensor]) -> None:
        """Keys an editor computed for the requests of the patch being made (at `module`,
        e.g. {"prompt": (n, in), "templates": (n, in)}); kept under the patch id once stamped,
        so later edits on top of it need not recompute them."""
        self._pending_keys[module] = {k: v.detach().float().cpu() for k, v in keys.items()}

    def active_keys(self, module: str, recompute: Callable[[Sequence[EditRequest]], Mapping[str, torch.Tensor]]
                    ) -> dict[str, torch.Tensor] | None:
        """The keys at `module` of every active patch that changes `module.weight`,
        concatenated ({kind: (m, in)}), or None when none does. A patch whose keys were not
        kept (made elsewhere, or before a restart) has them recomputed from its requests once."""
        param = module + ".weight"
        entries = [e for e in self.stack.active if param in e.deltas and e.patch.requests]
        missing = [e for e in entries if ("edit-keys", e.patch.id, module) not in self.cache]
        if missing:
            log.info("recomputing the keys of %d active patches at %s (%d requests)", len(missing), module,
                     sum(len(e.patch.requests) for e in missing))
        for entry in missing:
            requests = [EditRequest.from_dict(r) for r in entry.patch.requests]
            self.cache[("edit-keys", entry.patch.id, module)] = {
                k: v.detach().float().cpu() for k, v in recompute(requests).items()}
        parts = [self.cache[("edit-keys", e.patch.id, module)] for e in entries]
        if not parts:
            return None
        return {kind: torch.cat([p[kind] for p in parts]) for kind in parts[0]}

    # --- resuming a long edit -------------------------------------------------------------
    def part(self, kind: str, key: Mapping, make: Callable[[], Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """`make()`, kept in `parts` under `kind` and `key` (JSON-able: what the part depends on
        besides the model) when that folder is set, and taken from there when it is kept
        already (module doc)."""
        if self.parts is None:
            return dict(make())
        ident = json.dumps({"kind": kind, "key": key, "base": self.fingerprint, "active": self.stack.ids},
                           sort_keys=True, default=str)
        path = Path(self.parts) / f"{kind}-{hashlib.sha256(ident.encode()).hexdigest()[:32]}.safetensors"
        try:
            with safe_open(str(path), framework="pt") as fh:
                seconds = float((fh.metadata() or {})["seconds"])
                kept = {k: fh.get_tensor(k) for k in fh.keys()}
        except FileNotFoundError:
            pass
        except (OSError, KeyError, ValueError, SafetensorError) as e:  # written by something else
            log.warning("kept part %s unreadable (%s): made again", path.name, e)
        else:
            self.resumed_seconds += seconds
            return kept
        started = time.perf_counter()
        made = {k: v.detach().contiguous().cpu() for k, v in make().items()}
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".tmp")
        save_file(made, str(partial), metadata={"seconds": repr(time.perf_counter() - started)})
        os.replace(partial, path)  # whole or absent
        return made

    # --- computing ------------------------------------------------------------------------
    def compute(self, method: str | EditJob, requests: Sequence[EditRequest | Mapping] = (),
                config: Mapping | object | None = None) -> Patch:
        """A patch for the job on the model as it runs now (with the active patches), carrying
        the requests, the config and the fingerprint of the BASE weights. The model is never
        changed."""
        job = prepare(method, requests, config)
        self._pending_keys = {}
        self.resumed_seconds = 0.0
        patch = job.spec.compute(self, list(job.requests), job.config)
        patch = patch.replace(requests=[r.to_dict() for r in job.requests], config=dataclasses.asdict(job.config),
                              method=job.method)
        patch = self.stack.stamp(patch)
        if self.resumed_seconds:
            log.info("%s: resumed from kept parts under %s (%.1f s of work when they were made)", job.method,
                     self.parts, self.resumed_seconds)
        for module, keys in self._pending_keys.items():
            self.cache[("edit-keys", patch.id, module)] = keys
        self._pending_keys = {}
        release_free_memory()
        return patch
