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
rerun does not measure thousands of records again."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from edit_serve.evaluation.measure import LocalityReference
from patches import Patch, load, save

log = logging.getLogger(__name__)


def _plain(value):
    return json.loads(json.dumps(value, sort_keys=True, default=str))


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
        meta = self.folder / "meta.json"
        identity = _plain(identity)
        if meta.is_file() and not _same(json.loads(meta.read_text()), identity, _plain(defaults or {})):
            log.warning("%s holds another evaluation's progress: starting over, with its kept parts", self.folder)
            for entry in self.folder.iterdir():  # parts are named by all they depend on: another patch's are never taken
                if entry != self.parts:
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        self.folder.mkdir(parents=True, exist_ok=True)
        meta.write_text(json.dumps(identity, sort_keys=True, indent=1))

    def done(self, groups: list[list[str]]) -> dict[int, dict]:
        """{group index: {"patch": id, "config": ..., "seconds": [per record], "after": [...] or None,
        "host": the machine that timed it, or None}}
        for the recorded prefix of `groups` (record ids per patch)."""
        if not self._groups.is_file():
            return {}
        out = {}
        for line in self._groups.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill: that group is redone
                break
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
            keep_patch: bool, host: str | None = None) -> None:
        """Record a finished patch; `host`: the machine that timed it (a resumed run may be on another)."""
        if keep_patch:
            save(patch, self._patch_file(group))
        entry = {"group": group, "records": records, "patch": patch.id, "config": patch.config, "seconds": seconds,
                 "after": after, "host": host}
        with open(self._groups, "a") as fh:
            fh.write(json.dumps(entry) + "\n")
        shutil.rmtree(self.parts, ignore_errors=True)

    def _patch_file(self, group: int) -> Path:
        return self.folder / f"patch-{group:05d}.safetensors"
