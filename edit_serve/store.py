"""The patch store: a folder of patch files and an append-only log of what was applied.

    <root>/patches/<id>.safetensors   every patch ever accepted (written atomically)
    <root>/log.jsonl                  {"op": "apply"|"revert", "id", "at", "version"} per line

The log is the truth about what is active: replaying it in order gives the active list, which
a restarted server (or a new replica) applies before it takes traffic. Appends are fsync'ed
and serialized across processes with a file lock; a torn last line (a crash mid-append) is
ignored with a warning, damage anywhere else is an error.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from patches import Patch, PatchError, load, patchset_version, save

log = logging.getLogger(__name__)


class StoreError(RuntimeError):
    """The patch store is unreadable or inconsistent."""


@dataclass(frozen=True)
class LogRecord:
    op: str
    id: str
    at: float
    version: str

    def to_json(self) -> str:
        return json.dumps({"op": self.op, "id": self.id, "at": self.at, "version": self.version})


class PatchStore:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.files = self.root / "patches"
        self.log_path = self.root / "log.jsonl"
        self.files.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def _locked(self):
        with open(self.root / ".lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    # --- files ----------------------------------------------------------------------------
    def path(self, patch_id: str) -> Path:
        if not patch_id or not all(c in "0123456789abcdef" for c in patch_id):
            raise PatchError(f"{patch_id!r} is not a patch id (hex digits)")
        return self.files / f"{patch_id}.safetensors"

    def put(self, patch: Patch, data: bytes | None = None) -> Path:
        """Store the file once (ids are content hashes): the uploaded bytes verbatim when
        given, so a download returns exactly what the operator sent."""
        path = self.path(patch.id)
        if not path.exists():
            if data is None:
                save(patch, path)
            else:
                _write_atomic(path, data)
            _fsync_dir(self.files)
        return path

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
        if not self.log_path.exists():
            return []
        lines = self.log_path.read_text().split("\n")
        out = []
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
                out.append(LogRecord(raw["op"], raw["id"], float(raw["at"]), raw.get("version", "")))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                if n == len(lines):  # a torn final line: the append never completed
                    log.warning("ignoring an incomplete last line in %s", self.log_path)
                    continue
                raise StoreError(f"{self.log_path} line {n} is damaged; fix or remove that line") from None
        return out

    def active_ids(self) -> list[str]:
        """Replay the log: the active patches in the order they were applied."""
        active: list[str] = []
        for record in self.records():
            if record.op == "apply" and record.id not in active:
                active.append(record.id)
            elif record.op == "revert" and record.id in active:
                active.remove(record.id)
        return active

    def applied_at(self) -> dict[str, float]:
        """When each active patch was (last) applied."""
        when: dict[str, float] = {}
        for record in self.records():
            if record.op == "apply":
                when[record.id] = record.at
        return {i: when[i] for i in self.active_ids()}

    def append(self, op: str, patch_id: str) -> LogRecord:
        """Record an apply or revert durably. Returns the record (with the new version)."""
        if op not in ("apply", "revert"):
            raise ValueError(op)
        with self._locked():
            active = self.active_ids()
            if op == "apply":
                active.append(patch_id)
            else:
                active.remove(patch_id)
            record = LogRecord(op, patch_id, time.time(), patchset_version(active))
            self._drop_torn_tail()
            with open(self.log_path, "a") as fh:
                fh.write(record.to_json() + "\n")
                fh.flush()
                os.fsync(fh.fileno())
        return record

    def _drop_torn_tail(self) -> None:
        """Cut a partial last line (left by a crash mid-append) before appending after it."""
        if not self.log_path.exists():
            return
        data = self.log_path.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(self.log_path, "r+b") as fh:
                fh.truncate(data.rfind(b"\n") + 1)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
