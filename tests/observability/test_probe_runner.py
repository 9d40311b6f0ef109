"""ProbeRunner on a tiny random Llama (no server): a JSONL probe set is measured on the unedited
model, a large delta breaks locality and reverting restores it exactly; the metric gauges follow;
the prompts that name the patch's subject are left out of locality while it is active."""

from __future__ import annotations

import asyncio
import json
import math

import torch

from edit_serve.cli import describe_patches
from edit_serve.config import ProbeConfig
from edit_serve.engines.base import Started, TextDelta
from edit_serve.engines.hf import HFEngine
from edit_serve.metrics import Metrics
from edit_serve.probes import ProbeRunner, greedy, read_probe_file
from patches import Patch
from tests.conftest import load_tiny

WORDS = "the capital of France is Paris city Rome Italy language English French born in".split()


def test_probe_set_file_locality_and_retention(tmp_path):
    lm = load_tiny("llama-3-8b", tmp_path / "llama")
    prompts = [" ".join(WORDS[i:i + 4]) for i in range(len(WORDS) - 4)]
    path = tmp_path / "probes.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    name = lm.profile.mlp_out(1) + ".weight"
    w = lm.model.get_parameter(name)
    bad = Patch(kind="delta", method="manual", base_model="", base_fingerprint="",
                tensors={f"delta.{name}.full": torch.randn(w.shape, generator=torch.Generator().manual_seed(0)) * 50},
                requests=[{"prompt": "the capital of {}", "subject": "France", "target_new": "Paris"}])

    async def scenario():
        engine = HFEngine(lm)
        await engine.start()
        metrics, active = Metrics(replica="r0"), []
        runner = ProbeRunner(engine, ProbeConfig(batch_size=4), lambda: active, metrics, read_probe_file(path))
        try:
            await runner.prepare()
            assert len(runner.probes) == len(prompts) and all(len(p.expected) == 1 for p in runner.probes)
            base = await runner.run_once()
            patch = await engine.stamp(bad)
            await engine.apply(patch)
            # the engine holds the patch, its record does not yet (a service between the two steps
            # of an apply): a run would publish the new version with no edits, so it is discarded
            assert await runner.run_once() is None and runner.last is base
            active.append(patch)
            broken = await runner.run_once()
            gauge = metrics.registry.get_sample_value("edit_serve_locality_ratio", {"replica": "r0"})
            await engine.revert(patch.id)
            active.clear()
            restored = await runner.run_once()
            return base, broken, gauge, restored, metrics, patch.id
        finally:
            await engine.stop()

    base, broken, gauge, restored, metrics, patch_id = asyncio.run(scenario())
    assert (base.locality, base.retention, base.prompts, base.edits, base.about_edits) == \
        (1.0, None, len(prompts), 0, 0)
    # the 4 prompts naming France (the patch's subject) are about the edit: not counted while it is active
    naming = [p for p in prompts if "France" in p]
    assert len(naming) == 4 and (broken.prompts, broken.about_edits) == (len(prompts) - 4, 4)
    assert broken.locality < 0.9 and gauge == broken.locality
    assert broken.edits == 1 and broken.retention in (0.0, 1.0) and \
        list(broken.per_patch.values()) == [broken.retention]
    # the report names what moved: every counted prompt whose answer changed, none that did not
    counted = [p for p in prompts if "France" not in p]
    assert len(broken.moved) == round((1 - broken.locality) * broken.prompts) > 0
    assert {m["prompt"] for m in broken.moved} <= set(counted)
    assert len({m["prompt"] for m in broken.moved}) == len(broken.moved)  # (the tiny tokenizer decodes many ids to "")
    assert len(broken.not_held) == (1 if broken.retention == 0.0 else 0)
    assert all(m["patch"] == patch_id and m["target"].strip() == "Paris" and m["prompt"] == "the capital of France"
               for m in broken.not_held)
    assert base.moved == [] and restored.moved == [] and restored.not_held == []
    assert restored.locality == 1.0 and restored.version == base.version and restored.about_edits == 0
    assert metrics.registry.get_sample_value("edit_serve_locality_ratio", {"replica": "r0"}) == 1.0
    assert math.isnan(metrics.registry.get_sample_value("edit_serve_edit_retention_ratio", {"replica": "r0"}))


def test_runs_take_turns_through_many_edits(tmp_path):
    """With more active edit requests than `edits_per_run`, each run measures that many (the
    ones never measured first, newest patch first, then a turn through the rest); retention
    counts each request's latest result, and agrees with a run that measures them all."""
    lm = load_tiny("llama-3-8b", tmp_path / "llama")
    name = lm.profile.mlp_out(1) + ".weight"
    w = lm.model.get_parameter(name)

    def patch(seed: int, subjects: list[str]) -> Patch:
        delta = torch.randn(w.shape, generator=torch.Generator().manual_seed(seed)) * 0.01
        return Patch(kind="delta", method="manual", base_model="", base_fingerprint="",
                     tensors={f"delta.{name}.full": delta},
                     requests=[{"prompt": "the capital of {} is", "subject": s, "target_new": "Paris"}
                               for s in subjects])

    async def scenario():
        engine = HFEngine(lm)
        await engine.start()
        active = []
        turns = ProbeRunner(engine, ProbeConfig(batch_size=4, edits_per_run=4), lambda: active, None, ["Rome Italy"])
        whole = ProbeRunner(engine, ProbeConfig(batch_size=4), lambda: active, None, ["Rome Italy"])
        try:
            await turns.prepare()
            await whole.prepare()
            for seed, subjects in ((1, WORDS[:6]), (2, WORDS[6:10])):
                active.append(await engine.stamp(patch(seed, subjects)))
                await engine.apply(active[-1])
            runs = [await turns.run_once() for _ in range(4)]
            full = await whole.run_once()
            await engine.revert(active[0].id)
            del active[0]
            after = await turns.run_once()
            return runs, full, after, [p.id for p in active]
        finally:
            await engine.stop()

    runs, full, after, left = asyncio.run(scenario())
    assert [(r.edits_measured, r.edits, r.edits_active) for r in runs] == [(4, 4, 10), (4, 8, 10), (4, 10, 10),
                                                                            (4, 10, 10)]
    assert list(runs[0].per_patch.values())[0] is None  # the newest patch's 4 requests went first
    assert runs[2].retention == runs[3].retention == full.retention and runs[3].per_patch == full.per_patch
    assert (full.edits_measured, full.edits) == (10, 10)
    # `edit_serve patches` says the figure is each edit's latest result
    shown = describe_patches({"version": runs[1].version, "patches": [], "probes": runs[1].to_dict()})
    assert "over 8 edits (each one's latest result; 4 measured in this run, 2 not yet)" in shown, shown
    # the reverted patch's results are dropped: the 4 left fit in one run
    assert (after.edits_measured, after.edits, after.edits_active) == (4, 4, 4) and list(after.per_patch) == left


def test_timed_runs_take_at_most_a_fifth_of_the_time(monkeypatch):
    """A run that takes longer than the interval is followed by a pause of at least four times
    its length (the loop's schedule; run_once stands in for a slow run), and a change still
    wakes it at once."""
    runner = ProbeRunner(None, ProbeConfig(interval_s=0.01), lambda: [])
    starts = []

    async def slow_run():
        starts.append(asyncio.get_running_loop().time())
        await asyncio.sleep(0.2)

    monkeypatch.setattr(runner, "run_once", slow_run)

    async def scenario():
        runner.start()
        await asyncio.sleep(2.5)
        timed = list(starts)
        runner.trigger()  # a change: runs at once, whatever the pause
        await asyncio.sleep(0.5)
        await runner.stop()
        return timed, list(starts)

    timed, everything = asyncio.run(scenario())
    # each timed run starts at least 0.2 s (the run) + 0.8 s (the pause) after the one before; without the cap, 0.21
    assert len(timed) >= 2 and all(b - a >= 0.99 for a, b in zip(timed, timed[1:])), timed
    assert len(everything) == len(timed) + 1


def test_probe_groups_go_one_after_another():
    """A run's groups are sent one at a time, so a change that waits for the requests in flight
    to be admitted (a memory patch on the scoped engine) waits for one group, not a whole run.
    The engine here only records how many groups it holds at once."""
    held = {"now": 0, "most": 0}

    class Recording:
        async def generate(self, requests):
            held["now"] += 1
            held["most"] = max(held["most"], held["now"])
            try:
                await asyncio.sleep(0.01)
                for i, r in enumerate(requests):
                    yield i, Started("v1", len(r.prompt_ids))
                    yield i, TextDelta("x", (7,) * r.params.max_tokens)
            finally:
                held["now"] -= 1

    outputs, versions = asyncio.run(greedy(Recording(), [(1, 2)] * 50, [2] * 50, batch_size=8))
    assert held["most"] == 1 and versions == {"v1"} and outputs == [(7, 7)] * 50
