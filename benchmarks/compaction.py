"""Compaction benchmark: 100 active patches replaced by one on a live server (issue 12).

    .venv/bin/python benchmarks/compaction.py [--n 100] [--config '{"null_space": true}']

Steps, each written to benchmarks/results/compaction.json as soon as it finishes and skipped
on a rerun (delete its entry to redo it):
- edits: N sequential ROME edits of the first N CounterFact records, each computed on top of
  the ones before (the evaluation harness' sequential mode, resumable patch by patch; the
  patch files stay in the cache folder, not in the repository), scored at the end;
- serving: a real server (`edit_serve serve`, hf engine, SmolLM2) gets the N patch files one
  after another (`POST /v1/patches`); then, with the N patches: the server's live probe report
  (edit retention and locality, once it measured this patch set); the compaction (`POST
  /v1/patches/compact`), whose report gives its own check (retention of all N edits and
  locality on the probe set, before and after); the same live figures with the one compacted
  patch; throughput (greedy completions, ignore_eos) with the N patches and with the compacted
  one, runs in turns between a second server holding the N patches and this one, so a shared
  machine's drift favours neither; and the apply latency of the compacted patch (`DELETE` then
  `POST /v1/patches` of its file, median of --apply-repeats).
Writes compaction.json and compaction.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import DATA  # noqa: E402
from benchmarks.serving import load_run, percentile  # noqa: E402
from editors.context import EditContext  # noqa: E402
from edit_serve.evaluation import EvalSettings, evaluate, read_records, write_json  # noqa: E402
from edit_serve.models import cache_dir, load_model  # noqa: E402
from edit_serve.profiles import get_profile  # noqa: E402
from tests.servers import run_server  # noqa: E402

log = logging.getLogger("bench.compaction")
METHOD = "rome"
#: AlphaEdit's null-space constraint with r-ROME's key, as measured in benchmarks/results/editing.md
LIFELONG = {"null_space": True, "same_key": True, "prompt_key_weight": 0.5, "v_stop_nll": 0.05}
SUMMARY_KEYS = ("reliability", "generality", "locality", "seconds_per_edit", "wall_seconds", "n", "patches",
                "editor_config")


def save(results: dict, out: Path) -> None:
    write_json(results, out / "compaction.json")
    (out / "compaction.md").write_text(markdown(results))


def progress_folder(args) -> Path:
    """Where the sequential patches are kept between runs (outside the repository)."""
    return cache_dir() / "bench" / "compaction" / f"{METHOD}-{args.n}"


def run_edits(args) -> dict:
    torch.set_num_threads(args.threads)
    lm = load_model(get_profile(args.model), dtype="float32")
    records = read_records(args.data / "counterfact.jsonl", args.n)
    settings = EvalSettings(mode="sequential", batch_size=1, fluency_tokens=0)
    config = {"stats_corpus": str(args.data / "wikitext2_valid.txt"), **args.config}
    result = evaluate(EditContext.from_loaded(lm), METHOD, records, config, settings,
                      checkpoint=progress_folder(args))
    return {k: result[k] for k in SUMMARY_KEYS}


def patch_files(args) -> list[Path]:
    files = sorted(progress_folder(args).glob("patch-*.safetensors"))
    if len(files) != args.n:
        raise SystemExit(f"{progress_folder(args)} holds {len(files)} patches, not {args.n}: rerun the edits step")
    return files


def throughput(urls: tuple[str, str], args) -> tuple[dict, dict]:
    """Throughput of two servers measured in turns (ab, ba, ab, ...), so the drift of a shared
    machine favours neither; each side's median over --runs runs."""
    runs: tuple[list, list] = ([], [])
    for i in range(args.runs):
        for side in ((0, 1) if i % 2 == 0 else (1, 0)):
            runs[side].append(asyncio.run(load_run(urls[side], args.model, args.concurrency, args.concurrency * 3,
                                                   args.max_tokens)))
    return tuple({"tokens_per_s": statistics.median(r["tokens_per_s"] for r in side),
                  "p50_s": statistics.median(r["p50_s"] for r in side), "runs": side, "interleaved": True,
                  "load_average": os.getloadavg()} for side in runs)  # other work on the machine skews these


def settled_probes(admin, after: float = 0.0, timeout: float = 1800) -> dict:
    """The server's live probe report once it measured the current patch set, finishing after
    `after` (a time.time(): a revert back to an earlier set triggers a new run even though an
    old report of that set exists), so no probe run overlaps what is measured next."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listing = admin.get("/v1/patches").raise_for_status().json()
        report = listing["probes"]
        if report and report["version"] == listing["version"] and report["at"] >= after:
            return report
        time.sleep(1)
    raise RuntimeError(f"no probe run of the current patch set in {timeout} s")


def run_serving(args) -> dict:
    files = patch_files(args)
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp, run_server(Path(tmp) / "store", "--model", args.model,
                                                          "--probe-interval", "0") as server, server.admin() as admin:
        for path in tqdm(files, desc="apply", unit="patch"):
            admin.post("/v1/patches", content=path.read_bytes()).raise_for_status()
        asyncio.run(load_run(server.url, args.model, 2, 4, args.max_tokens))  # warm-up
        out["live_probes_before"] = settled_probes(admin)
        started = time.perf_counter()
        compacted = admin.post("/v1/patches/compact", params={"tolerance": args.tolerance},
                               timeout=3600).raise_for_status().json()
        out["compact_seconds"] = time.perf_counter() - started
        out["compacted"] = {k: compacted[k] for k in ("id", "version", "replaced", "targets", "report")}
        out["live_probes_after"] = settled_probes(admin)
        # throughput with the N patches (a second server, up beside it) and with the compacted one, in turns
        with run_server(Path(tmp) / "store-before", "--model", args.model, "--probe-interval", "0") as twin, \
                twin.admin() as twin_admin:
            for path in tqdm(files, desc="apply (twin)", unit="patch"):
                twin_admin.post("/v1/patches", content=path.read_bytes()).raise_for_status()
            asyncio.run(load_run(twin.url, args.model, 2, 4, args.max_tokens))  # warm-up
            settled_probes(twin_admin)  # its probe run over before anything is timed
            out["throughput_before"], out["throughput_after"] = throughput((twin.url, server.url), args)
        body = admin.get(f"/v1/patches/{compacted['id']}", params={"download": 1}).raise_for_status().content
        times = []
        for _ in tqdm(range(args.apply_repeats), desc="apply compacted", leave=False):
            changed = time.time()  # the probe run the revert triggers finishes after this
            admin.delete(f"/v1/patches/{compacted['id']}").raise_for_status()
            # a change waits for running batches: time the apply, not the probe run
            settled_probes(admin, after=changed)
            started = time.perf_counter()
            admin.post("/v1/patches", content=body).raise_for_status()
            times.append(time.perf_counter() - started)
        out["apply_compacted_ms"] = {"median": 1000 * statistics.median(times), "p99": 1000 * percentile(times, 0.99),
                                     "repeats": len(times), "bytes": len(body)}
    return out


STEPS = {"edits": run_edits, "serving": run_serving}


def markdown(r: dict) -> str:
    lines = [f"# Compaction of {r['n']} active patches into one (`{r['model']}`, hf engine, CPU)", "",
             f"Edits: {METHOD} with {json.dumps(r['config'])}, one CounterFact record per patch, each computed on "
             "top of the ones before.", ""]
    edits = r.get("edits")
    if edits:
        lines += [f"Sequential stream (harness, scored at the end): reliability {edits['reliability']:.3f}, "
                  f"generality {edits['generality']:.3f}, locality {edits['locality']:.3f}, "
                  f"{edits['seconds_per_edit']:.2f} s per edit.", ""]
    s = r.get("serving")
    if s:
        rep, live = s["compacted"]["report"], (s["live_probes_before"], s["live_probes_after"])
        before, after = s["throughput_before"]["tokens_per_s"], s["throughput_after"]["tokens_per_s"]
        turns = ("; median of runs in turns, a second server holding the patches beside the compacted one"
                 if s["throughput_before"].get("interleaved") else "")
        lines += [f"| figure | before ({r['n']} patches) | after (1 patch) | target |", "|---|---:|---:|---|",
                  f"| edit retention (compaction's check: target is the top-1 answer) | {rep['retention_before']:.3f} "
                  f"| {rep['retention_after']:.3f} | within 0.02 |",
                  f"| locality on the probe set (compaction's check, against the {rep['locality_against']}) "
                  f"| {rep['locality_before']:.3f} | {rep['locality_after']:.3f} | within 0.02 |",
                  f"| edit retention (live probes, greedy answers on the serving engine) "
                  f"| {live[0]['edit_retention_ratio']:.3f} | {live[1]['edit_retention_ratio']:.3f} | within 0.02 |",
                  f"| locality (live probes, first token against the unedited model) "
                  f"| {live[0]['locality_ratio']:.3f} | {live[1]['locality_ratio']:.3f} | within 0.02 |",
                  f"| throughput (tokens/s, concurrency {r['concurrency']}{turns}) | {before:.1f} | {after:.1f} "
                  f"(x{after / before:.3f}) | unchanged |",
                  f"| apply of the compacted patch over HTTP (median ms) | - | {s['apply_compacted_ms']['median']:.1f} "
                  "| under 50 ms |", "",
                  "The apply is measured as `DELETE` then `POST` of the compacted file, so the patch set it makes was "
                  "verified before (when compaction applied it) and the hf engine does not run its verify forward "
                  "again (patches.stack: weights are a function of the set). A set the server has never verified "
                  "pays that 5-token forward on top: about 90 ms on one thread of this machine.", "",
                  f"Compaction took {s['compact_seconds']:.1f} s (tolerance check included); the compacted patch "
                  f"({s['apply_compacted_ms']['bytes']:,} bytes, {len(s['compacted']['replaced'])} patches replaced) "
                  "targets "
                  + ", ".join(f"{t['param']} ({t['form']}, rank {t['rank']})" for t in s["compacted"]["targets"])
                  + ".", ""]
    lines.append(f"Recorded {r.get('recorded_at', '-')}; command: `{r.get('command', '')}`.")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--n", type=int, default=100, help="sequential edits, one patch each (default: %(default)s)")
    p.add_argument("--config", type=json.loads, default=LIFELONG,
                   help="ROME settings as JSON (default: %(default)s: the lifelong-editing options of "
                        "benchmarks/editing.py's null-rrome variant)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads for the edits (default: %(default)s; on a loaded 2-core machine one is faster)")
    p.add_argument("--data", type=Path, default=DATA, help="folder holding counterfact.jsonl and the statistics corpus")
    p.add_argument("--steps", nargs="+", choices=list(STEPS), default=list(STEPS))
    p.add_argument("--tolerance", type=float, default=0.02)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--runs", type=int, default=3, help="throughput runs, median reported")
    p.add_argument("--apply-repeats", type=int, default=7)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)

    path = args.out / "compaction.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    settings = {"model": args.model, "n": args.n, "config": args.config, "concurrency": args.concurrency}
    if any(results.get(k) != v for k, v in settings.items()):
        results = dict(settings)  # other settings: start over
    for step in args.steps:
        if step in results:
            log.info("step %s is recorded in %s: skipped", step, path)
            continue
        results[step] = STEPS[step](args)
        results.update(recorded_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                       command=" ".join(["benchmarks/compaction.py", *sys.argv[1:]]), load_average=os.getloadavg())
        save(results, args.out)
        log.info("step %s recorded", step)


if __name__ == "__main__":
    main()
