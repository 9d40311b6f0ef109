"""The patch store's log reads only what was appended since its last read, and still answers
exactly what a fresh read of the file answers: after appends by another writer, after the
file is rewritten or shortened, with a damaged line (named by its number) or a torn last line."""

from __future__ import annotations

import pytest

from edit_serve.store import PatchStore, StoreError

IDS = [f"{i:02x}" * 12 for i in range(6)]


def fresh(store: PatchStore) -> PatchStore:
    return PatchStore(store.root)  # a new reader: parses the whole file


def same_answers(store: PatchStore) -> None:
    other = fresh(store)
    assert store.records() == other.records()
    assert store.active_ids() == other.active_ids()
    assert store.applied_at() == other.applied_at()


def test_reads_follow_appends_from_another_writer(tmp_path):
    store = PatchStore(tmp_path / "store")
    for i in IDS[:3]:
        store.append("apply", i)
    same_answers(store)
    writer = fresh(store)
    writer.append("revert", IDS[1])
    writer.append("compact", IDS[3], [IDS[0]])
    assert store.active_ids() == [IDS[3], IDS[2]]
    same_answers(store)
    store.append("apply", IDS[1])
    assert writer.active_ids() == store.active_ids() == [IDS[3], IDS[2], IDS[1]]


def test_a_rewritten_or_shortened_log_is_read_anew(tmp_path):
    store = PatchStore(tmp_path / "store")
    for i in IDS[:4]:
        store.append("apply", i)
    assert store.active_ids() == IDS[:4]
    data = store.log_path.read_bytes()
    store.log_path.write_bytes(data.replace(IDS[0].encode(), IDS[5].encode()))  # same length, new content
    assert store.active_ids() == [IDS[5], *IDS[1:4]]
    lines = data.splitlines(keepends=True)
    store.log_path.write_bytes(b"".join(lines[:2]))
    assert store.active_ids() == IDS[:2]
    same_answers(store)


def test_a_damaged_line_after_the_parsed_ones_is_named(tmp_path):
    store = PatchStore(tmp_path / "store")
    for i in IDS[:2]:
        store.append("apply", i)
    assert store.active_ids() == IDS[:2]
    with open(store.log_path, "ab") as fh:
        fh.write(b'{"op": "rewind", "id": "abcd", "at": 2.0}\n')
    with pytest.raises(StoreError, match="line 3 is damaged"):
        store.active_ids()
    with pytest.raises(StoreError, match="line 3 is damaged"):
        store.active_ids()  # still: the damaged line was not taken into what was read before


def test_a_torn_last_line_is_ignored_then_cut_before_the_next_append(tmp_path):
    store = PatchStore(tmp_path / "store")
    store.append("apply", IDS[0])
    assert store.active_ids() == [IDS[0]]
    with open(store.log_path, "ab") as fh:
        fh.write(b'{"op": "apply", "id": "' + IDS[1].encode())  # a crash mid-append
    assert store.active_ids() == [IDS[0]]
    store.append("apply", IDS[2])
    assert store.active_ids() == [IDS[0], IDS[2]]
    same_answers(store)
    assert store.log_path.read_bytes().count(b"\n") == 2
