"""Dry run: what a patch would do, measured beside the serving model, which never changes.

The serving engine only checks the patch (structure, shapes, fingerprint: the checks of an
apply). The measuring happens on the editor's private copy of the model, the one that
computes `POST /v1/edits` and already carries the live patch set: the patch is applied there,
the probe prompts and the patch's own edit prompts are answered greedily with and without it,
and it is reverted again (an exact revert). The report:

- `edits`: each edit request of the patch, whether its target is the model's teacher-forced
  top-1 answer without and with the patch (the harness' reliability), and the greedy answer
  with it (none for a compaction, whose edits are the replaced ones: `retention` measures
  them); `edit_success` is the share that would hold;
- `locality_ratio`: the share of the server's probe prompts whose greedy answer the patch
  leaves unchanged: the first line of the first `answer_tokens` tokens (what follows a line
  break, such as the next paragraph after " Washington.", is not the answer); `changed` lists
  the others, before and after; `probe_prompts` counts the prompts measured;
- `probe_locality_ratio`: what the live `edit_serve_locality_ratio` gauge would read with the
  patch applied (first token against the unedited model), when the server has a probe set;
  `probe_locality_ratio_before`: what it reads now;
- `retention` (and `retention_before`): the share of the edits that are live before the change
  and meant to stay live after it (those of the other active patches, and for a compaction those
  of the patches it replaces) whose target is the teacher-forced top-1 answer after (and
  before) it; `retained_edits` counts them, and `lost` lists those that held before and would
  not after (the first LISTED).
As on the live gauge (edit_serve.probes), a probe prompt that names the subject of an edit
active with the change is not counted: `about_edits` lists those prompts, before and after (the
README's Eiffel Tower edit changes the default probe about the Eiffel Tower, as it should).

Used by `POST /v1/patches?dry_run=true`, `"apply": false` in `POST /v1/edits`,
`edit_serve apply --dry-run`, a guarded apply (`guard`: `verdict` refuses a change that would
make retention or locality fall by more than a tolerance) and compaction's tolerance check
(edit_serve.compaction).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from patches import Patch, patchset_with

log = logging.getLogger(__name__)

#: greedy tokens compared per probe prompt
ANSWER_TOKENS = 8
#: earlier edits a report lists as lost at most
LISTED = 50


@dataclass(frozen=True)
class ProbePrompt:
    """A probe prompt and, when known, the unedited model's first answer token."""

    text: str
    expected: int | None = None


def probe_prompts(runner) -> list[ProbePrompt]:
    """The probe set of a running ProbeRunner as text (it holds token ids)."""
    tok = runner.engine.tokenizer
    return [ProbePrompt(tok.decode(list(p.prompt_ids), skip_special_tokens=True),
                        p.expected[0] if p.expected else None) for p in runner.probes]


def default_probe_prompts() -> list[ProbePrompt]:
    """The default pool when the server runs without probes (no unedited answers known)."""
    from edit_serve.probes import default_pool

    return [ProbePrompt(p) for p in default_pool()]


class Measured:
    """What an editor keeps between measurements on its model copy (`stack`): the answers its
    model gave, by weight state and by the tokens it read as routed (a ScoreMemo), and the
    scope router, with its encoder and the embeddings of the texts it routed. A guarded stream
    of edits then measures the state before each edit once: it is the state after the edit
    before it, measured by that edit's guard. A SERAC memory patch leaves the weights as they
    are, so only the inputs it routes anew are measured again (the same weights on the same
    tokens give the same answer, up to the rounding of the batch it was computed in)."""

    def __init__(self, stack, encoder=None):
        """`encoder`: what loads the sentence encoder (an edit context's, `editors.serac.encoder_of`;
        by default a load of its own)."""
        from edit_serve.evaluation.scoring import ScoreMemo, weight_state

        self.stack = stack
        self.scores = ScoreMemo(lambda: weight_state(stack))
        self._encoder = encoder
        self._router = None

    def router(self, tokenizer):
        """The scope router over the stack's edit memory, as the server routes (kept while the
        tokenizer is the same)."""
        from editors.serac import ScopeRouter, SentenceEncoder
        from patches.memory import memory_of

        memory = memory_of(self.stack)
        if self._router is None or self._router.memory is not memory or self._router.tokenizer is not tokenizer:
            self._router = ScopeRouter(memory, tokenizer, self._encoder or SentenceEncoder.load, remember=True)
        return self._router


def measure(model, tokenizer, stack, patch: Patch, probes: Sequence[ProbePrompt],
            answer_tokens: int = ANSWER_TOKENS, replaces: Sequence[str] = (), memo: Measured | None = None) -> dict:
    """Apply `patch` on `stack` (the editor's model copy) in the place of the active patches
    `replaces` (none: on top), measure, and put the stack back as it was (exactly: one
    change-set each way). "before" is the stack as it was, "after" with the change. `memo`:
    what earlier measurements on the same weights found (Measured), reused and added to."""
    from edit_serve.evaluation.data import DataError
    from edit_serve.evaluation.scoring import Scorer
    from edit_serve.probes import about, subjects_of
    from editors.base import EditError, EditRequest

    started = time.perf_counter()
    if memo is None or memo.stack is not stack:
        memo = Measured(stack)
    # answers as the server gives them: SERAC memory rows on the stack route their prompts
    scorer = Scorer(model, tokenizer, router=memo.router(tokenizer), memo=memo.scores)

    def scorable(dicts) -> tuple[list, list]:
        requests, pairs = [], []
        for r in dicts:  # requests a patch carries are informational: skip what cannot be scored
            try:
                request = EditRequest.from_dict(r)
                pair = scorer.pair(request.text, request.target_new)
            except (EditError, DataError, TypeError, AttributeError, ValueError):
                continue
            requests.append(request)
            pairs.append(pair)
        return requests, pairs

    requests, pairs = scorable(patch.requests)
    staying = [r for a in stack.active if a.patch.id not in replaces for r in a.patch.requests]
    earlier, earlier_pairs = scorable(staying + (list(patch.requests) if replaces else []))
    texts = [p.text for p in probes]

    def held(pairs) -> list[bool]:
        return [top.tolist() == list(target) for top, (_, target) in zip(scorer.top1(pairs), pairs)] if pairs else []

    def run(edit_answers: bool) -> tuple[list[list[int]], list[bool], list[list[int]], list[bool]]:
        answers = scorer.greedy(texts + ([r.text for r in requests] if edit_answers else []), answer_tokens)
        hits = held(pairs + earlier_pairs)
        return answers[:len(texts)], hits[:len(pairs)], answers[len(texts):], hits[len(pairs):]

    before, held_before, _, kept_before = run(edit_answers=False)
    ids, removed = stack.ids, [a.patch for a in stack.active if a.patch.id in replaces]
    stack.replace(patchset_with(ids, patch.id, replaces), [patch])
    try:  # a compaction's requests are the edits it replaces, measured as retention: no answers generated
        after, held_after, edit_answers, kept_after = run(edit_answers=not replaces)
    finally:
        stack.replace(ids, removed)

    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    outcome = lambda p, b, a: {"prompt": p.text, "before": decode(b), "after": decode(a)}  # noqa: E731
    # a probe naming an edited subject is not counted (module doc): the edits active now, and with the change
    related_before = about(subjects_of(a.patch for a in stack.active))
    related_after = about(subjects_of([*(a.patch for a in stack.active if a.patch.id not in replaces), patch]))
    rows = [(p, b, a, not related_after(p.text), _answer(decode(b)) == _answer(decode(a)))
            for p, b, a in zip(probes, before, after)]  # (probe, before, after, counted, answer unchanged)
    known_before = [(p.expected, b) for p, b in zip(probes, before)
                    if p.expected is not None and not related_before(p.text)]
    known_after = [(p.expected, a) for p, _, a, counted, _ in rows if p.expected is not None and counted]
    return {
        "edits": [{"prompt": r.text, "target_new": r.target_new, "before": hb, "after": ha,
                   "answer": decode(ans) if ans is not None else None}
                  for r, hb, ha, ans in zip(requests, held_before, held_after, edit_answers or [None] * len(requests))],
        "edit_success": _share(held_after),
        "edit_success_before": _share(held_before),
        "locality_ratio": _share([same for *_, counted, same in rows if counted]),
        "probe_locality_ratio": _first_tokens(known_after),  # None without a probe set measured at start-up
        "probe_locality_ratio_before": _first_tokens(known_before),
        "probe_prompts": sum(counted for *_, counted, _ in rows),
        "retention": _share(kept_after),
        "retention_before": _share(kept_before),
        "retained_edits": len(earlier),
        "lost": [{"prompt": r.text, "target_new": r.target_new}
                 for r, b, a in zip(earlier, kept_before, kept_after) if b and not a][:LISTED],
        "changed": [outcome(p, b, a) for p, b, a, counted, same in rows if counted and not same],
        "about_edits": [outcome(p, b, a) for p, b, a, counted, _ in rows if not counted],
        "answer_tokens": answer_tokens,
        "seconds": round(time.perf_counter() - started, 3),
    }


def _share(flags: Sequence[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def _answer(text: str) -> str:
    """The answer a continuation gives: its first non-empty line."""
    return text.strip().split("\n", 1)[0].strip()


def _first_tokens(known: Sequence[tuple[int, list[int]]]) -> float | None:
    """The live gauge's ratio: the share of (unedited first token, answer) pairs that agree."""
    return _share([bool(answer) and answer[0] == expected for expected, answer in known])


def figures(report: dict) -> dict:
    """Retention and locality before and after the change, from a report."""
    if report["probe_locality_ratio"] is not None:
        locality = {"locality_before": report["probe_locality_ratio_before"],
                    "locality_after": report["probe_locality_ratio"], "locality_against": "unedited model"}
    else:
        locality = {"locality_before": 1.0, "locality_after": report["locality_ratio"],
                    "locality_against": "answers before the change"}
    return {"retention_before": report["retention_before"], "retention_after": report["retention"],
            **locality, "edits": report["retained_edits"], "probe_prompts": report["probe_prompts"],
            "changed": report["changed"], "lost": report["lost"], "seconds": report["seconds"]}


def verdict(measured: dict, tolerance: float, what: str) -> str | None:
    """Why `what` may not happen (retention or locality in `figures` falls by more than
    `tolerance`), or None."""
    for name in ("retention", "locality"):
        before, after = measured[f"{name}_before"], measured[f"{name}_after"]
        if before is not None and after is not None and before - after > tolerance:
            return (f"{what} refused: {name} would fall from {before:.3f} to {after:.3f}, more than the "
                    f"tolerance of {tolerance}; nothing was changed")
    return None


async def server_probes(service) -> list[ProbePrompt]:
    """The probe set of a running server (`service`: its PatchService)."""
    if service.probes is not None:
        return probe_prompts(service.probes)
    if hasattr(service.engine, "probe_prompts"):  # Ray: the replicas hold the probe set
        return await service.engine.probe_prompts()
    return default_probe_prompts()


async def dry_run(service, editor, patch: Patch) -> dict:
    """The dry-run report of `patch` on a running server (`service`: its PatchService,
    `editor`: its Editor). Raises what an apply would raise for a patch that does not fit."""
    from edit_serve.service import Conflict

    if any(p.id == patch.id for p in service.active):
        raise Conflict(f"patch {patch.id} is already applied")
    await service.engine.check(patch)  # the checks of an apply; nothing changes on the engine
    version = service.engine.version
    report = await editor.dry_run(patch, [p.id for p in service.active], await server_probes(service))
    log.info("dry run of %s on %s: locality %s, %d answers changed, edits %s", patch.id, version,
             report["locality_ratio"], len(report["changed"]), report["edit_success"])
    return {"id": patch.id, "method": patch.method, "version": version, "applied": False, "dry_run": report}


async def guarded_report(service, editor, patch: Patch, tolerance: float | None) -> dict:
    """The dry-run report of `patch`; with a `tolerance`, also what a guarded apply would say
    (`refused`: its reason, or None)."""
    report = await dry_run(service, editor, patch)
    if tolerance is not None:
        report.update(guard=tolerance, refused=verdict(figures(report["dry_run"]), tolerance, f"patch {patch.id}"))
    return report


async def guarded_add(service, editor, patch: Patch, data: bytes | None, tolerance: float | None,
                      expect: Sequence[str] | None = None):
    """Apply `patch` on a running server only if, measured as a dry run, neither the retention
    of the live edits nor locality on the probe set would fall by more than `tolerance`
    (Conflict `tolerance_exceeded` otherwise, nothing changed; `patch_set_changed` if another
    change landed while it was measured, or if the active patches are not `expect`, those the
    patch was computed on). Returns the Change and the figures (None: no tolerance, the patch
    applied as it is, unmeasured)."""
    from edit_serve.service import Conflict

    if tolerance is None:
        return await service.add(patch, data, expect=expect), None
    active = [p.id for p in service.active] if expect is None else list(expect)
    measured = figures((await dry_run(service, editor, patch))["dry_run"])
    reason = verdict(measured, tolerance, f"patch {patch.id}")
    log.info("guarded apply of %s: retention %s -> %s, locality %s -> %s%s", patch.id, measured["retention_before"],
             measured["retention_after"], measured["locality_before"], measured["locality_after"],
             f" ({reason})" if reason else "")
    if reason:
        raise Conflict(reason, code="tolerance_exceeded")
    return await service.add(patch, data, expect=active), measured
