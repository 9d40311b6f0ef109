"""benchmarks/serac_scope.py: what the scope head's fit leaves out."""

from __future__ import annotations

import random

from benchmarks.serac_scope import DATA, evaluated, read, scope_records


def test_exclude_stream_keeps_the_streams_records_out_of_the_fit():
    stream = read(DATA / "counterfact_batch.jsonl", 50)
    ids, names = {r["source"]["case_id"] for r in stream}, {r["subject"].casefold() for r in stream}
    cases, subjects = evaluated(DATA, 50)
    assert ids <= cases and names <= subjects
    assert not ids <= evaluated(DATA)[0]

    plain, kept = (scope_records(DATA, 30000, random.Random(0)),
                   scope_records(DATA, 30000, random.Random(0), stream=50))
    assert {r["source"]["case_id"] for r in plain} & ids  # the plain fit may draw them
    assert not {r["source"]["case_id"] for r in kept} & ids
    assert not {r["subject"].casefold() for r in kept} & names
    assert len(kept) > 20000
