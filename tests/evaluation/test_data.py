"""Reading evaluation records: the shared data files and every kind of bad input."""

from __future__ import annotations

import dataclasses
import json

import pytest

from edit_serve.evaluation import DataError, hold_out_paraphrases, read_records


def test_counterfact_zsre_and_mquake_read(data_dir):
    (cf,) = read_records(data_dir / "counterfact.jsonl", n=1)
    assert cf.id == "counterfact:102" and cf.requests[0].text == "Renault 8 is produced by"
    assert cf.rewrites[0].targets == ("Fiat",)
    assert len(cf.paraphrases) == 2 and all(p.targets == ("Fiat",) for p in cf.paraphrases)
    assert len(cf.neighborhood) == 10 and cf.neighborhood[0].targets == ("Renault",)
    assert cf.portability[0].targets == ("Turin, Italy",)

    zsre = read_records(data_dir / "zsre.jsonl", n=5)
    assert len(zsre) == 5 and all(len(r.requests) == 1 for r in zsre)

    mquake = read_records(data_dir / "mquake.jsonl")
    assert len(mquake) == 151
    multi = next(r for r in mquake if len(r.requests) > 1)
    assert len(multi.rewrites) == len(multi.requests)
    first = mquake[0]
    assert first.portability[0].targets == ("Kolinda Grabar-Kitarović", "Grabar-Kitarović")
    assert not first.neighborhood and not first.paraphrases


def write(tmp_path, lines):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


GOOD = json.dumps({"prompt": "Paris is in", "subject": "Paris", "target_new": "Italy"})


@pytest.mark.parametrize("line, fragment", [
    ("{not json", ":2: not valid JSON"),
    (json.dumps({"prompt": "Paris is in", "target_new": "Italy"}), ":2: an edit request needs 'subject'"),
    (json.dumps({"prompt": "Rome is in", "subject": "Paris", "target_new": "x"}),
     ":2: the prompt 'Rome is in' contains neither"),
    (json.dumps({"prompt": "Paris is in", "subject": "Paris", "target_new": "x", "paraphrase_prompts": "p"}),
     ":2: paraphrase_prompts must be a list"),
    (json.dumps({"prompt": "Paris is in", "subject": "Paris", "target_new": "x",
                 "portability": [{"prompt": "q"}]}), ":2: portability[].target must be a non-empty string"),
    ("[1, 2]", ":2: a record must be a JSON object"),
])
def test_a_bad_line_is_refused_with_its_number(tmp_path, line, fragment):
    path = write(tmp_path, [GOOD, line])
    with pytest.raises(DataError) as e:
        read_records(path)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_missing_and_empty_files_and_bad_n(tmp_path):
    with pytest.raises(DataError, match="no such data file"):
        read_records(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="holds no records"):
        read_records(write(tmp_path, [""]))
    with pytest.raises(DataError, match="at least 1"):
        read_records(write(tmp_path, [GOOD]), n=0)
    assert len(read_records(write(tmp_path, [GOOD, GOOD, "", GOOD]), n=2)) == 2


def test_held_out_paraphrases_score_the_wordings_an_edit_was_not_fitted_to(data_dir):
    records = read_records(data_dir / "counterfact.jsonl", 3)
    for fit in (False, True):
        for record, held in zip(records, hold_out_paraphrases(records, 1, fit)):
            (request,), (fitted,) = record.requests, held.requests
            assert held.paraphrases == record.paraphrases[1:] and held.neighborhood == record.neighborhood
            assert fitted.rephrasings == ((record.paraphrases[0].prompt,) if fit else ())
            assert fitted.text == request.text and fitted.target_new == request.target_new
    own = dataclasses.replace(records[0], requests=(dataclasses.replace(records[0].requests[0],
                                                                         rephrasings=("{} spoke",)),))
    (kept,) = hold_out_paraphrases([own], 1, True)  # a record's own rephrasings stay, the taken ones follow
    assert kept.requests[0].rephrasings == ("{} spoke", records[0].paraphrases[0].prompt)
    scored = hold_out_paraphrases(records, 1, True, score_taken=True)
    assert [r.paraphrases for r in scored] == [r.paraphrases[:1] for r in records]
    several = next(r for r in read_records(data_dir / "mquake.jsonl") if len(r.requests) > 1)
    with pytest.raises(DataError, match="single-request records only"):
        hold_out_paraphrases([several], 1, True)
