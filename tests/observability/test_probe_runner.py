"""ProbeRunner on a tiny random Llama (no server): a JSONL probe set is measured on the unedited
model, a large delta breaks locality and reverting restores it exactly; the metric gauges follow;
the prompts that name the patch's subject are left out of locality while it is active."""

from __future__ import annotations

import asyncio
import json
import math

import torch

from edit_serve.config import ProbeConfig
from edit_serve.engines.hf import HFEngine
from edit_serve.metrics import Metrics
from edit_serve.probes import ProbeRunner, read_probe_file
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
    assert (base.locality, base.retention, base.prompts, base.edits, base.about_edits) == (1.0, None, len(prompts), 0, 0)
    # the 4 prompts naming France (the patch's subject) are about the edit: not counted while it is active
    naming = [p for p in prompts if "France" in p]
    assert len(naming) == 4 and (broken.prompts, broken.about_edits) == (len(prompts) - 4, 4)
    assert broken.locality < 0.9 and gauge == broken.locality
    assert broken.edits == 1 and broken.retention in (0.0, 1.0) and list(broken.per_patch.values()) == [broken.retention]
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
