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

Likewise the keys of the edits the model carries (what alphaedit and the protect options spare)
outlive the process when `keys` is set to a folder: one safetensors file per patch id, written
when the patch is made or its keys are recomputed. Without it a restarted server, or a resumed
stream of a thousand edits, recomputes the keys of every active patch before its first edit
(~6 minutes at 930 patches on SmolLM2). A missing or unreadable file only means recomputing.

Each edit ends by handing the C heap's free memory back to the OS (`release_free_memory`): an
edit allocates and frees hundreds of MB of tensors, and glibc keeps the freed blocks mapped, in
pieces too scattered to reuse, so a process making edits one after another grew by ~25-60 MB per
AlphaEdit edit until a 1,000-edit stream was killed at 24 GB.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from editors.base import EditCancelled, EditError, EditorSpec, EditRequest, get_editor, list_editors, make_config
from editors.files import save_tensors
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
    check_rephrasings(spec, parsed)
    return EditJob(spec, parsed, cfg)


def check_rephrasings(spec: EditorSpec, requests: Sequence[EditRequest]) -> None:
    """Refuse rephrasings where the method edits from the prompt alone (EditorSpec.rephrasings)."""
    if not spec.rephrasings and any(r.rephrasings for r in requests):
        raise EditError(f"{spec.name} edits from the prompt alone and does not take rephrasings "
                        f"(methods that do: {', '.join(n for n in list_editors() if get_editor(n).rephrasings)})")


class EditContext:
    """One loaded model with its live patch stack and per-model caches (see the module doc)."""

    def __init__(self, model: torch.nn.Module, tokenizer, profile, stack: PatchStack | None = None):
        self.model, self.tokenizer, self.profile = model, tokenizer, profile
        if stack is not None and stack.model is not model:
            raise EditError("the patch stack belongs to another model object")
        self.stack = stack or PatchStack(model, base_model=profile.name, architecture=profile.architecture)
        self._pending_keys: dict[str, dict[str, torch.Tensor]] = {}
        self.parts: Path | None = None  # where a long edit keeps its finished parts (module doc); None: nowhere
        self.keys: Path | None = None  # where the keys of the edits outlive the process (module doc); None: nowhere
        self.resumed_seconds = 0.0  # what the kept parts taken by the last compute() cost when made
        self.working_ahead = False  # statistics made before an edit needs them (EditWorker.warm), see stats()
        self._stop: threading.Event | None = None  # the stop of the `stoppable` block running now

    @classmethod
    def from_loaded(cls, lm, stack: PatchStack | None = None) -> "EditContext":
        """From an `edit_serve.models.LoadedModel`."""
        return cls(lm.model, lm.tokenizer, lm.profile, stack)

    @contextlib.contextmanager
    def stoppable(self, stop: threading.Event) -> Iterator[None]:
        """Within the block, once `stop` is set, the model's next forward pass raises
        EditCancelled, so an edit being computed (v*'s steps, statistics over a corpus, a
        training loop, the evaluation) ends within one pass. Every editor and the evaluation
        run the model through its top-level forward; the hook sits there, not on the blocks
        (nethook.BlocksBelow replays blocks only where they have no hooks). The context
        managers that editors run the model under remove their hooks on the way out, so the
        model is left as it was. A wait for statistics that another process is computing
        (editors.stats) ends as well."""
        def check(module, args):
            if stop.is_set():
                raise EditCancelled("the computation was cancelled")

        handle = self.model.register_forward_pre_hook(check)
        self._stop = stop  # for waits that run no forward pass (stats())
        try:
            if stop.is_set():
                raise EditCancelled("the computation was cancelled")
            yield
        finally:
            handle.remove()
            self._stop = None

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
        """C = E[k k^T] for each layer's MLP output projection (editors.stats). A wait for
        statistics another process is making ends with the `stoppable` block's stop; one that
        works ahead does not ask that process to let go (editors.files.made_once)."""
        from editors.stats import layer_stats

        return layer_stats(self.model, self.tokenizer, self.profile, layers, cfg, stop=self._stop,
                           announce=not self.working_ahead)

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
        kept (made elsewhere, or before a restart without a `keys` folder) has them recomputed
        from its requests once."""
        param = module + ".weight"
        entries = [e for e in self.stack.active if param in e.deltas and e.patch.requests]
        missing = [e for e in entries if not self._has_keys(e.patch.id, module)]
        if missing:
            log.info("recomputing the keys of %d active patches at %s (%d requests)", len(missing), module,
                     sum(len(e.patch.requests) for e in missing))
        for entry in missing:
            requests = [EditRequest.from_dict(r) for r in entry.patch.requests]
            keys = {k: v.detach().float().cpu() for k, v in recompute(requests).items()}
            self.cache[("edit-keys", entry.patch.id, module)] = keys
            self._keep_keys(entry.patch.id, {module: keys})
        parts = [self.cache[("edit-keys", e.patch.id, module)] for e in entries]
        if not parts:
            return None
        return {kind: torch.cat([p[kind] for p in parts]) for kind in parts[0]}

    def carry_keys(self, patch: Patch, sources: Sequence[Patch], drop: bool = False) -> None:
        """Give `patch`, which carries the requests of `sources` in their order (a compaction,
        or the same edit with its figures attached: another id), their keys, at each module
        where every source that carries requests has them, so the next edit need not recompute
        them. `drop`: the sources' keys are forgotten (they will not be active themselves)."""
        sources = [p for p in sources if p.requests]
        changed = {p.id: {name.removesuffix(".weight") for name in p.deltas()} for p in sources}
        modules = set.intersection(*changed.values()) if changed else set()
        carried = {}
        for module in sorted(m for m in modules if all(self._has_keys(p.id, m) for p in sources)):
            parts = [self.cache[("edit-keys", p.id, module)] for p in sources]
            carried[module] = {kind: torch.cat([k[kind] for k in parts]) for kind in parts[0]}
            self.cache[("edit-keys", patch.id, module)] = carried[module]
        self._keep_keys(patch.id, carried)
        if drop:
            for source_id in changed.keys() - {patch.id}:
                for module in changed[source_id]:
                    self.cache.pop(("edit-keys", source_id, module), None)
                if self.keys is not None:
                    (Path(self.keys) / f"{source_id}.safetensors").unlink(missing_ok=True)

    def _has_keys(self, patch_id: str, module: str) -> bool:
        """Whether the keys of `patch_id` at `module` are in memory, after taking whatever the
        `keys` folder holds for that patch."""
        key = ("edit-keys", patch_id, module)
        if key in self.cache or self.keys is None:
            return key in self.cache
        for kept_module, keys in _read_keys(Path(self.keys) / f"{patch_id}.safetensors").items():
            self.cache.setdefault(("edit-keys", patch_id, kept_module), keys)
        return key in self.cache

    def _keep_keys(self, patch_id: str, keys: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        """Add `keys` ({module: {kind: tensor}}) to the patch's file in the `keys` folder."""
        if self.keys is None or not keys:
            return
        path = Path(self.keys) / f"{patch_id}.safetensors"
        merged = {**_read_keys(path), **keys}
        save_tensors(path, {f"{module}/{kind}": t.contiguous() for module, by_kind in merged.items()
                            for kind, t in by_kind.items()})

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
        save_tensors(path, made, metadata={"seconds": repr(time.perf_counter() - started)})
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
        self._keep_keys(patch.id, self._pending_keys)
        self._pending_keys = {}
        release_free_memory()
        return patch


def _read_keys(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """{module: {kind: tensor}} kept in a patch's keys file; {} when there is none or it is
    unreadable (the keys are then recomputed)."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    try:
        with safe_open(str(path), framework="pt") as fh:
            for name in fh.keys():
                module, _, kind = name.rpartition("/")
                out.setdefault(module, {})[kind] = fh.get_tensor(name)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, SafetensorError) as e:  # cut short or written by something else
        log.warning("kept keys %s unreadable (%s): recomputed", path.name, e)
        return {}
    return out
