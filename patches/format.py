"""Patch format 1: a safetensors file holding weight deltas or side modules plus metadata.

Metadata keys (all strings, prefixed `edit_serve.`): format, kind, method, base_model,
base_fingerprint, requests (JSON), config (JSON), created_at, id, and optionally eval (JSON),
architecture and side_modules (JSON: name -> {type, attach, config}).

Tensors, per target parameter P (a name as in `model.named_parameters()`):
  delta.P.B [out, r] and delta.P.A [r, in]     low rank, delta W = B @ A   (ROME, MEMIT, LoRA)
  delta.P.full [same shape as P]               dense                       (FT)
  delta.P.rows [k, in] and delta.P.index [k]   rows `index` of W change    (KN, on (d_ff, d) weights)
  delta.P.cols [out, k] and delta.P.index [k]  columns `index` of W change (KN, on nn.Linear W_out)
Side modules: side.<name>.<tensor>. Edit memory (SERAC, kind "memory"): memory.keys and
memory.relation_keys, the texts in metadata memory (patches.memory). Each kind's rules are its
strategy's (patches.kinds: delta and side_module in patches.builtin, memory in patches.memory).

`load` validates everything that can be checked without a model (structure, names, shapes,
dtypes, finite values, size limits, id); `PatchStack.check` validates against a model.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from patches.errors import PatchError
from patches.kinds import patch_kind

FORMAT_VERSION = "1"
PREFIX = "edit_serve."
REQUIRED_METADATA = ("format", "kind", "method", "base_model", "base_fingerprint",
                     "requests", "config", "created_at", "id")
JSON_METADATA = ("requests", "config", "eval", "side_modules", "memory")
VALUE_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
INDEX_DTYPES = {torch.int64: "I64", torch.int32: "I32"}
DELTA_PARTS = {"A", "B", "full", "rows", "cols", "index"}
DELTA_FORMS = {
    frozenset({"A", "B"}): "low_rank",
    frozenset({"full"}): "dense",
    frozenset({"rows", "index"}): "rows",
    frozenset({"cols", "index"}): "cols",
}
MAX_HEADER_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_BYTES = 16 * 1024**3

Kind = Literal["delta", "side_module", "memory"]


@dataclass(frozen=True, eq=False)
class Delta:
    """The change one patch makes to one parameter."""

    param: str
    form: Literal["low_rank", "dense", "rows", "cols"]
    tensors: Mapping[str, torch.Tensor]

    def add_to(self, w: torch.Tensor) -> None:
        """Add this delta to `w` (float32, the parameter's shape) in place."""
        t = {k: v.to(device=w.device) for k, v in self.tensors.items()}
        if self.form == "low_rank":
            w.addmm_(t["B"].float(), t["A"].float())  # (out, r) @ (r, in)
        elif self.form == "dense":
            w.add_(t["full"].float())
        elif self.form == "rows":
            w.index_add_(0, t["index"].long(), t["rows"].float())
        else:
            w.index_add_(1, t["index"].long(), t["cols"].float())

    def expected_shapes(self) -> str:
        return {"low_rank": "B [out, r] @ A [r, in]", "dense": "full [shape of P]",
                "rows": "rows [k, in] + index [k]", "cols": "cols [out, k] + index [k]"}[self.form]

    def check_against(self, shape: torch.Size) -> None:
        """Raise PatchError unless this delta fits a parameter of `shape`."""
        t, p = self.tensors, self.param
        if self.form == "dense":
            ok = tuple(t["full"].shape) == tuple(shape)
            got = f"full {list(t['full'].shape)}"
        elif len(shape) != 2:
            ok, got = False, f"a {self.form} delta (needs a 2-D weight)"
        elif self.form == "low_rank":
            ok = t["B"].shape[0] == shape[0] and t["A"].shape[1] == shape[1]
            got = f"B {list(t['B'].shape)}, A {list(t['A'].shape)}"
        elif self.form == "rows":
            ok = t["rows"].shape[1] == shape[1] and int(t["index"].max()) < shape[0]
            got = f"rows {list(t['rows'].shape)}, index max {int(t['index'].max())}"
        else:
            ok = t["cols"].shape[0] == shape[0] and int(t["index"].max()) < shape[1]
            got = f"cols {list(t['cols'].shape)}, index max {int(t['index'].max())}"
        if not ok:
            raise PatchError(
                f"wrong shape for {p}: the model's parameter is {list(shape)}, the patch has {got} "
                "(a patch for another model or architecture?)"
            )

    @property
    def rank(self) -> int | None:
        return int(self.tensors["A"].shape[0]) if self.form == "low_rank" else None


def factors_cost_more(rank: int, out: int, inn: int) -> bool:
    """Whether factors (out, rank) @ (rank, inn) hold at least as many numbers as the (out, inn)
    matrix they make, r (out + in) >= out in: then storing, adding or running them as that one
    matrix costs no more (a low-rank form pays only below it)."""
    return rank * (out + inn) >= out * inn


def add_all(deltas: Sequence[Delta], w: torch.Tensor) -> None:
    """Add `deltas` to `w` (float32) in place, in order. A run of consecutive low-rank deltas
    is added as one product of their concatenated factors, (out, R) @ (R, in): with a thousand
    rank-one patches on a parameter that is one matrix product instead of a thousand passes
    over the whole weight."""
    run: list[Delta] = []

    def flush() -> None:
        if run:
            w.addmm_(torch.cat([d.tensors["B"].to(w.device).float() for d in run], 1),
                     torch.cat([d.tensors["A"].to(w.device).float() for d in run], 0))
        run.clear()

    for delta in deltas:
        if delta.form == "low_rank":
            run.append(delta)
        else:
            flush()
            delta.add_to(w)
    flush()


@dataclass(frozen=True, eq=False)
class SideModuleSpec:
    name: str
    type: str
    attach: str
    config: dict
    tensors: Mapping[str, torch.Tensor]


@dataclass(frozen=True, eq=False)
class Patch:
    """An edit as data: metadata plus tensors. Immutable; `replace` makes modified copies."""

    kind: Kind
    method: str
    base_model: str
    base_fingerprint: str
    tensors: Mapping[str, torch.Tensor]
    requests: list = field(default_factory=list)
    config: dict = field(default_factory=dict)
    created_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    eval: dict | None = None
    architecture: str | None = None
    side_modules: dict = field(default_factory=dict)
    memory: dict = field(default_factory=dict)  # kind "memory": rows' texts and settings (patches.memory)

    # --- derived views -----------------------------------------------------------------
    @property
    def id(self) -> str:
        """Content hash over everything the file holds (metadata and tensors): one id, one
        content. Files written before the id covered `created_at` and `eval` keep the id
        they carry (see `from_bytes`)."""
        cached = self.__dict__.get("_id")
        if cached is None:
            cached = content_hash(self)
            object.__setattr__(self, "_id", cached)
        return cached

    @property
    def edit_key(self) -> str:
        """Hash of what the patch does (its id without `created_at` and `eval`): two patches
        with the same key make the same change, so only one of them may be active."""
        cached = self.__dict__.get("_edit_key")
        if cached is None:
            cached = content_hash(self, ignore=("created_at", "eval"))
            object.__setattr__(self, "_edit_key", cached)
        return cached

    def deltas(self) -> dict[str, Delta]:
        return parse_deltas(self.tensors)

    def side_module_specs(self) -> list[SideModuleSpec]:
        specs = []
        for name, entry in self.side_modules.items():
            prefix = f"side.{name}."
            tensors = {k[len(prefix):]: v for k, v in self.tensors.items() if k.startswith(prefix)}
            specs.append(SideModuleSpec(name, entry["type"], entry["attach"], dict(entry.get("config", {})), tensors))
        return specs

    @property
    def targets(self) -> list[str]:
        """Parameters (delta) or modules (side modules) this patch touches (none: an edit memory)."""
        return patch_kind(self.kind).targets(self)

    def replace(self, **changes) -> "Patch":
        return replace(self, **changes)

    def metadata(self) -> dict[str, str]:
        meta = {
            "format": FORMAT_VERSION, "kind": self.kind, "method": self.method,
            "base_model": self.base_model, "base_fingerprint": self.base_fingerprint,
            "requests": dump_json(self.requests, "requests"),
            "config": dump_json(self.config, "config"),
            "created_at": self.created_at,
        }
        if self.eval is not None:  # measured figures: one that could not be measured is null
            meta["eval"] = dump_json(_finite_or_null(self.eval), "eval")
        if self.architecture:
            meta["architecture"] = self.architecture
        if self.side_modules:
            meta["side_modules"] = dump_json(self.side_modules, "side_modules")
        if self.memory:
            meta["memory"] = dump_json(self.memory, "memory")
        return meta

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def summary(self) -> dict:
        """What `inspect` shows: metadata and one line per target."""
        out = {"id": self.id, "kind": self.kind, "method": self.method,
               "base_model": self.base_model, "architecture": self.architecture,
               "base_fingerprint": self.base_fingerprint, "created_at": self.created_at,
               "requests": self.requests, "config": self.config, "eval": self.eval,
               "tensor_bytes": self.nbytes()}
        out.update(patch_kind(self.kind).describe(self))
        return out


# --- strict JSON ---------------------------------------------------------------------------

MAX_JSON_DEPTH = 64
SIDE_MODULE_NAME = re.compile(r"[A-Za-z0-9_-]{1,128}")


def _finite_or_null(value):
    """`value` with every non-finite float replaced by None (for measured figures)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(v) for v in value]
    return value


def dump_json(value, what: str) -> str:
    """Metadata JSON as the file will hold it: strict (no NaN or Infinity), sorted keys."""
    try:
        return json.dumps(value, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise PatchError(f"metadata {what} cannot be written as strict JSON: {e}") from None


def _depth(value, limit: int) -> int:
    """Nesting depth of parsed JSON, stopping past `limit` (iterative: no recursion)."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        item, depth = todo.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            if deepest > limit:
                return deepest
            todo.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


def load_json(text: str | bytes, what: str, max_depth: int = MAX_JSON_DEPTH):
    """Parse strict JSON (RFC 8259: no NaN, no Infinity, no number that overflows a double).
    Every failure is a one-line PatchError naming `what`."""

    def constant(name: str):
        raise PatchError(f"{what} holds {name}, which is not JSON (write null for a missing figure)")

    def number(literal: str) -> float:
        value = float(literal)
        if not math.isfinite(value):
            raise PatchError(f"{what} holds the number {literal[:40]}, which overflows a double")
        return value

    try:
        value = json.loads(text, parse_constant=constant, parse_float=number)
    except PatchError:
        raise
    except RecursionError:
        raise PatchError(f"{what} is nested too deeply (at most {max_depth} levels)") from None
    except (ValueError, TypeError):  # JSONDecodeError, bad UTF-8, an integer too long to convert
        raise PatchError(f"{what} is not valid JSON") from None
    if _depth(value, max_depth) > max_depth:
        raise PatchError(f"{what} is nested too deeply (at most {max_depth} levels)")
    return value


# --- hashing -------------------------------------------------------------------------------


def content_hash(patch: Patch, ignore: tuple[str, ...] = ()) -> str:
    """sha256 over the metadata (less the keys in `ignore`) and every tensor's name, dtype,
    shape and bytes."""
    h = hashlib.sha256()
    ident = {k: v for k, v in patch.metadata().items() if k not in ignore}
    h.update(json.dumps(ident, sort_keys=True).encode())
    for name in sorted(patch.tensors):
        t = patch.tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # 0-d too
    return h.hexdigest()[:24]


# --- structure ------------------------------------------------------------------------------


def parse_deltas(tensors: Mapping[str, torch.Tensor]) -> dict[str, Delta]:
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        if not name.startswith("delta."):
            continue
        param, _, part = name[len("delta."):].rpartition(".")
        groups.setdefault(param, {})[part] = t
    deltas = {}
    for param, parts in groups.items():
        form = DELTA_FORMS.get(frozenset(parts))
        if form is None:
            raise PatchError(
                f"incomplete or mixed delta for {param}: has {sorted(parts)}; expected one of "
                "{A, B} (low rank), {full}, {rows, index} or {cols, index}"
            )
        deltas[param] = Delta(param, form, parts)
    return deltas


def check_tensor_name(name: str, side_names: set[str]) -> None:
    if name.startswith("delta."):
        param, _, part = name[len("delta."):].rpartition(".")
        if param and part in DELTA_PARTS:
            return
    elif name.startswith("side."):
        module, _, tensor = name[len("side."):].partition(".")
        if module in side_names and tensor:
            return
        if tensor and module not in side_names:
            raise PatchError(f"tensor {name!r} belongs to side module {module!r}, which the metadata does not declare")
    raise PatchError(
        f"unknown tensor name {name!r}: expected delta.<param>.{{A,B,full,rows,cols,index}} "
        "or side.<module>.<tensor>"
    )


def check_delta_shapes(d: Delta) -> None:
    t = d.tensors
    bad = None
    if d.form == "low_rank":
        b, a = t["B"], t["A"]
        if b.dim() != 2 or a.dim() != 2 or b.shape[1] != a.shape[0] or a.shape[0] < 1:
            bad = f"B {list(b.shape)} and A {list(a.shape)} (need B [out, r], A [r, in], r >= 1)"
    elif d.form in ("rows", "cols"):
        v, i = t[d.form], t["index"]
        k = (v.shape[0] if d.form == "rows" else v.shape[1]) if v.dim() == 2 else -1
        if v.dim() != 2 or i.dim() != 1 or i.shape[0] != k or k < 1:
            bad = f"{d.form} {list(v.shape)} and index {list(i.shape)} (need {d.expected_shapes()})"
        elif int(i.min()) < 0 or len(set(i.tolist())) != i.shape[0]:
            bad = "an index with negative or repeated entries"
    elif t["full"].dim() < 1:
        bad = "a 0-d full tensor"
    if bad:
        raise PatchError(f"malformed delta for {d.param}: {bad}")


def _check_side_modules(patch: Patch) -> None:
    """The side_modules metadata: a JSON object of name -> {type, attach, config}."""
    if not isinstance(patch.side_modules, dict):
        raise PatchError("metadata side_modules must be a JSON object of name -> {type, attach, config}")
    for name, entry in patch.side_modules.items():
        if not SIDE_MODULE_NAME.fullmatch(name):
            raise PatchError(f"side module name {name!r} must be 1-128 letters, digits, '_' or '-'")
        if not isinstance(entry, dict) or not {"type", "attach"} <= set(entry):
            raise PatchError(f"side module {name!r} needs 'type' and 'attach' in its metadata")
        if not isinstance(entry["type"], str) or not isinstance(entry["attach"], str) or not entry["attach"]:
            raise PatchError(f"side module {name!r}: 'type' and 'attach' must be non-empty strings")
        if not isinstance(entry.get("config", {}), dict):
            raise PatchError(f"side module {name!r}: 'config' must be a JSON object")


def _check_metadata_types(patch: Patch) -> None:
    """Types of the metadata fields, as a parsed file or a caller may have set them."""
    patch_kind(patch.kind)  # a known kind
    for name in ("method", "base_model", "base_fingerprint", "created_at"):
        if not isinstance(getattr(patch, name), str):
            raise PatchError(f"metadata {name} must be a string")
    if not patch.method:
        raise PatchError("the patch names no method")
    if patch.architecture is not None and not isinstance(patch.architecture, str):
        raise PatchError("metadata architecture must be a string")
    if not isinstance(patch.requests, list):
        raise PatchError("metadata requests must be a JSON list")
    if not isinstance(patch.config, dict):
        raise PatchError("metadata config must be a JSON object")
    if patch.eval is not None and not isinstance(patch.eval, dict):
        raise PatchError("metadata eval must be a JSON object or absent")
    _check_side_modules(patch)
    if not isinstance(patch.memory, dict):
        raise PatchError("metadata memory must be a JSON object")


def validate(patch: Patch) -> None:
    """Check everything that does not need a model. Raises PatchError. A patch is immutable,
    so a passed check is remembered on it (like its id): a patch parsed and validated at the
    door is not validated again by the engine, inside a generation pause."""
    if patch.__dict__.get("_valid"):
        return
    _check_metadata_types(patch)
    if not patch.tensors:
        raise PatchError("the patch holds no tensors")
    patch_kind(patch.kind).validate(patch)
    object.__setattr__(patch, "_valid", True)


# --- files ----------------------------------------------------------------------------------


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_header(data: bytes, max_bytes: int) -> dict:
    """Check the safetensors framing by hand, so each kind of damage gets its own message."""
    size = len(data)
    if size == 0:
        raise PatchError("empty file: not a patch")
    if size > max_bytes:
        raise PatchError(f"patch is {size} bytes, over the limit of {max_bytes} bytes")
    if size < 8:
        raise PatchError(f"not a safetensors file: {size} bytes is shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", data[:8])
    if n > size - 8:
        raise PatchError(
            f"header length {n} is larger than the file ({size} bytes): truncated, or not a safetensors file"
        )
    if n > MAX_HEADER_BYTES:
        raise PatchError(f"header of {n} bytes is over the limit of {MAX_HEADER_BYTES}")
    try:
        header = load_json(data[8:8 + n], "the header")
    except PatchError as e:
        raise PatchError(f"not a safetensors file: {e}") from None
    if not isinstance(header, dict):
        raise PatchError("not a safetensors file: the header is not a JSON object")
    body = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise PatchError("not a safetensors file: __metadata__ must be an object of strings")
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_int, offsets))):
            raise PatchError(f"not a safetensors file: entry {name!r} has no data_offsets [begin, end]")
        begin, end = offsets
        if not 0 <= begin <= end:
            raise PatchError(f"not a safetensors file: entry {name!r} has data_offsets {offsets}")
        if end > body:
            raise PatchError(
                f"truncated file: tensor {name!r} ends at byte {end} of the data, which has {body} bytes"
            )
    return header


def from_bytes(data: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> Patch:
    """Parse and validate a patch file's bytes. Raises PatchError with a one-line reason."""
    header = _parse_header(data, max_bytes)
    raw_meta = header.get("__metadata__") or {}
    meta = {k[len(PREFIX):]: v for k, v in raw_meta.items() if k.startswith(PREFIX)}
    missing = [k for k in REQUIRED_METADATA if k not in meta]
    if missing:
        raise PatchError(
            f"missing metadata {', '.join(PREFIX + k for k in missing)}: not an edit_serve patch "
            "(make patches with `edit_serve edit` or patches.save)"
        )
    if meta["format"] != FORMAT_VERSION:
        raise PatchError(f"patch format {meta['format']!r} is not supported; this server reads format {FORMAT_VERSION}")
    parsed = {key: load_json(meta[key], f"metadata {PREFIX}{key}") for key in JSON_METADATA if key in meta}
    try:
        tensors = st_load(data)
    except Exception as e:  # noqa: BLE001 - the Rust parser's errors, whatever their type
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise PatchError(f"not a valid safetensors file: {reason}") from None
    patch = Patch(
        kind=meta["kind"], method=meta["method"], base_model=meta["base_model"],
        base_fingerprint=meta["base_fingerprint"], tensors=tensors,
        requests=parsed.get("requests", []), config=parsed.get("config", {}),
        created_at=meta["created_at"], eval=parsed.get("eval"),
        architecture=meta.get("architecture"), side_modules=parsed.get("side_modules", {}),
        memory=parsed.get("memory", {}),
    )
    validate(patch)
    if patch.id != meta["id"]:
        if patch.edit_key != meta["id"]:
            raise PatchError(
                f"patch id {meta['id']} does not match its content ({patch.id}): the file was altered after it was made"
            )
        object.__setattr__(patch, "_id", meta["id"])  # written before ids covered created_at and eval
    return patch


def to_bytes(patch: Patch) -> bytes:
    validate(patch)
    meta = {PREFIX + k: v for k, v in patch.metadata().items()}
    meta[PREFIX + "id"] = patch.id
    return st_save({k: v.detach().contiguous().cpu() for k, v in patch.tensors.items()}, metadata=meta)


def save(patch: Patch, path: str | os.PathLike) -> Path:
    """Write atomically (temporary file, fsync, rename). Returns the path."""
    return save_bytes(to_bytes(patch), path)


def save_bytes(data: bytes, path: str | os.PathLike) -> Path:
    """Write a patch file's bytes as they are (a download, an upload kept verbatim) atomically:
    temporary file, fsync, rename; a failure leaves no temporary file. Returns the path."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())

    return replace_atomically(path, write)


def replace_atomically(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Make `path` whole or not at all: `write(tmp)` fills a temporary file of this writer's own in
    the same folder, which then replaces `path` (a rename); a failure leaves no temporary file.
    Two writers of one path never share a temporary file. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load(path: str | os.PathLike, max_bytes: int = DEFAULT_MAX_BYTES) -> Patch:
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise PatchError(f"no such patch file: {path}") from None
    except OSError as e:
        raise PatchError(f"cannot read {path}: {e.strerror}") from None
    if size > max_bytes:
        raise PatchError(f"patch is {size} bytes, over the limit of {max_bytes} bytes")
    return from_bytes(path.read_bytes(), max_bytes)


def inspect(path: str | os.PathLike) -> dict:
    return load(path).summary()
