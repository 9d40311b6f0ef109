"""The evaluation harness: the survey's edit metrics (reliability, generality, locality,
portability; fluency as a guard) measured token-level, in single, batch and sequential modes.

    from edit_serve.evaluation import EvalSettings, evaluate, read_records
    records = read_records("counterfact.jsonl", n=100)
    result = evaluate(model, tokenizer, profile, "rome", records, settings=EvalSettings())
"""

from edit_serve.evaluation.data import (
    DataError, Probe, Record, hold_out_paraphrases, read_records, record_from_dict, rephrasing_probes, requests_of,
    training_examples,
)
from edit_serve.evaluation.harness import EvalSettings, edit_with_eval, evaluate, summarize
from edit_serve.evaluation.measure import GREEDY_METRICS, METRICS, LocalityReference, reference, score
from edit_serve.evaluation.memory import EditMeter
from edit_serve.evaluation.report import table, write_json
from edit_serve.evaluation.scoring import Scorer

__all__ = ["DataError", "EditMeter", "EvalSettings", "GREEDY_METRICS", "LocalityReference", "METRICS", "Probe",
           "Record", "Scorer", "edit_with_eval", "evaluate", "hold_out_paraphrases", "read_records",
           "record_from_dict", "reference", "rephrasing_probes", "requests_of", "score", "summarize", "table",
           "training_examples", "write_json"]
