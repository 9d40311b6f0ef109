"""Which key-statistics corpus can replace WikiText for ROME (issue 16), measured cheaply.

ROME's update is delta W = (v* - W k*) uᵀ / (uᵀ k*) with u = C⁻¹ k*, so two statistics C give
the same edits exactly when they give the same directions u. For the first 100 CounterFact
records this computes k (the input of ROME's down_proj at the subject's last token; one
forward pass each) and, for every candidate corpus, u = C⁻¹ k; it reports the cosine of each
candidate's u with WikiText's (1,000 x 128 tokens, the corpus of the README's figures) and
what the candidate costs, at several shrinkage weights (editors.stats.shrunk: C + w mean(diag C) I,
which is what ROME inverts). A candidate near 1.0 gives the WikiText figures; the dev table
(benchmarks/first_edit.py --suites quality) is the final word.

    python benchmarks/stats_corpora.py            # writes benchmarks/results/stats-corpora.{json,md}

Candidates: WikiText-2 with fewer windows, the prose of Python's documentation (`pydoc_data`,
shipped with every CPython), text the model samples itself (the default corpus, at its default
size), and no statistics at all (u = k). Each candidate's C is cached under
$EDIT_SERVE_CACHE/bench-stats-corpora, so a rerun resumes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import DATA  # noqa: E402
from editors.corpus import CorpusSpec, _pack, corpus_windows  # noqa: E402
from editors.lm import fill, subject_last_index  # noqa: E402
from editors.nethook import TraceDict  # noqa: E402
from editors.stats import DEFAULT_SIZES, compute_mom2, fingerprint_of, shrunk, stats_root  # noqa: E402
from edit_serve.models import cache_dir, load_model  # noqa: E402
from edit_serve.profiles import get_profile  # noqa: E402

log = logging.getLogger("stats_corpora")
LAYER = 3  # ROME's layer on SmolLM2 (the profile's default)
SHRINKAGE = (0.0, 0.3, 1.0, 3.0)


def keys(lm, module: str, n: int) -> torch.Tensor:
    """(n, d) inputs of `module` at the subject's last token of the first n CounterFact prompts."""
    rows = [json.loads(line) for line in (DATA / "counterfact.jsonl").open()][:n]
    out = []
    for r in rows:
        template = r["prompt"] if "{}" in r["prompt"] else r["prompt"].replace(r["subject"], "{}", 1)
        text, start, end = fill(template, r["subject"])
        index = subject_last_index(lm.tokenizer, text, start, end)
        with torch.no_grad(), TraceDict(lm.model, [module], retain_input=True, retain_output=False, stop=True) as td:
            lm.model(input_ids=torch.tensor([lm.tokenizer(text).input_ids]))
        out.append(td[module].input[0, index].float())
    return torch.stack(out)


def candidates(lm) -> dict:
    tok = lm.tokenizer
    n, length, _ = DEFAULT_SIZES["model"]
    wikitext = DATA / "wikitext2_valid.txt"

    def python_docs():
        from pydoc_data.topics import topics

        return [topics[k] for k in sorted(topics)]

    return {
        "wikitext-2 1000x128": lambda: _pack(tok, wikitext.open(), 1000, 128),
        "wikitext-2 256x128": lambda: _pack(tok, wikitext.open(), 256, 128),
        "wikitext-2 100x128": lambda: _pack(tok, wikitext.open(), 100, 128),
        "python docs 400x128": lambda: _pack(tok, python_docs(), 400, 128),
        # the windows the default statistics use (sampled once, cached where editing finds them)
        f"model-sampled {n}x{length}": lambda: corpus_windows(lm.model, tok, CorpusSpec("model"), n, length,
                                                             stats_root() / "corpus"
                                                             / fingerprint_of(lm.model, lm.profile)),
        "no statistics (u = k)": None,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=100, help="CounterFact records")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    lm = load_model(get_profile("smollm2-135m"))
    module = lm.profile.mlp_out(LAYER)
    k = keys(lm, module, args.n).double()  # (n, d)
    cache = cache_dir() / "bench-stats-corpora"
    cache.mkdir(parents=True, exist_ok=True)
    results, reference = {}, None
    for name, make in candidates(lm).items():
        if make is None:  # u = k
            saved = {"C": None, "tokens": 0, "windows_seconds": 0.0, "stats_seconds": 0.0, "load": os.getloadavg()[0]}
        else:
            path = cache / (name.replace(" ", "_").replace("(", "").replace(")", "") + ".pt")
            if not path.is_file():
                load, started = os.getloadavg()[0], time.perf_counter()
                windows = make()
                sampled = time.perf_counter() - started
                mom2, tokens = compute_mom2(lm.model, lm.tokenizer, [module], windows)
                torch.save({"C": mom2[module], "tokens": tokens, "windows_seconds": sampled,
                            "stats_seconds": time.perf_counter() - started - sampled, "load": load}, path)
            saved = torch.load(path)
        if reference is None:  # the first candidate: WikiText, 1000 x 128, as is
            reference = torch.linalg.solve(saved["C"].double(), k.T).T  # (n, d): u = C^-1 k
        cosines = {}
        for weight in SHRINKAGE if saved["C"] is not None else (None,):
            u = k if weight is None else torch.linalg.solve(shrunk(saved["C"].double(), weight), k.T).T
            cos = torch.nn.functional.cosine_similarity(u, reference, dim=1)
            cosines["-" if weight is None else f"{weight:g}"] = {"median": round(cos.median().item(), 4),
                                                                 "min": round(cos.min().item(), 4)}
        results[name] = {"tokens": saved["tokens"], "windows_seconds": round(saved["windows_seconds"], 1),
                         "stats_seconds": round(saved["stats_seconds"], 1), "load_average": saved["load"],
                         "cosine": cosines}
        log.info("%s: %s", name, results[name])
        (args.out / "stats-corpora.json").write_text(json.dumps(results, indent=2) + "\n")
    weights = " | ".join(f"cosine (median, min) at shrinkage {w:g}" for w in SHRINKAGE)
    lines = ["# Key-statistics corpora against WikiText-2 (ROME, layer 3, SmolLM2-135M)", "",
             f"Written by `benchmarks/stats_corpora.py`: cosine of u = C^-1 k with WikiText's (1,000 x 128 tokens, no "
             f"shrinkage), for the keys of the first {args.n} CounterFact subjects; C shrunk as editors.stats.shrunk "
             "does; seconds on a shared 2-core machine (load average recorded).", "",
             f"| corpus | tokens | text s | statistics s | load | {weights} |",
             "|---|---:|---:|---:|---:|" + "---:|" * len(SHRINKAGE)]
    for name, r in results.items():
        cells = [f"{c['median']:.3f}, {c['min']:.3f}" for c in r["cosine"].values()]
        cells += [cells[-1]] * (len(SHRINKAGE) - len(cells))  # u = k: one figure, whatever the weight
        lines.append(f"| {name} | {r['tokens']} | {r['windows_seconds']} | {r['stats_seconds']} | "
                     f"{r['load_average']:.1f} | " + " | ".join(cells) + " |")
    (args.out / "stats-corpora.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
