"""Resuming a long evaluation: every finished patch is recorded in a folder as it goes (its
records' scores outside sequential mode; the patch file itself in sequential mode, where the
later patches are computed on top of it). A rerun with the same folder and the same settings
skips what is recorded (re-applying the sequential patches in order), as far as its groups of
records match the recorded ones in order: a longer sequential stream over the same data
extends a shorter one. Other settings start the folder over. The patch being computed keeps its
finished parts under `parts` (editors.context: a batch of thousands resumes within its v*
search); they go once its group is recorded, and stay when other settings start the folder over
(a part is named by everything it depends on, so a setting that does not change it, such as a
new option at its default, does not throw away hours of v* search). A folder recorded before an
option existed does not start over at all where the option is at its default (`defaults`: the
options of each section of the identity, the editor's config and the evaluation settings, with
their defaults). In sequential mode the keys of the recorded patches (what alphaedit spares)
are kept under `keys`, so a resumed stream does not recompute them. The unedited model's
figures and locality references, measured before the first patch, are kept too, so that a
rerun does not measure thousands of records again. A patch of more records than are scored at
once outside sequential mode is kept as soon as it is made, with its records' scores as each
slice of them is scored (`begin`, `scored`, `pending`): a rerun after a kill in the middle of
scoring a batch of thousands applies the kept patch and scores only the records left."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from edit_serve.evaluation.measure import LocalityReference
from edit_serve.evaluation.report import write_json
from patches import Patch, load, save

log = logging.getLogger(__name__)


def _plain(value):
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _json_lines(path: Path) -> list:
    """The JSON lines of `path` up to the first one cut short by a kill, the file truncated
    there so that what is appended next starts on a line of its own ([] when there is none)."""
    if not path.is_file():
        return []
    out, good = [], 0
    text = path.read_text()
    for line in text.splitlines(keepends=True):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            path.write_text(text[:good])
            break
        good += len(line)
    else:
        if text and not text.endswith("\n"):  # cut just before its newline
            path.write_text(text + "\n")
    return out


def _same(recorded: dict, identity: dict, defaults: dict) -> bool:
    """Whether a folder's recorded identity is `identity`, an option the recorded one lacks in
    a section of `defaults` read as its default (added since, it changes nothing there)."""
    filled = dict(recorded)
    for section, options in defaults.items():
        if isinstance(recorded.get(section), dict):
            filled[section] = {**{k: v for k, v in options.items() if k not in recorded[section]}, **recorded[section]}
    return filled == identity


class Checkpoint:
    def __init__(self, folder: str | Path, identity: dict, defaults: dict[str, dict] | None = None):
        self.folder = Path(folder)
        self.parts = self.folder / "parts"  # the unfinished patch's finished parts
        self.keys = self.folder / "keys"  # the keys of the recorded patches (editors.context)
        self._groups = self.folder / "groups.jsonl"
        self._pending = self.folder / "pending.json"  # the patch being scored (begin)
        self._pending_patch = self.folder / "pending.safetensors"
        self._pending_scores = self.folder / "pending-scores.jsonl"
        meta = self.folder / "meta.json"
        identity = _plain(identity)
        if meta.is_file() and not _same(json.loads(meta.read_text()), identity, _plain(defaults or {})):
            log.warning("%s holds another evaluation's progress: starting over, with its kept parts", self.folder)
            # parts are named by all they depend on: another patch's are never taken
            for entry in self.folder.iterdir():
                if entry != self.parts:
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        self.folder.mkdir(parents=True, exist_ok=True)
        meta.write_text(json.dumps(identity, sort_keys=True, indent=1))

    def done(self, groups: list[list[str]]) -> dict[int, dict]:
        """{group index: {"patch": id, "config": ..., "seconds": [per record], "after": [...] or None,
        "host": the machine that timed it, or None, "peak_memory_bytes": its edit's peak, or None}}
        for the recorded prefix of `groups` (record ids per patch)."""
        out = {}
        for entry in _json_lines(self._groups):  # a group whose line a kill cut short is redone
            g = entry["group"]
            if g != len(out) or g >= len(groups) or entry.get("records") != groups[g]:
                break
            out[g] = entry
        if out:
            log.info("resuming from %s: %d patches done", self.folder, len(out))
        return out

    def unedited(self, records: list[str]) -> tuple[list[LocalityReference], list[dict]] | None:
        """(locality references, figures) of the unedited model on `records`, as kept by
        `keep_unedited`; None when none are kept for these records."""
        try:
            kept = json.loads(self._unedited.read_text())
        except (OSError, json.JSONDecodeError):  # none yet, or cut short by a kill
            return None
        if kept.get("records") != records:
            return None
        return [LocalityReference.from_dict(r) for r in kept["references"]], kept["before"]

    def keep_unedited(self, records: list[str], references: list[LocalityReference], before: list[dict]) -> None:
        partial = self._unedited.with_name(self._unedited.name + ".tmp")
        partial.write_text(json.dumps({"records": records, "references": [r.to_dict() for r in references],
                                       "before": before}))
        partial.replace(self._unedited)

    @property
    def _unedited(self) -> Path:
        return self.folder / "unedited.json"

    def patch(self, group: int) -> Patch:
        return load(self._patch_file(group))

    def add(self, group: int, records: list[str], patch: Patch, seconds: list[float], after: list[dict] | None,
            keep_patch: bool, host: str | None = None, peak: int | None = None) -> None:
        """Record a finished patch; `host`: the machine that timed it (a resumed run may be on
        another), `peak`: its edit's peak memory."""
        if keep_patch:
            save(patch, self._patch_file(group))
        with open(self._groups, "a") as fh:
            fh.write(json.dumps({**self._entry(group, records, patch, seconds, host, peak), "after": after}) + "\n")
        shutil.rmtree(self.parts, ignore_errors=True)
        for path in (self._pending, self._pending_scores, self._pending_patch):
            path.unlink(missing_ok=True)

    def begin(self, group: int, records: list[str], patch: Patch, seconds: list[float], host: str | None = None,
              peak: int | None = None) -> None:
        """Keep a patch whose records are about to be scored slice by slice (`scored`), so that
        a rerun resumes the scoring (`pending`) instead of computing the patch again."""
        self._pending.unlink(missing_ok=True)  # first: a kill below leaves no entry naming a half-written file
        self._pending_scores.unlink(missing_ok=True)
        save(patch, self._pending_patch)
        write_json(self._entry(group, records, patch, seconds, host, peak), self._pending)  # whole or absent
        shutil.rmtree(self.parts, ignore_errors=True)  # the patch is kept: its parts are not needed again

    def scored(self, after: list[dict]) -> None:
        """Record the scores of the next slice of the pending patch's records."""
        with open(self._pending_scores, "a") as fh:
            fh.write(json.dumps(after) + "\n")

    def pending(self, group: int, records: list[str]) -> tuple[Patch, dict, list[dict]] | None:
        """(patch, its entry, the scores recorded so far, in record order) of the patch `begin`
        kept for this group and these records; None when there is none."""
        try:
            entry = json.loads(self._pending.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        if entry["group"] != group or entry["records"] != records:
            return None
        after = [row for line in _json_lines(self._pending_scores) for row in line]  # a slice cut short is scored again
        log.info("resuming patch %s: %d of its %d records scored", entry["patch"], len(after), len(records))
        return load(self._pending_patch), entry, after

    @staticmethod
    def _entry(group: int, records: list[str], patch: Patch, seconds: list[float], host: str | None,
               peak: int | None) -> dict:
        return {"group": group, "records": records, "patch": patch.id, "config": patch.config, "seconds": seconds,
                "host": host, "peak_memory_bytes": peak}

    def _patch_file(self, group: int) -> Path:
        return self.folder / f"patch-{group:05d}.safetensors"
