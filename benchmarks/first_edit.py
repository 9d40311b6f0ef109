"""The first edit on a fresh machine (issue 16): how long a new user waits, and whether the
default key statistics are as good as WikiText's.

- timing: the README's first edit, `edit_serve edit --method rome --prompt "{} is located in
  the city of" --subject "The Eiffel Tower" --target "Rome" -o eiffel.safetensors`, as its own
  process, from an EMPTY statistics cache with the model already converted: every run gets a
  fresh EDIT_SERVE_CACHE whose models/ links to the converted model. Wall time, median of
  --runs (3).
- warm: the same edit beside a server started with `--warm-editor` on an empty statistics cache
  (the model converted), in the two orders a new user may take: once the server says its editor
  is warm ("after warm-up": the statistics are there), and as soon as the server answers ("at
  once": the edit waits for the warm-up's statistics instead of computing them a second time).
  Wall time of the edit, and the server's seconds to answer and to be warm; median of --runs each.
- quality: the dev CounterFact table (the first 100 records, ROME, one edit per patch) with the
  default statistics, next to the WikiText figures benchmarks/editing.py recorded
  (editing.json, quality/counterfact/smollm2-135m/rome/single-1); the bar is 0.02 on
  reliability, generality and locality.

Resumable: every timing run and every chunk of 5 quality records is saved at once in
benchmarks/results/first-edit.json; a rerun skips what is there (--fresh starts over), so the
figures can be re-measured on a quiet machine. The load average is recorded with each figure
(the machine is shared). Writes first-edit.json and first-edit.md.

    python benchmarks/first_edit.py                      # timing and quality
    python benchmarks/first_edit.py --suites timing --runs 3 --fresh
    python benchmarks/first_edit.py --suites warm
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import DATA  # noqa: E402

log = logging.getLogger("first_edit")

OUT = ROOT / "benchmarks" / "results"
COMMAND = ["edit", "--method", "rome", "--prompt", "{} is located in the city of", "--subject", "The Eiffel Tower",
           "--target", "Rome"]
WIKITEXT_KEY = "quality/counterfact/smollm2-135m/rome/single-1"
METRICS = ("reliability", "generality", "locality")
TOLERANCE = 0.02
SAMPLING = "sampling corpus:   0%"  # the start of the corpus sampler's progress bar (editors.corpus)
CHUNK = 5


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def machine() -> dict:
    info = {"cpus": os.cpu_count(), "platform": platform.platform()}
    try:
        info["commit"] = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                        text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "editors", "edit_serve"],
                               capture_output=True, text=True, check=True).stdout.split("\n")
        info["uncommitted"] = sorted(line[3:] for line in dirty if line.strip())
    except (OSError, subprocess.CalledProcessError):
        pass
    return info


def save(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "first-edit.json.tmp"
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(out / "first-edit.json")
    (out / "first-edit.md").write_text(render(results))


# --- timing ------------------------------------------------------------------------------------


def _children_cpu() -> float:
    """User + system CPU seconds of finished child processes (the edit's own work, whatever
    else loads the machine)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def fresh_cache(models: Path, workdir: Path) -> dict:
    """The environment of a fresh EDIT_SERVE_CACHE under `workdir` whose models/ links to the
    converted model: statistics start empty."""
    cache = workdir / "cache"
    cache.mkdir(parents=True)
    (cache / "models").symlink_to(models, target_is_directory=True)
    return {**os.environ, "EDIT_SERVE_CACHE": str(cache), "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def readme_edit(env: dict, workdir: Path) -> dict:
    """The README's first edit as its own process: its wall and CPU seconds and what it printed."""
    before, cpu = load(), _children_cpu()
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "edit_serve", *COMMAND, "-o", str(workdir / "eiffel.safetensors")],
                         capture_output=True, text=True, env=env, timeout=3600)
    seconds = time.perf_counter() - started
    cpu = _children_cpu() - cpu
    if out.returncode != 0:
        raise SystemExit(f"the first edit failed: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else ''}")
    return {"seconds": round(seconds, 2), "cpu_seconds": round(cpu, 2), "load_before": before, "load_after": load(),
            "stdout": out.stdout.strip()[-500:], "samplings": out.stderr.count(SAMPLING),
            "at": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def timed_run(models: Path, workdir: Path) -> dict:
    """One first edit in a fresh cache."""
    env = fresh_cache(models, workdir)
    run = readme_edit(env, workdir)
    run["stats_files"] = sorted(p.name for p in (Path(env["EDIT_SERVE_CACHE"]) / "stats").rglob("*.safetensors"))
    return run


def warm_run(models: Path, workdir: Path, order: str) -> dict:
    """The README's first edit beside `serve --warm-editor` on a fresh cache: `order` "after"
    (once the editor is warm) or "at once" (as soon as the server answers)."""
    from tests.servers import run_server

    env = fresh_cache(models, workdir)
    started = time.perf_counter()

    def warm_seconds(server) -> float:
        """Wait until the server's editor is warm; the seconds the warm-up took."""
        while "the editor is warm (" not in server.output():
            if "warming the editor failed" in server.output() or time.perf_counter() - started > 1800:
                raise SystemExit(f"the editor did not get warm:\n{server.output()[-2000:]}")
            time.sleep(0.2)
        return float(server.output().split("the editor is warm (")[1].split(" s)")[0])

    with run_server(workdir / "store", "--no-probes", "--warm-editor", env=env) as server:
        ready = time.perf_counter() - started
        if order == "after":
            warm_seconds(server)
        run = readme_edit(env, workdir)
        run.update(order=order, server_ready_seconds=round(ready, 2), warm_seconds=warm_seconds(server),
                   samplings=server.output().count(SAMPLING) + run["samplings"])
    return run


def run_timing(results: dict, runs: int, out: Path) -> None:
    from edit_serve.models import cache_dir

    models = cache_dir() / "models"
    if not any(models.glob("*/model.safetensors")):
        raise SystemExit(f"no converted model in {models}: run `make serve` (or any edit) once first")
    timing = results.setdefault("timing", {"command": "edit_serve " + shlex.join(COMMAND), "runs": []})
    while len(timing["runs"]) < runs:
        log.info("first edit, run %d of %d (load %s)", len(timing["runs"]) + 1, runs, load())
        with tempfile.TemporaryDirectory(prefix="edit-serve-first-edit-") as tmp:
            timing["runs"].append(timed_run(models, Path(tmp)))
        log.info("%.1f s", timing["runs"][-1]["seconds"])
        timing["median_seconds"] = statistics.median(r["seconds"] for r in timing["runs"])
        save(results, out)


def run_warm(results: dict, runs: int, out: Path) -> None:
    from edit_serve.models import cache_dir

    models = cache_dir() / "models"
    warm = results.setdefault("warm", {"command": "edit_serve " + shlex.join(COMMAND), "runs": []})
    for order in ("after", "at once"):
        while sum(r["order"] == order for r in warm["runs"]) < runs:
            log.info("first edit beside a warming server (%s), load %s", order, load())
            with tempfile.TemporaryDirectory(prefix="edit-serve-warm-") as tmp:
                warm["runs"].append(warm_run(models, Path(tmp), order))
            log.info("%.1f s", warm["runs"][-1]["seconds"])
            warm["median_seconds"] = {o: statistics.median(r["seconds"] for r in warm["runs"] if r["order"] == o)
                                      for o in ("after", "at once") if any(r["order"] == o for r in warm["runs"])}
            save(results, out)


# --- quality -------------------------------------------------------------------------------------


def run_quality(results: dict, n: int, out: Path, config: dict) -> None:
    import torch

    from edit_serve.evaluation import EvalSettings, evaluate, read_records
    from edit_serve.evaluation.harness import summarize
    from edit_serve.models import load_model
    from edit_serve.profiles import get_profile

    quality = results.setdefault("quality", {"n": n, "config": config, "chunks": {}})
    if quality["n"] != n or quality["config"] != config:
        raise SystemExit("first-edit.json holds a quality run with other settings: pass --fresh")
    records = read_records(DATA / "counterfact.jsonl", n)
    lm = None
    for start in range(0, n, CHUNK):
        key = f"{start}-{min(start + CHUNK, n)}"
        if key in quality["chunks"]:
            continue
        if lm is None:
            lm = load_model(get_profile("smollm2-135m"))
            log.info("torch threads %d, load %s", torch.get_num_threads(), load())
        before, started = load(), time.perf_counter()
        result = evaluate(lm.model, lm.tokenizer, lm.profile, "rome", records[start:start + CHUNK], config,
                          EvalSettings(mode="single", fluency_tokens=0))
        quality["chunks"][key] = {"rows": [{k: r.get(k) for k in (*METRICS, "id", "edit_seconds")}
                                           for r in result["rows"]],
                                  "seconds": round(time.perf_counter() - started, 1), "load_before": before,
                                  "load_after": load()}
        rows = [r for c in quality["chunks"].values() for r in c["rows"]]
        quality["figures"] = {m: v for m, v in summarize(rows).items() if m in METRICS}
        quality["records_done"] = len(rows)
        log.info("records %s: %s", key, quality["figures"])
        save(results, out)


def compare(results: dict, out: Path) -> None:
    """The default statistics' figures next to WikiText's on the same records (all 100, or the
    ones done so far: the reference run's per-record rows are in editing/)."""
    quality = results.get("quality", {})
    path = out / "editing.json"
    reference = json.loads(path.read_text()).get(WIKITEXT_KEY) if path.is_file() else None
    if reference is None or not quality.get("records_done"):
        return
    from edit_serve.evaluation.harness import summarize

    rows = {r["id"]: r for r in json.loads((out / reference["full_result"]).read_text())["rows"]}
    done = [r["id"] for c in quality["chunks"].values() for r in c["rows"]]
    same = summarize([rows[i] for i in done if i in rows])
    results["wikitext"] = {m: same[m] for m in METRICS} | {"corpus": reference["editor_config"]["stats_corpus"],
                                                           "records": len(done)}
    results["difference"] = {m: round(quality["figures"][m] - same[m], 4) for m in METRICS}
    results["within_tolerance"] = all(abs(d) <= TOLERANCE for d in results["difference"].values())


# --- report ---------------------------------------------------------------------------------------


def render(results: dict) -> str:
    from editors.stats import StatsConfig

    defaults = StatsConfig()
    lines = ["# First edit from an empty statistics cache", "",
             "Written by `benchmarks/first_edit.py`. The machine is shared: the load average (1, 5, 15 min) is "
             "recorded before and after every figure; rerun on a quiet machine for clean timings.", "",
             f"Default statistics: corpus `{defaults.corpus}`, {defaults.samples} windows of "
             f"{defaults.length} tokens, shrinkage {defaults.shrinkage:g}.", ""]
    timing = results.get("timing")
    if timing:
        lines += ["## Wall time of the README's first edit", "", f"`{timing['command']} -o eiffel.safetensors`, "
                  "model converted, statistics cache empty.", "",
                  "| run | wall seconds | CPU seconds | load before | load after | recorded |",
                  "|---:|---:|---:|---|---|---|"]
        for i, r in enumerate(timing["runs"], 1):
            lines.append(f"| {i} | {r['seconds']:.1f} | {r.get('cpu_seconds', float('nan')):.1f} | "
                         f"{r['load_before']} | "
                         f"{r['load_after']} | {r['at']} |")
        if timing["runs"]:
            cpu = statistics.median(r.get("cpu_seconds", float("nan")) for r in timing["runs"])
            lines += ["", f"Median: **{timing['median_seconds']:.1f} s** wall (bar: 180 s on 2 cores), {cpu:.1f} CPU "
                          "seconds (user + system of the edit process: on 2 idle cores its wall time lies "
                          "between half of that and "
                          "all of it)."]
        lines.append("")
    warm = results.get("warm")
    if warm and warm["runs"]:
        lines += ["## The same edit beside `serve --warm-editor`", "",
                  "A server started with `--warm-editor` on an empty statistics cache (model converted) computes the "
                  "default statistics of a first rome / memit / alphaedit edit in its editor process. The edit runs "
                  "once the server says its editor is warm (after), or as soon as the server answers (at once: it "
                  "waits for the warm-up's statistics instead of computing them too).", "",
                  "| order | edit wall seconds | server answering after (s) | warm-up (s) | corpus sampled | "
                  "load before | recorded |", "|---|---:|---:|---:|---:|---|---|"]
        for r in warm["runs"]:
            lines.append(f"| {r['order']} | {r['seconds']:.1f} | {r['server_ready_seconds']:.1f} | "
                         f"{r['warm_seconds']:.1f} | {r['samplings']}x | {r['load_before']} | {r['at']} |")
        lines += ["", "Median edit wall time: " + ", ".join(f"{o} **{m:.1f} s**"
                                                             for o, m in warm["median_seconds"].items()) + ".", ""]
    quality = results.get("quality")
    if quality and quality.get("figures"):
        lines += ["## Dev CounterFact table (ROME, single edits)", "",
                  f"{quality['records_done']} of {quality['n']} records done.", "",
                  "| statistics | reliability | generality | locality |", "|---|---:|---:|---:|",
                  "| default | " + " | ".join(f"{quality['figures'][m]:.3f}" for m in METRICS) + " |"]
        if "wikitext" in results:
            lines.append(f"| WikiText (editing.json, the same {results['wikitext']['records']} records) | "
                         + " | ".join(f"{results['wikitext'][m]:.3f}" for m in METRICS)
                         + " |")
            lines.append("| difference | " + " | ".join(f"{results['difference'][m]:+.3f}" for m in METRICS) + " |")
            lines += ["", f"Within {TOLERANCE} on the {results['wikitext']['records']} records done: "
                          f"**{'yes' if results['within_tolerance'] else 'no'}**."]
        loads = [c["load_before"] for c in quality["chunks"].values()]
        lines += ["", f"Load average at the start of each chunk of {CHUNK} records: {loads}."]
    lines += ["", f"Machine: {results.get('machine')}", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--suites", nargs="+", choices=["timing", "warm", "quality"], default=["timing", "warm", "quality"])
    p.add_argument("--runs", type=int, default=3, help="timed first edits; the median is reported")
    p.add_argument("--n", type=int, default=100, help="CounterFact records of the quality table")
    p.add_argument("--config", default="{}", help="ROME settings for the quality table (default: the defaults)")
    p.add_argument("--fresh", action="store_true", help="discard saved results and measure again")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = args.out / "first-edit.json"
    results = {} if args.fresh or not path.is_file() else json.loads(path.read_text())
    results["machine"] = machine()
    if "timing" in args.suites:
        run_timing(results, args.runs, args.out)
    if "warm" in args.suites:
        run_warm(results, args.runs, args.out)
    if "quality" in args.suites:
        run_quality(results, args.n, args.out, json.loads(args.config))
    compare(results, args.out)
    save(results, args.out)
    print(render(results))


if __name__ == "__main__":
    main()
