"""Compaction on a running server: the active weight patches replaced by one that makes the
same change (patches.compact), as one change (PatchService.replace); with kind "memory", the
active memory patches (SERAC's edits) merged into one that holds all their rows.

The editor builds the compacted patch on its model copy, which carries the live patch set,
and measures the swap the way a dry run measures a patch (edit_serve.dry_run): the retention
of every edit the replaced patches carry (the share whose target is the top-1 answer) and
locality on the server's probe set (first answer token against the unedited model; without a
probe set measured at start-up, the share of probe answers the swap leaves unchanged), with
the old patches and with the compacted one. If either falls by more than `tolerance`,
compaction is refused and nothing changes. Side-module patches stay as they are, and each
compaction leaves the other kind's patches (weight or memory) as they are.

Used by `POST /v1/patches/compact` and `edit_serve compact`.
"""

from __future__ import annotations

import logging

from edit_serve.config import DEFAULT_COMPACT_TOLERANCE
from edit_serve.dry_run import figures, server_probes, verdict
from edit_serve.service import Conflict
from patches import PatchError
from patches.compact import KIND_NAMES

log = logging.getLogger(__name__)


async def compact(service, editor, tolerance: float = DEFAULT_COMPACT_TOLERANCE, dry_run: bool = False,
                  kind: str = "delta") -> dict:
    """Replace the active patches of `kind` ("delta": weight patches, "memory": memory patches)
    of a running server (`service`: its PatchService, `editor`: its Editor) by one, unless
    retention or locality would fall by more than `tolerance`; with `dry_run`, only report.
    Raises Conflict when there is nothing to compact or the change is refused."""
    if kind not in KIND_NAMES:
        raise ValueError(kind)
    active = service.active
    replaces = [p.id for p in active if p.kind == kind]
    if len(replaces) < 2:
        raise Conflict(f"nothing to compact: {len(replaces)} active {KIND_NAMES[kind]} patch(es); compaction needs "
                       "two or more", code="nothing_to_compact")
    try:
        patch, report = await editor.compact([p.id for p in active], replaces, await server_probes(service))
    except PatchError as e:  # memory patches that one patch cannot hold (patches.compact.merge_memory)
        raise Conflict(str(e), code="cannot_compact") from None
    measured = figures(report)
    reason = verdict(measured, tolerance, "compaction")
    log.info("compaction of %d patches into %s: retention %s -> %s, locality %s -> %s%s", len(replaces), patch.id,
             measured["retention_before"], measured["retention_after"], measured["locality_before"],
             measured["locality_after"], f" ({reason})" if reason else "")
    summary = patch.summary()
    result = {"id": patch.id, "kind": kind, "replaced": replaces, "tolerance": tolerance, "report": measured,
              **{k: summary[k] for k in ("targets", "memory") if k in summary},  # what it changes, by kind
              "applied": False, "version": service.engine.version}
    if dry_run:
        return {**result, "refused": reason}
    if reason:
        raise Conflict(reason, code="tolerance_exceeded")
    change = await service.replace(patch, replaces)
    return {**result, "applied": True, "version": change.version}
