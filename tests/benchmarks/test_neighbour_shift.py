"""benchmarks/neighbour_shift.py on a tiny Llama: every neighbour is counted once per edit, the
shares follow the counts, and each edit is reverted (the model ends bit-exact)."""

from __future__ import annotations

import json

import torch

from benchmarks.neighbour_shift import measure
from editors.context import EditContext
from edit_serve.evaluation import read_records
from tests.evaluation.conftest import CONFIG, TINY_ROWS, tiny_llama  # noqa: F401 (fixture)


def test_counts_every_neighbour_and_reverts_each_edit(tiny_llama, tmp_path):  # noqa: F811
    lm, _ = tiny_llama
    data = tmp_path / "counterfact.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in TINY_ROWS))
    records = read_records(data)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    ctx = EditContext.from_loaded(lm)
    strong = {**CONFIG, "lr": 1.0, "norm_constraint": 10.0}  # enough to move a random model's next tokens
    result = measure(ctx, "ft", strong, records)
    assert result["edits"] == 3 and result["neighbours"] == 3  # one neighbourhood prompt per tiny record
    assert 0 <= result["changed_to_new_target"] <= result["changed"] <= 3
    assert result["changed_share"] == result["changed"] / 3
    assert ctx.stack.ids == [] and all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())
