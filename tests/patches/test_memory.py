"""EditMemory: rows added one patch at a time make the same memory as all of them at once."""

from __future__ import annotations

import torch

from patches import Patch
from patches.memory import EditMemory, _Part, _Snapshot


def _memory_patch(seed: int, subjects: list[str], bias: float = -8.0) -> Patch:
    g = torch.Generator().manual_seed(seed)
    keys = torch.nn.functional.normalize(torch.randn(len(subjects), 8, generator=g), dim=-1)
    rows = [{"prompt": f"{s} lives in", "subject": s, "target": "Rome", "descriptor": f"{s} lives in Rome"}
            for s in subjects]
    meta = {"encoder": "e", "encoder_fingerprint": "0", "dim": 8, "fingerprint_params": ["w"],
            "scope": {"cosine": 1.0 + seed, "subject": 2.0, "relation": 8.0, "bias": bias},
            "answer": {"template": "{descriptor}.\n", "mode": "target"}, "rows": rows}
    return Patch(kind="memory", method="serac", base_model="m", base_fingerprint="f", memory=meta,
                 tensors={"memory.keys": keys, "memory.relation_keys": keys.flip(0)}, requests=[seed])


def _same(a: _Snapshot, b: _Snapshot) -> None:
    assert a.rows == b.rows and a.longest == b.longest
    assert {s: list(r) for s, r in a.by_subject.items()} == {s: list(r) for s, r in b.by_subject.items()}
    for name in ("keys", "relation_keys", "w_cos", "w_subject", "w_relation", "bias"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_rows_added_one_patch_at_a_time_equal_a_memory_built_at_once():
    patches = [_memory_patch(0, ["Paris", "the Eiffel Tower"]), _memory_patch(1, ["Paris"]),
               _memory_patch(2, ["Danielle Darrieux", "the Eiffel Tower", "Rome"], bias=-4.0)]
    memory = EditMemory()
    for i, patch in enumerate(patches):
        memory.add(patch)
        _same(memory._snapshot, _Snapshot.of([_Part.of(p) for p in patches[:i + 1]]))
    assert memory._snapshot.by_subject[("the", "eiffel", "tower")] == (1, 4)
    memory.remove(patches[1].id)
    _same(memory._snapshot, _Snapshot.of([_Part.of(p) for p in (patches[0], patches[2])]))
    memory.add(patches[1])
    _same(memory._snapshot, _Snapshot.of([_Part.of(p) for p in (patches[0], patches[2], patches[1])]))
    fresh = EditMemory()
    fresh._snapshot = _Snapshot.of([_Part.of(p) for p in (patches[0], patches[2], patches[1])])
    encode = lambda texts: torch.nn.functional.normalize(torch.ones(len(texts), 8), dim=-1)  # noqa: E731
    for i, text in enumerate(["Where does Paris live?", "The Eiffel Tower is in", "nothing in scope"]):
        key = memory._snapshot.keys[i]
        assert memory.match(key, text, encode) == fresh.match(key, text, encode)
