"""Where an edit's locality goes: do CounterFact's neighbours move toward the edit's new target?

    .venv/bin/python benchmarks/neighbour_shift.py --method mend --editor mend.safetensors --n 40
    .venv/bin/python benchmarks/neighbour_shift.py --method rome --n 20 --label rome

CounterFact's locality prompts ask other subjects about the edited relation ("Renault Dauphine,
produced by" beside the edit "Renault 8 is produced by -> Fiat"). For each of the first N
records, one edit is computed and applied alone; for each neighbourhood prompt the greedy next
token is read before and after. Reported: the share of neighbours whose next token changed, and
how many of those now start the edit's new target (the edit follows the relation, not the
subject) rather than something else (the edit disturbs them in other ways). Writes
benchmarks/results/neighbour-shift.json (one entry per --label) and neighbour-shift.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import DATA  # noqa: E402
from benchmarks.editing import locked, machine, needs_stats, parse_configs, prepare_stats  # noqa: E402
from editors.context import EditContext  # noqa: E402
from editors.lm import model_device, prompt_ids, target_ids  # noqa: E402
from edit_serve.evaluation import read_records, write_json  # noqa: E402
from edit_serve.models import load_model  # noqa: E402
from edit_serve.profiles import get_profile  # noqa: E402

log = logging.getLogger("bench.neighbour_shift")
OUT = ROOT / "benchmarks" / "results"


@torch.no_grad()
def next_tokens(model, tokenizer, prompts: list[str]) -> list[int]:
    """The greedy next token after each prompt (one prompt a pass: no padding to reason about)."""
    device = model_device(model)
    return [int(model(torch.tensor([prompt_ids(tokenizer, p)], device=device)).logits[0, -1].argmax())
            for p in prompts]


def measure(ctx: EditContext, method: str, config: dict, records) -> dict:
    model, tokenizer = ctx.model, ctx.tokenizer
    neighbours = changed = to_target = took = 0
    for record in tqdm(records, desc=f"{method} neighbour shift", unit="edit"):
        request = record.requests[0]
        prompts = [p.prompt for p in record.neighborhood]
        before = next_tokens(model, tokenizer, prompts)
        patch = ctx.compute(method, [request], config)
        target = target_ids(tokenizer, request.text, request.target_new)[0]  # as the harness tokenizes it
        ctx.stack.apply(patch)
        try:
            after = next_tokens(model, tokenizer, prompts)
            took += next_tokens(model, tokenizer, [request.text])[0] == target
        finally:
            ctx.stack.revert(patch.id)
        moved = [a for a, b in zip(after, before) if a != b]
        neighbours += len(prompts)
        changed += len(moved)
        to_target += sum(a == target for a in moved)
    return {"edits": len(records), "edits_taking": took, "neighbours": neighbours, "changed": changed,
            "changed_share": changed / max(neighbours, 1), "changed_to_new_target": to_target,
            "to_new_target_share_of_changed": to_target / max(changed, 1)}


def render(entries: dict, path: Path) -> None:
    lines = ["# Neighbour shift: where an edit's CounterFact locality goes", "",
             "Written by `benchmarks/neighbour_shift.py` (module doc; each entry in neighbour-shift.json records its "
             "command). Per edit (alone, on the unedited model), each neighbourhood prompt's greedy next token "
             "before and after; 'to the new target': the changed token is the first token of the edit's new target.",
             "", "| label | method | edits | edits taking (next token) | neighbours changed | "
             "of those, to the new target |", "| --- | --- | ---: | ---: | ---: | ---: |"]
    for label, e in sorted(entries.items()):
        lines.append(f"| {label} | {e['method']} | {e['edits']} | {e['edits_taking']} | {e['changed']} of "
                     f"{e['neighbours']} ({e['changed_share']:.3f}) | {e['changed_to_new_target']} "
                     f"({e['to_new_target_share_of_changed']:.2f}) |")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", required=True)
    p.add_argument("--editor", help="trained editor checkpoint (mend, ke)")
    p.add_argument("--config", action="append", default=[], metavar="METHOD=JSON", help="method settings")
    p.add_argument("--label", help="the entry's name (default: the method)")
    p.add_argument("--n", type=int, default=40, help="first N CounterFact records (default: %(default)s)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--stats-corpus", default=str(DATA / "wikitext2_valid.txt"))
    p.add_argument("--threads", type=int)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    config = parse_configs(args.config).get(args.method, {})
    if args.editor:
        config["editor"] = args.editor
    if needs_stats(args.method, config) is not None:
        config.setdefault("stats_corpus", args.stats_corpus)
    lm = load_model(get_profile(args.model))
    prepare_stats(lm.model, lm, args.method, config)
    ctx = EditContext.from_loaded(lm)
    result = measure(ctx, args.method, config, read_records(DATA / "counterfact.jsonl", args.n))
    entry = {"method": args.method, "config": config, **result, "machine": machine("cpu"),
             "recorded_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": " ".join(sys.argv)}
    summary = args.out / "neighbour-shift.json"
    with locked(summary):
        entries = json.loads(summary.read_text()) if summary.is_file() else {}
        entries[args.label or args.method] = entry
        write_json(dict(sorted(entries.items())), summary)
        render(entries, args.out / "neighbour-shift.md")
    log.info("%s: %s", args.label or args.method, result)


if __name__ == "__main__":
    main()
