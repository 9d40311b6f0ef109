"""The patch store: a folder of patch files and an append-only log of what was applied.

    <root>/patches/<id>.safetensors   every patch ever accepted (written atomically)
    <root>/log.jsonl                  {"op": "apply"|"revert", "id", "at", "version"} per line;
                                      {"op": "compact", "id", "replaces": [ids], ...}: the patch
                                      `id` takes the place of the patches `replaces`, in one record
    <root>/keys/<id>.safetensors      the keys of a patch's requests (editors.context), a cache
    <root>/parts/                     the finished parts of an unfinished long edit (edit_worker)

The log is the truth about what is active: replaying it in order gives the active list, which
a restarted server (or a new replica) applies before it takes traffic. Appends are fsync'ed
and serialized across processes with a file lock; a torn last line (a crash mid-append) is
ignored with a warning, damage anywhere else is an error that names the line.

A change is logged in two steps (`PatchStore.appending`): the log is opened and locked
first, so a store that cannot be written refuses the change before the model is touched;
the record is written once the engine has made the change.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from patches import Patch, PatchError, load, patchset_version, patchset_with, save_bytes, to_bytes

log = logging.getLogger(__name__)


class StoreError(RuntimeError):
    """The patch store is unreadable, unwritable or inconsistent. One-line message."""


OPS = ("apply", "revert", "compact")
MAX_ID_CHARS = 64  # ids are 24 hex digits; anything much longer is not an id
TEMP_GRACE_S = 60.0  # a temporary file untouched this long belongs to a writer that died


@dataclass(frozen=True)
class LogRecord:
    op: str
    id: str
    at: float
    version: str
    replaces: tuple[str, ...] = ()  # compact: the patches `id` takes the place of

    def to_json(self) -> str:
        extra = {"replaces": list(self.replaces)} if self.op == "compact" else {}
        return json.dumps({"op": self.op, "id": self.id, "at": self.at, "version": self.version, **extra})

    def replay(self, active: list[str]) -> None:
        """Apply this record to `active` (the ids in apply order), in place."""
        if self.op == "apply" and self.id not in active:
            active.append(self.id)
        elif self.op == "revert" and self.id in active:
            active.remove(self.id)
        elif self.op == "compact" and self.id not in active:
            active[:] = patchset_with(active, self.id, self.replaces)


class PatchStore:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.files = self.root / "patches"
        self.log_path = self.root / "log.jsonl"
        try:
            self.files.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create the patch store {self.root}: {e.strerror}") from None
        self._view = _LogView()  # the log as last read (see `_read`)
        self._view_lock = threading.Lock()

    @contextlib.contextmanager
    def _locked(self):
        try:
            fh = open(self.root / ".lock", "a")
        except OSError as e:
            raise StoreError(f"the patch store {self.root} is not writable ({e.strerror}); "
                             "nothing was changed") from None
        with fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    # --- files ----------------------------------------------------------------------------
    def path(self, patch_id: str) -> Path:
        if not _is_id(patch_id):
            shown = patch_id if not isinstance(patch_id, str) or len(patch_id) <= 40 else patch_id[:40] + "..."
            raise PatchError(f"{shown!r} is not a patch id (1-{MAX_ID_CHARS} hex digits)")
        return self.files / f"{patch_id}.safetensors"

    def put(self, patch: Patch, data: bytes | None = None) -> Path:
        """Store the file: the uploaded bytes verbatim when given, so a download returns
        exactly what the operator sent last under this id (files of older ids may differ in
        `created_at` or `eval`, and the same content may be framed differently)."""
        path = self.path(patch.id)
        data = data if data is not None else to_bytes(patch)
        try:
            if not path.exists() or path.stat().st_size != len(data) or path.read_bytes() != data:
                save_bytes(data, path)
                _fsync_dir(self.files)
        except OSError as e:
            raise StoreError(f"the patch store {self.root} is not writable ({e.strerror}: cannot store "
                             f"{path.name}); nothing was changed") from None
        return path

    def sweep_temp(self, grace_s: float = TEMP_GRACE_S) -> int:
        """Delete temporary files that interrupted writes left behind (untouched for
        `grace_s` seconds, so a write in progress elsewhere is left alone)."""
        now, swept = time.time(), 0
        for tmp in self.files.glob("*.tmp"):
            try:
                if now - tmp.stat().st_mtime > grace_s:
                    tmp.unlink()
                    swept += 1
            except OSError:
                continue
        if swept:
            log.info("removed %d temporary files left by interrupted writes in %s", swept, self.files)
        return swept

    def has(self, patch_id: str) -> bool:
        return self.path(patch_id).is_file()

    def get(self, patch_id: str) -> Patch:
        path = self.path(patch_id)
        if not path.is_file():
            raise KeyError(patch_id)
        return load(path)

    def ids(self) -> list[str]:
        return sorted(p.stem for p in self.files.glob("*.safetensors"))

    # --- log ------------------------------------------------------------------------------
    def records(self) -> list[LogRecord]:
        return list(self._read().records)

    def _read(self) -> "_LogView":
        """The log as it is now. Lines already parsed are not parsed again: the log only
        grows, so when the file still starts with the bytes parsed last time only the lines
        after them are new (anything else, a rewritten or shortened file, is parsed anew)."""
        try:
            data = self.log_path.read_bytes()
        except FileNotFoundError:
            data = b""
        except OSError as e:
            raise StoreError(f"cannot read the patch log {self.log_path}: {e.strerror}") from None
        with self._view_lock:
            view = self._view
            if not data.startswith(view.parsed):
                view = _LogView()
            end = data.rfind(b"\n") + 1  # complete lines end here; a torn last line may follow
            if end > len(view.parsed):
                view = view.extended(data[len(view.parsed):end], self.log_path)
            self._view = view
        tail = data[end:]
        if not tail.strip():
            return view
        record = _parse_record(tail)
        if record is None:  # a torn final line (no newline): the append never completed
            log.warning("ignoring an incomplete last line in %s", self.log_path)
            return view
        return view.extended(tail, self.log_path)  # a last record without its newline still counts

    def active_ids(self) -> list[str]:
        """Replay the log: the active patches in the order they were applied."""
        return list(self._read().active)

    def check(self) -> list[str]:
        """The active ids, after checking that the log parses and names only files the store
        holds (before a server loads its model). Raises StoreError naming the fix."""
        ids = self.active_ids()
        missing = [i for i in ids if not self.has(i)]
        if missing:
            raise StoreError(f"the patch log {self.log_path} names {len(missing)} active patches whose files are "
                             f"missing from {self.files} (first: {missing[0]}); put the files back, or start "
                             "with another --patch-store")
        return ids

    def applied_at(self) -> dict[str, float]:
        """When each active patch was (last) applied."""
        view = self._read()
        return {i: view.applied[i] for i in view.active}

    def append(self, op: str, patch_id: str, replaces: Sequence[str] = ()) -> LogRecord:
        """Record an apply, revert or compaction durably. Returns the record (with the new version)."""
        with self.appending(op, patch_id, replaces) as commit:
            return commit()

    @contextlib.contextmanager
    def appending(self, op: str, patch_id: str, replaces: Sequence[str] = ()) -> Iterator[Callable[[], LogRecord]]:
        """Open and lock the log for one record; yields `commit`, which writes and fsyncs it.
        A compaction is one record, so a crash leaves the old patch set or the new one.

        Everything that can fail before a change (a read-only or missing store, a damaged
        log) fails on entry, before the caller touches the model; the lock is held until the
        block ends, so no other writer comes between the change and its record."""
        if op not in OPS:
            raise ValueError(op)
        with self._locked():
            active = self.active_ids()
            pending = LogRecord(op, patch_id, 0.0, "", tuple(replaces))
            pending.replay(active)
            self._drop_torn_tail()
            try:
                fh = open(self.log_path, "a")
            except OSError as e:
                raise StoreError(f"the patch log {self.log_path} is not writable ({e.strerror}); "
                                 "nothing was changed") from None
            with fh:
                def commit() -> LogRecord:
                    record = LogRecord(op, patch_id, time.time(), patchset_version(active), tuple(replaces))
                    try:
                        fh.write(record.to_json() + "\n")
                        fh.flush()
                        os.fsync(fh.fileno())
                    except OSError as e:
                        raise StoreError(f"cannot write the patch log {self.log_path} ({e.strerror})") from None
                    return record

                yield commit

    def _drop_torn_tail(self) -> None:
        """Cut a partial last line (left by a crash mid-append) before appending after it."""
        try:
            with open(self.log_path, "r+b") as fh:
                size = fh.seek(0, os.SEEK_END)
                if size == 0 or (fh.seek(size - 1), fh.read(1))[1] == b"\n":
                    return
                fh.seek(0)
                data = fh.read()
                fh.truncate(data.rfind(b"\n") + 1)
        except FileNotFoundError:
            return
        except OSError as e:
            raise StoreError(f"the patch log {self.log_path} is not writable ({e.strerror}); "
                             "nothing was changed") from None


@dataclass(frozen=True)
class _LogView:
    """The complete lines of the log parsed so far (`parsed`, their bytes), their records,
    and what replaying them gives: the active ids in order and when each was last applied.
    Immutable: `extended` returns a new view, so a reader never sees one half-updated."""

    parsed: bytes = b""
    lines: int = 0
    records: tuple[LogRecord, ...] = ()
    active: tuple[str, ...] = ()
    applied: Mapping[str, float] = field(default_factory=dict)

    def extended(self, data: bytes, path: Path) -> "_LogView":
        """This view followed by the lines of `data` (whole lines; a damaged one raises
        StoreError naming its line number in the file)."""
        records, active, applied, lines = list(self.records), list(self.active), dict(self.applied), self.lines
        for line in data.split(b"\n")[:-1] if data.endswith(b"\n") else data.split(b"\n"):
            lines += 1
            if not line.strip():
                continue
            record = _parse_record(line)
            if record is None:
                raise StoreError(f"{path} line {lines} is damaged (not an apply, revert or compact record "
                                 "of patch ids); fix or remove that line")
            records.append(record)
            record.replay(active)
            if record.op in ("apply", "compact"):
                applied[record.id] = record.at
        return _LogView(self.parsed + data, lines, tuple(records), tuple(active), applied)


def _parse_record(line: bytes) -> LogRecord | None:
    """One log line as a record, or None if it is not a well-formed one."""
    try:
        raw = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(raw, dict):
        return None
    op, patch_id, at, version = raw.get("op"), raw.get("id"), raw.get("at"), raw.get("version", "")
    replaces = raw.get("replaces", []) if op == "compact" else []
    if (op not in OPS or not _is_id(patch_id) or not isinstance(replaces, list) or not all(map(_is_id, replaces))
            or not isinstance(at, (int, float)) or isinstance(at, bool) or not isinstance(version, str)):
        return None
    return LogRecord(op, patch_id, float(at), version, tuple(replaces))


def _is_id(value) -> bool:
    return isinstance(value, str) and 0 < len(value) <= MAX_ID_CHARS and all(c in "0123456789abcdef" for c in value)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
