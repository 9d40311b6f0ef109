"""How much room AlphaEdit's null space leaves as edits pile up on a model.

    .venv/bin/python benchmarks/null_capacity.py [--model smollm2-135m] [--sizes 10 100 300 1000]

AlphaEdit (editors.nullspace) puts every update in the null space of the preserved keys (the
corpus statistics: eigenvalues below the threshold) and keeps it off the keys of the edits
already on the model. Those keys take up directions of that space: once they span most of
it, a new edit has little room that touches neither general text nor earlier edits. For each
of the method's layers this writes the null space's dimension and, for the first N edits of
counterfact_batch.jsonl, how many directions their keys (the bare prompt's and the context
templates' mean, as alphaedit protects them; computed on the unedited model) take inside it:
the rank holding 90% and 99% of their energy there, and the share of their energy that lies
in the null space at all.

It also measures what the keys cannot show alone, the cross-talk of AlphaEdit's solve for a
batch of the first N edits (editors.nullspace, no earlier edits): dW = R A with A = (M^-1 P K)^T,
so a prompt whose key at this layer is k receives A k, one coefficient per edit, times the
edits' residuals. 'fit' is the median of A_i k_i (1: edit i's own key gets all of its
residual); 'cross-talk' is, per neighbourhood prompt of the first min(N, 100) edits (all its
positions, its own edit left out), the largest l2 norm over the other edits' coefficients, as
a median: how much of a typical residual's worth of change the OTHER edits push into a prompt
they are not about. Each layer is written to null-capacity.json as it finishes and skipped on a rerun
with the same settings; null-capacity.md is the table.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import DATA  # noqa: E402
from benchmarks.editing import Rows  # noqa: E402
from edit_serve.evaluation.data import read_records, requests_of  # noqa: E402
from edit_serve.models import load_model  # noqa: E402
from edit_serve.profiles import get_profile  # noqa: E402
from editors.base import get_editor, make_config  # noqa: E402
from editors.common import method_layers  # noqa: E402
from editors.context import EditContext  # noqa: E402
from editors.keys import edit_keys, mix_keys  # noqa: E402
from editors.lm import target_batch  # noqa: E402
from editors.nullspace import constrained_update, projector  # noqa: E402
from editors.lm import mlp_positions  # noqa: E402
from editors.side import attach_inputs  # noqa: E402

log = logging.getLogger("bench.null_capacity")


def occupancy(keys: torch.Tensor, proj: torch.Tensor) -> dict:
    """keys (m, in), proj (in, in) -> the directions the keys take inside the projector's range."""
    inside = keys.double() @ proj.double()
    energy = torch.linalg.svdvals(inside) ** 2
    cumulative = energy.cumsum(0) / energy.sum()
    return {"rank90": int((cumulative < 0.90).sum()) + 1, "rank99": int((cumulative < 0.99).sum()) + 1,
            "energy_in_null": float(energy.sum() / keys.double().square().sum())}


def crosstalk(keys: torch.Tensor, proj: torch.Tensor, l2: float, neighbours: list[torch.Tensor],
              owners: list[int]) -> dict:
    """keys (n, in) of a batch's edits; neighbours: each prompt's keys at every position (T, in),
    owners: the edit each belongs to -> {"fit", "cross_talk"} (module doc) under AlphaEdit's solve."""
    n = len(keys)
    _, a = constrained_update(keys.T, torch.zeros(1, n), proj, None, l2)  # A (n, in)
    a = a.double()
    fit = torch.diagonal(a @ keys.double().T)  # (n,)
    cross = []
    for k, owner in zip(neighbours, owners):
        if owner < n:
            coef = k.double() @ a.T  # (T, n)
            coef[:, owner] = 0
            cross.append(coef.norm(dim=1).max())
    return {"fit": float(fit.median()), "cross_talk": float(torch.stack(cross).median())}


def prompt_keys(ctx: EditContext, module: str, prompts: list[str]) -> list[torch.Tensor]:
    """The module's input at every position of each prompt, in one batch: [(T, in)]."""
    batch = target_batch(ctx.model, ctx.tokenizer, [(text, None) for text in prompts])
    inputs, mask = attach_inputs(ctx.model, module, batch).cpu(), mlp_positions(batch).cpu()
    return [x[m] for x, m in zip(inputs, mask)]


def layer_row(ctx: EditContext, layer: int, records, sizes: list[int], cfg, chunk: int = 50,
              neighbour_edits: int = 100) -> dict:
    module = ctx.profile.mlp_out(layer)
    requests = requests_of(records)
    if len(requests) != len(records):
        raise SystemExit("null_capacity needs one request per record (counterfact_batch's form)")
    proj = projector(ctx, layer, cfg.stats(), cfg.null_threshold)
    found = [edit_keys(ctx.model, ctx.tokenizer, module, requests[i:i + chunk])
             for i in tqdm(range(0, len(requests), chunk), desc=f"keys at layer {layer}", unit="chunk", leave=False)]
    keys = {kind: torch.cat([f[kind] for f in found]) for kind in ("prompt", "templates")}
    mixed = mix_keys(keys, cfg.prompt_key_weight)  # (n, in) the key alphaedit's solve fits
    owners, prompts = zip(*[(i, p.prompt) for i, r in enumerate(records[:neighbour_edits]) for p in r.neighborhood])
    neighbours = prompt_keys(ctx, module, list(prompts))
    return {"layer": layer, "dims": proj.shape[0], "null_dims": round(float(torch.trace(proj.double()))),
            "edits": {str(n): {**occupancy(torch.cat([keys["prompt"][:n], keys["templates"][:n]]), proj),
                               **crosstalk(mixed[:n], proj, cfg.null_l2, neighbours, list(owners))} for n in sizes}}


def markdown(results: dict) -> str:
    lines = ["# Room left in AlphaEdit's null space", "",
             "Written by `benchmarks/null_capacity.py`. Per layer alphaedit edits: the null space of the "
             "preserved keys (eigenvalues of the corpus statistics below the threshold) and how many of its "
             "directions the keys of the first N counterfact_batch edits take (rank holding 90% / 99% of their "
             "energy inside it; two keys per edit, as alphaedit protects them). 'in null': the share of "
             "the keys' energy that lies in the null space at all. 'fit' and 'cross-talk': AlphaEdit's solve for the "
             "first N edits as one batch; the median of A_i k_i, and the median over the first min(N, 100) edits' "
             "neighbourhood prompts of the other edits' coefficients there (l2 over the edits, the prompt's "
             "most affected position): the share of a residual the other edits push into an unrelated prompt.", "",
             "| model | layer | null dims / dims | N | rank 90% | rank 99% | "
             "rank 99% / null dims | in null | fit | cross-talk |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in sorted(results["rows"].values(), key=lambda r: (r["model"], r["layer"])):
        for n, occ in sorted(row["edits"].items(), key=lambda kv: int(kv[0])):
            lines.append(f"| {row['model']} | {row['layer']} | {row['null_dims']:,} / {row['dims']:,} | {int(n):,} | "
                         f"{occ['rank90']:,} | {occ['rank99']:,} | {occ['rank99'] / row['null_dims']:.2f} | "
                         f"{occ['energy_in_null']:.2f} | {occ['fit']:.2f} | {occ['cross_talk']:.2f} |")
    return "\n".join(lines + [""])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 300, 1000])
    p.add_argument("--data", type=Path, default=DATA / "counterfact_batch.jsonl")
    p.add_argument("--stats-corpus", default=str(DATA / "wikitext2_valid.txt"),
                   help="the preserved keys' statistics, as the survey's alphaedit cells use them")
    args, results = Rows.from_cli(p, argv, "null_capacity.py", "null-capacity.json")
    ctx = EditContext.from_loaded(load_model(get_profile(args.model), dtype="float32"))
    cfg = make_config(get_editor("alphaedit"), {"stats_corpus": args.stats_corpus})
    records = read_records(args.data, max(args.sizes))[:max(args.sizes)]
    settings = {"sizes": args.sizes, "data": args.data.name, "threshold": cfg.null_threshold, "l2": cfg.null_l2,
                "prompt_key_weight": cfg.prompt_key_weight,
                "stats": [Path(cfg.stats_corpus).name, cfg.stats_samples, cfg.stats_length], "model": args.model}
    with torch.no_grad():
        for layer in tqdm(method_layers(ctx.profile, "alphaedit", None), desc="null capacity", unit="layer"):
            key = f"{args.model}/{layer}"
            if results.done(key, settings):
                continue
            row = layer_row(ctx, layer, records, args.sizes, cfg)
            results.add(key, row, settings)
            log.info("layer %d: %s", layer, json.dumps(row["edits"]))
    (args.out / "null-capacity.md").write_text(markdown(results.data))
    return results.data


if __name__ == "__main__":
    main()
