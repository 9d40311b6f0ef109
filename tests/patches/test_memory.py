"""EditMemory: rows added one patch at a time make the same memory as all of them at once;
memory patches merged into one (compaction) make the same memory as they did."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from patches import Patch, PatchError, from_bytes, to_bytes
from patches.compact import merge_memory
from patches.memory import MAX_ROWS, EditMemory, _Part, _Snapshot


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


def _same(a: _Snapshot, b: _Snapshot, by_patch: bool = True) -> None:
    """The same memory (`by_patch`: from the same patches)."""
    def rows(s):
        return s.rows if by_patch else [dataclasses.replace(r, patch_id="") for r in s.rows]

    assert rows(a) == rows(b) and a.longest == b.longest
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


def test_merged_memory_patches_make_the_same_memory():
    """Rows of patches with other scope heads or answer templates than the first keep their
    own; the merged patch routes every input to the same row with the same logit, and merges
    again (a merged patch among the merged) to the same memory."""
    other = _memory_patch(2, ["Danielle Darrieux", "Rome"], bias=-4.0)
    other = other.replace(memory={**other.memory, "answer": {"template": "Fact: {descriptor}.\n", "mode": "condition"}})
    patches = [_memory_patch(0, ["Paris", "the Eiffel Tower"]), _memory_patch(1, ["Paris"]), other]
    merged = from_bytes(to_bytes(merge_memory(patches)))  # valid as a file
    assert merged.kind == "memory" and merged.requests == [0, 1, 2]
    assert merged.config == {"replaces": [p.id for p in patches], "methods": ["serac"] * 3}
    assert [set(r) - {"prompt", "subject", "target", "descriptor"} for r in merged.memory["rows"]] == [
        set(), set(), {"scope"}, {"scope", "answer"}, {"scope", "answer"}]
    separate = _Snapshot.of([_Part.of(p) for p in patches])
    _same(_Snapshot.of([_Part.of(merged)]), separate, by_patch=False)
    again = merge_memory([_memory_patch(3, ["Oslo"]), merged])
    _same(_Snapshot.of([_Part.of(again)]), _Snapshot.of([_Part.of(p) for p in [_memory_patch(3, ["Oslo"]), *patches]]),
          by_patch=False)
    memory, apart = EditMemory(), EditMemory()
    memory.add(merged)
    for patch in patches:
        apart.add(patch)
    encode = lambda texts: torch.nn.functional.normalize(torch.ones(len(texts), 8), dim=-1)  # noqa: E731
    for i, text in enumerate(["Where does Paris live?", "The Eiffel Tower is in", "Rome", "nothing in scope", "x"]):
        key = separate.keys[i]
        found, expected = memory.match(key, text, encode), apart.match(key, text, encode)
        assert (found is None) == (expected is None) and (found is None or (
            found.index, found.logit, dataclasses.replace(found.row, patch_id="")) == (
            expected.index, expected.logit, dataclasses.replace(expected.row, patch_id=""))), text


def test_memory_patches_that_one_patch_cannot_hold_are_not_merged():
    same = [_memory_patch(0, ["Paris"]), _memory_patch(1, ["Rome"])]
    encoded = _memory_patch(2, ["Oslo"])
    encoded = encoded.replace(memory={**encoded.memory, "encoder": "another"})
    with pytest.raises(PatchError, match="differs from .* in encoder: its rows were encoded by another"):
        merge_memory([*same, encoded])
    with pytest.raises(PatchError, match="needs at least two"):
        merge_memory(same[:1])
    big = _memory_patch(3, ["Oslo"] * (MAX_ROWS // 2 + 1))
    with pytest.raises(PatchError, match=f"hold {MAX_ROWS + 2} rows together, over the limit of {MAX_ROWS}"):
        merge_memory([big, big.replace(requests=[4])])


def test_a_row_with_settings_of_its_own_is_validated():
    patch = _memory_patch(0, ["Paris", "Rome"])
    rows = patch.memory["rows"]
    for row, message in [({**rows[0], "scope": {"cosine": 1.0}}, "row 0 scope must be"),
                         ({**rows[0], "answer": {"template": "no descriptor", "mode": "target"}},
                          "row 0 answer.template must"),
                         ({**rows[0], "colour": "red"}, "row 0 has unknown fields")]:
        with pytest.raises(PatchError, match=message):
            from_bytes(to_bytes(patch.replace(memory={**patch.memory, "rows": [row, rows[1]]})))


def test_an_edit_dropped_takes_its_rows_with_it():
    """Each request made one row per wording (its prompt, then each rephrasing): dropping a
    request drops exactly those rows, keys and texts; what cannot be matched is refused."""
    from patches.memory import without_requests

    subjects = ["Paris", "Rome", "Rome", "Rome", "Oslo"]
    patch = _memory_patch(0, subjects)
    requests = [{"prompt": "{} lives in", "subject": "Paris", "target_new": "Rome"},
                {"prompt": "{} lives in", "subject": "Rome", "target_new": "Rome",
                 "rephrasings": ["{} is in", "{} at"]},
                {"prompt": "{} lives in", "subject": "Oslo", "target_new": "Rome"}]
    patch = patch.replace(requests=requests)
    for drop, rows in [([1], [0, 4]), ([0, 2], [1, 2, 3]), ([2, 2], [0, 1, 2, 3])]:
        smaller = from_bytes(to_bytes(without_requests(patch, drop)))
        assert smaller.requests == [r for i, r in enumerate(requests) if i not in drop]
        assert [r["subject"] for r in smaller.memory["rows"]] == [subjects[i] for i in rows]
        for name in ("memory.keys", "memory.relation_keys"):
            assert torch.equal(smaller.tensors[name], patch.tensors[name][rows])
        assert smaller.config["dropped"] == [{"from": patch.id, "requests": [requests[i] for i in sorted(set(drop))]}]
        assert smaller.base_fingerprint == patch.base_fingerprint
    twice = without_requests(without_requests(patch, [0]), [1])  # every drop stays on record, oldest first
    assert twice.requests == requests[1:2] and [d["requests"] for d in twice.config["dropped"]] == [requests[:1],
                                                                                                 requests[2:]]
    legacy = patch.replace(config={"dropped": {"from": "p-old", "requests": []}})  # one dict, as before
    assert [d["from"] for d in without_requests(legacy, [0]).config["dropped"]] == ["p-old", legacy.id]
    for drop, message in [([3], "has requests 0 to 2"), ([0, 1, 2], "every edit"), ([-1], "has requests")]:
        with pytest.raises(PatchError, match=message):
            without_requests(patch, drop)
    with pytest.raises(PatchError, match="5 rows cannot be matched to its 2 requests"):
        without_requests(patch.replace(requests=requests[:2]), [0])
