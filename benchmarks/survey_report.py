"""The survey report: the seed's tables beside ours, row by row, the charts of Fig. 5, 6 and 7,
and per method where our figures agree with the seed's conclusions (survey.py writes the cells).

The seed's figures are facts quoted from this project's sources (SEED: each says where); a figure
those sources do not hold is shown as "not quoted", never filled in. The conclusions (CLAIMS) are
the seed's statements; whether ours agree is computed from the recorded cells each time the
report is rendered, never written by hand.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("bench.survey")
QUALITY = ("reliability", "generality", "locality")
DATASETS = ("counterfact", "zsre")
NOTES = "editing-notes.md"  # the project's shared notes (../shared/docs/editing-notes.md)
ISSUE = "issue 17"
NOT_QUOTED = "not quoted"


@dataclass(frozen=True)
class Seed:
    """One figure of the seed survey (GPT-J, percent, or seconds), as a source states it."""

    table: str  # table2, table3, table4
    method: str
    metric: str
    value: float
    data: str | None = None  # None: the source does not name the data set
    bound: str = ""  # "<" when the source gives an upper bound ("under 10%")
    source: str = NOTES
    note: str = ""


#: every seed figure this repository can source; the survey's T5-XL figures are in none of them
SEED = [
    Seed("table2", "serac", "reliability", 99.8, "counterfact"),
    Seed("table2", "serac", "generality", 99.4, "counterfact"),
    Seed("table2", "serac", "locality", 98.9, "counterfact"),
    Seed("table3", "serac", "portability", 10.0, bound="<"),
    Seed("table2", "t-patcher", "locality", 8.4, "counterfact"),
    Seed("table2", "calinet", "reliability", 43.6, "counterfact"),
    Seed("table2", "calinet", "generality", 0.7, "counterfact"),
    Seed("table2", "calinet", "locality", 2.7, "counterfact"),
    Seed("table2", "ke", "reliability", 13.4),
    Seed("table2", "ke", "generality", 11.0),
    Seed("table2", "ke", "locality", 94.4),
    Seed("table4", "t-patcher", "seconds_per_edit", 186.0, note="186 s per edit, on V100s"),
    Seed("table4", "mend", "seconds_per_edit", 0.05, note="0.05 s per edit, after 7 h of training on 3 V100"),
]

#: a peer measurement on this project's model (not the seed): EasyEdit, 20 CounterFact records
PEER = {"rome": (1.00, 0.70, 0.915, 0.32), "memit": (0.45, 0.40, 0.93, 0.24)}


def pct(value) -> str:
    return "-" if value is None else f"{value:.1f}"


def f3(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def mib(value) -> str:
    return "-" if value is None else f"{value / 2**20:,.0f} MiB"


# --- the recorded cells ---------------------------------------------------------------------


def load_cells(folder: Path) -> dict[str, dict]:
    """Every cell file in `folder` by key (a damaged file is left out)."""
    cells = {}
    for path in sorted(Path(folder).glob("*.json")):
        try:
            entry = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        cells[entry.get("key", path.stem)] = entry
    return cells


class View:
    """Lookups over the cells (`registered`: the methods the registry knows; None: all)."""

    def __init__(self, cells: dict[str, dict], registered: Iterable[str] | None = None):
        self.cells = cells
        self.registered = None if registered is None else set(registered)

    def why(self, part: str, method: str, data: str, size: int | None = None) -> str | None:
        """Why a method has no figures for a cell, or None when it has them."""
        cell = self.cell(part, method, data, size)
        if cell is None and self.registered is not None and method not in self.registered:
            return "not registered here (no editor of that name yet)"
        return status(cell)

    def cell(self, part: str, method: str, data: str, size: int | None = None) -> dict | None:
        key = "__".join([part, data, method] + ([str(size)] if size is not None else []))
        return self.cells.get(key)

    def result(self, part: str, method: str, data: str, size: int | None = None) -> dict | None:
        c = self.cell(part, method, data, size)
        return c["result"] if c and c.get("status") == "done" else None

    def curves(self, part: str, method: str) -> list[tuple[str, list[tuple[int, dict]]]]:
        """[(data set, [(size, result)])] of a method's batch or sequential cells, one curve per
        data set (the Table 2 sets first, e.g. counterfact before counterfact_batch); a batch
        curve starts with the data set's table2 cell (one record per patch)."""
        done = [c for c in self.cells.values() if c.get("part") == part and c.get("method") == method
                and c.get("status") == "done"]
        order = lambda d: (DATASETS.index(d) if d in DATASETS else len(DATASETS), d)  # noqa: E731
        datas = sorted({c["data"] for c in done}, key=order)
        if not datas:
            datas = [d for d in DATASETS if self.result("table2", method, d)][:1]
        out = []
        for data in datas:
            points = sorted(((c["size"], c["result"]) for c in done if c["data"] == data), key=lambda p: p[0])
            if part == "batch" and (single := self.result("table2", method, data)):
                points = [(1, single)] + [p for p in points if p[0] != 1]
            if points:
                out.append((data, points))
        return out

    def curve(self, part: str, method: str) -> tuple[str | None, list[tuple[int, dict]]]:
        """The method's first curve (`curves`), or (None, [])."""
        return next(iter(self.curves(part, method)), (None, []))

    def measured(self, part: str, data: str) -> dict[str, dict]:
        return {c["method"]: c["result"] for c in self.cells.values()
                if c.get("part") == part and c.get("data") == data and c.get("status") == "done"}

    def reference(self, data: str) -> tuple[dict | None, int | None]:
        """The unedited model's figures on `data` (any method's cell: they are measured before
        the edits, on the same records) and the number of records."""
        for c in self.cells.values():
            if c.get("part") in ("table2", "mquake") and c.get("data") == data and c.get("status") == "done":
                return c["result"].get("pre"), c["result"].get("n")
        return None, None


def status(cell: dict | None) -> str | None:
    """Why a cell has no figures, or None when it has them."""
    if cell is None:
        return "not measured yet"
    if cell.get("status") == "not_applicable":
        return f"cannot apply: {cell.get('reason')}"
    if cell.get("status") == "failed":
        return f"failed: {cell.get('reason')}"
    return None


def triple(result: dict | None, metrics: Iterable[str], suffix: str = "") -> str:
    return " / ".join(f3(result.get(m + suffix)) if result else "-" for m in metrics)


def seed_figures(method: str, table: str, metrics: Iterable[str], data: str | None) -> str:
    found = {s.metric: s for s in SEED if s.method == method and s.table == table and s.data == data}
    if not any(m in found for m in metrics):
        return NOT_QUOTED
    return " / ".join(f"{found[m].bound}{pct(found[m].value)}" if m in found else "n.q." for m in metrics)


# --- tables ----------------------------------------------------------------------------------


def table2(view: View, methods: list[str]) -> list[str]:
    lines = ["\n## Table 2: reliability / generality / locality, single edits\n",
             "Seed: GPT-J, percent (T5-XL: not quoted in this project's sources). Ours: the first N records, one "
             "edit per patch, each from the unedited model; teacher-forced as the survey measures, and on the free "
             "greedy answer. Locality of the unedited model is 1 by definition (it is the reference).\n"]
    for data in DATASETS:
        pre, n = view.reference(data)
        lines += [f"\n### {data}\n",
                  "| method | seed GPT-J | seed T5-XL | ours, teacher-forced | ours, free greedy | records |",
                  "|---|---|---|---|---|---:|"]
        if pre is not None:
            lines.append(f"| *unedited (reference)* | - | - | {f3(pre.get('reliability'))} / "
                         f"{f3(pre.get('generality'))} / 1 "
                         f"| {f3(pre.get('reliability_greedy'))} / {f3(pre.get('generality_greedy'))} / 1 | {n} |")
        for method in methods:
            cell = view.cell("table2", method, data)
            result = view.result("table2", method, data)
            ours = (f"{triple(result, QUALITY)} | {triple(result, QUALITY, '_greedy')} | {result['n']}"
                    if result else f"{view.why('table2', method, data)} | | ")
            lines.append(f"| {method} | {seed_figures(method, 'table2', QUALITY, data)} | {NOT_QUOTED} | {ours} |")
            if data == "counterfact" and method in PEER:
                lines.append(f"| {method}: EasyEdit on SmolLM2-135M, 20 records ({NOTES}; a peer, not the seed) "
                             f"| - | - | {' / '.join(f'{v:.3f}' for v in PEER[method][:3])} | - | 20 |")
    unnamed = sorted({s.method for s in SEED if s.table == "table2" and s.data is None})
    for method in unnamed:
        lines.append(f"\nQuoted without its data set ({NOTES}): {method} on GPT-J "
                     f"{seed_figures(method, 'table2', QUALITY, None)}.")
    return lines


def table3(view: View, methods: list[str]) -> list[str]:
    lines = ["\n## Table 3: portability\n",
             "Seed: GPT-J, percent. Ours: the portability questions of the Table 2 cells (CounterFact: one-hop and "
             "subject-replace; zsRE: one question each) and MQuAKE-CF's multi-hop questions (each case's edits in one "
             "patch), teacher-forced / free greedy (any alias counts).\n",
             "| method | seed GPT-J | CounterFact | zsRE | MQuAKE multi-hop | MQuAKE reliability |",
             "|---|---|---|---|---|---|"]
    refs = [view.reference(d)[0] for d in (*DATASETS, "mquake")]
    if any(refs):
        cols = [f"{f3(r.get('portability'))} / {f3(r.get('portability_greedy'))}" if r else "-" for r in refs]
        lines.append(f"| *unedited (reference)* | - | {' | '.join(cols)} | - |")
    for method in methods:
        cols = []
        for part, data in (("table2", "counterfact"), ("table2", "zsre"), ("mquake", "mquake")):
            r = view.result(part, method, data)
            cols.append(f"{f3(r.get('portability'))} / {f3(r.get('portability_greedy'))}" if r
                        else view.why(part, method, data))
        mq = view.result("mquake", method, "mquake")
        cols.append(f"{f3(mq.get('reliability'))} / {f3(mq.get('reliability_greedy'))}" if mq else "-")
        lines.append(f"| {method} | {seed_figures(method, 'table3', ('portability',), None)} | {' | '.join(cols)} |")
    return lines


def table4(view: View, methods: list[str]) -> list[str]:
    lines = ["\n## Table 4: wall time for 10 edits\n",
             "Ours: computing each patch (not applying it), each edit from the unedited model, statistics and "
             "checkpoints cached, after one untimed warm-up edit; fewer than 10 edits timed are scaled to 10. "
             "Training: the train cell's seconds per step of the editor network (Fig. 5; a usable editor takes "
             "thousands of steps). Other work on the machine slows the timings: the load average (1 minute) when "
             "the cell was recorded is given.\n",
             "| method | seed GPT-J | ours: s for 10 edits | s per edit | edits timed | threads | "
             "load average | training |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for method in methods:
        seed = "; ".join(s.note for s in SEED if s.method == method and s.table == "table4") or NOT_QUOTED
        r = view.result("time", method, "counterfact")
        train = view.result("train", method, "counterfact")
        training = f"{train['seconds_per_step']:.2f} s per step ({train['steps']} steps timed)" if train else "-"
        if r:
            load = (view.cell("time", method, "counterfact").get("machine") or {}).get("load_average") or ["-"]
            lines.append(f"| {method} | {seed} | {r['seconds_for_10_edits']:.1f} | {r['seconds_per_edit']:.2f} | "
                         f"{r['edits_timed']} | {r.get('torch_threads', '-')} | {load[0]} | {training} |")
        else:
            lines.append(f"| {method} | {seed} | {view.why('time', method, 'counterfact')} | | | | | {training} |")
    return lines


def figure5(view: View, methods: list[str]) -> list[str]:
    lines = ["\n## Fig. 5: peak memory while editing (and training)\n",
             "Seed: GPU memory on GPT-J, not quoted. Ours on the CPU: the process's peak resident memory while the "
             "10 timed edits were computed (model included; 'before' is the resident memory before them); on a GPU "
             "`torch.cuda.max_memory_allocated`. Training: `--train-steps` steps of a trained method's editor network "
             "(editors.training, on counterfact_batch.jsonl without the evaluated records; survey.py --train), "
             "with the same meter"
             + ("" if any(c.get("part") == "train" for c in view.cells.values()) else "; none was measured") +
             ". Chart: fig5-memory.png.\n",
             "| method | peak while editing | before | added by editing | peak while training |",
             "|---|---:|---:|---:|---:|"]
    for method in methods:
        r = view.result("time", method, "counterfact")
        train = view.result("train", method, "counterfact")
        tr = mib(train["peak_memory_bytes"]) if train else (status(view.cell("train", method, "counterfact"))
                                                            if view.cell("train", method, "counterfact") else "-")
        if r:
            lines.append(f"| {method} | {mib(r['peak_memory_bytes'])} | {mib(r['baseline_memory_bytes'])} | "
                         f"{mib(r['peak_memory_bytes'] - r['baseline_memory_bytes'])} | {tr} |")
        else:
            lines.append(f"| {method} | {view.why('time', method, 'counterfact')} | | | {tr} |")
    return lines


def curve_table(view: View, methods: list[str], part: str) -> list[str]:
    batch = part == "batch"
    title = ("\n## Fig. 6: batch editing (records per patch)\n" if batch
             else "\n## Fig. 7: sequential editing (edits applied one after another, scored at the end)\n")
    lines = [title, ("Seed: not quoted. Ours: K records per patch over the first max(N, K) records (K = 1: Table 2's "
                     "cell). "
                     "Chart: fig6-batch.png." if batch else
                     "Seed: not quoted. Ours: the first K records edited one after another (each edit computed on "
                     "top of the ones before), every record scored after the last. Chart: fig7-sequential.png "
                     "(log x)."),
             "\n| method | data | K | reliability / generality / locality, teacher-forced | free greedy | records |",
             "|---|---|---:|---|---|---:|"]
    for method in methods:
        curves = view.curves(part, method)
        missing = [c for c in view.cells.values() if c.get("part") == part and c.get("method") == method
                   and c.get("status") != "done"]
        if not curves and not missing:
            lines.append(f"| {method} | | | {view.why(part, method, 'counterfact', 10)} | | |")
        for data, points in curves:
            for size, r in points:
                lines.append(f"| {method} | {data} | {size} | {triple(r, QUALITY)} | {triple(r, QUALITY, '_greedy')} "
                             f"| {r['n']} |")
        for c in missing:
            lines.append(f"| {method} | {c['data']} | {c['size']} | {status(c)} | | |")
    return lines


def summary_table(view: View, methods: list[str]) -> list[str]:
    """The compact table the README quotes."""
    lines = ["| method | CounterFact rel / gen / loc / port | the same, free greedy | zsRE rel / gen / loc / port "
             "| the same, free greedy | s for 10 edits |", "|---|---|---|---|---|---:|"]
    metrics = (*QUALITY, "portability")
    for method in methods:
        cols = []
        for data in DATASETS:
            r = view.result("table2", method, data)
            cols += [triple(r, metrics), triple(r, metrics, "_greedy")] if r else [view.why("table2", method, data), ""]
        t = view.result("time", method, "counterfact")
        cols.append(f"{t['seconds_for_10_edits']:.1f}" if t else "-")
        lines.append(f"| {method} | " + " | ".join(cols) + " |")
    return lines


# --- the seed's conclusions, checked against our figures ----------------------------------------


def level(value: float) -> str:
    """A coarse verdict on a 0-1 figure, the grain at which a 135M model can agree with GPT-J."""
    return "high" if value >= 0.8 else "low" if value < 0.3 else "middling"


Check = Callable[[View, str], tuple[bool | None, str]]


@dataclass(frozen=True)
class Claim:
    methods: tuple[str, ...]
    text: str
    source: str
    check: Check


def check_level(seed: Seed) -> Check:
    def check(view: View, method: str):
        datasets = [seed.data] if seed.data else list(DATASETS)
        verdicts, evidence = [], []
        for data in datasets:
            r = view.result("table2", method, data)  # Table 3's portability is measured in the same cells
            if r is None or r.get(seed.metric) is None:
                continue
            ours = r[seed.metric]
            if seed.bound == "<":
                verdicts.append(ours < seed.value / 100)
            else:
                verdicts.append(level(ours) == level(seed.value / 100))
            evidence.append(f"{data} {ours:.3f} ({level(ours)}; free greedy {f3(r.get(seed.metric + '_greedy'))})")
        if not verdicts:
            return None, "not measured yet"
        return all(verdicts), "; ".join(evidence)

    return check


def best_on(metric: str, group: tuple[str, ...]) -> Check:
    def check(view: View, method: str):
        verdicts, evidence = [], []
        for data in DATASETS:
            measured = {m: r[metric] for m, r in view.measured("table2", data).items() if r.get(metric) is not None}
            if method not in measured:
                continue
            if len(measured) < 3:
                evidence.append(f"{data}: only {len(measured)} methods measured, too few to rank")
                continue
            ranking = sorted(measured, key=measured.get, reverse=True)
            rank = ranking.index(method) + 1
            verdicts.append(rank <= len(group))
            evidence.append(f"{data}: rank {rank} of {len(ranking)} ({measured[method]:.3f}; best "
                            f"{ranking[0]} {measured[ranking[0]]:.3f})")
        if not verdicts:
            return None, "; ".join(evidence) or "not measured yet"
        return all(verdicts), "; ".join(evidence)

    return check


def sequential_trend(declines: bool, metric: str = "reliability", drop: float = 0.1) -> Check:
    def check(view: View, method: str):
        data, points = view.curve("sequential", method)
        points = [(k, r[metric]) for k, r in points if r.get(metric) is not None]
        if len(points) < 2:
            return None, "fewer than two sequential stream lengths measured"
        (k0, first), (k1, last) = points[0], points[-1]
        evidence = f"{metric} {first:.3f} after {k0} edit(s), {last:.3f} after {k1} ({data})"
        return (first - last >= drop) == declines, evidence

    return check


def speed(slow: bool) -> Check:
    def check(view: View, method: str):
        timed = {m: r["seconds_per_edit"] for m, r in view.measured("time", "counterfact").items()}
        if method not in timed:
            return None, "not timed yet"
        if len(timed) < 3:
            return None, f"{timed[method]:.2f} s per edit; only {len(timed)} methods timed, too few to compare"
        median = statistics.median(timed.values())
        ranking = sorted(timed, key=timed.get, reverse=True)
        evidence = (f"{timed[method]:.2f} s per edit, {ranking.index(method) + 1} of {len(timed)} from the slowest "
                    f"(median {median:.2f})")
        return (timed[method] > median) == slow, evidence

    return check


CLAIMS = [
    Claim(("rome", "memit"), "ROME and MEMIT are the best on portability (checked per method: among the two best "
          "of the methods measured?)", ISSUE, best_on("portability", ("rome", "memit"))),
    Claim(("mend",), "MEND declines under sequential edits", ISSUE, sequential_trend(declines=True)),
    Claim(("serac",), "SERAC holds up under sequential edits (edits go to a memory; the base model is untouched)",
          NOTES, sequential_trend(declines=False)),
    Claim(("t-patcher",), "T-Patcher is slow to edit (186 s per edit on GPT-J)", NOTES, speed(slow=True)),
    Claim(("mend",), "MEND edits fast once trained (0.05 s per edit)", NOTES, speed(slow=False)),
] + [Claim((s.method,), f"{s.metric} {s.bound}{pct(s.value)} on GPT-J"
           + (f" {s.data}" if s.data else " (data set not named)")
           + ("" if s.bound else f": {level(s.value / 100)}"), s.source, check_level(s))
     for s in SEED if s.table in ("table2", "table3")]


def conclusions(view: View, methods: list[str]) -> list[str]:
    lines = ["\n## Where our figures agree with the seed's conclusions\n",
             "Generated from the figures above each time the report is rendered. Levels of a 0-1 figure: high >= 0.8, "
             "low < 0.3, else middling; the seed's teacher-forced figures are compared with ours teacher-forced (the "
             "free greedy figure is given beside). Rankings need at least 3 measured methods.\n"]
    for method in methods:
        claims = [c for c in CLAIMS if method in c.methods]
        if not claims:
            lines.append(f"- **{method}**: no seed figure or conclusion about it is quoted in this project's sources.")
            continue
        for claim in claims:
            verdict, evidence = claim.check(view, method)
            word = {True: "agrees", False: "does not agree", None: "cannot tell yet"}[verdict]
            lines.append(f"- **{method}**: seed: {claim.text} ({claim.source}). Ours: {evidence}. **{word}**")
    return lines


# --- the whole report ----------------------------------------------------------------------


def methods_of(cells: dict[str, dict], registered: Iterable[str]) -> list[str]:
    """Every registered method, every method with cells, and every method the seed is quoted on."""
    quoted = {s.method for s in SEED} | {m for c in CLAIMS for m in c.methods}
    return sorted(set(registered) | {c["method"] for c in cells.values() if "method" in c} | quoted)


def coverage(cells: dict[str, dict], registered: Iterable[str]) -> list[str]:
    """A banner when the cells are a partial run: fewer records than the protocol's 100, or
    registered methods without Table 2 figures."""
    ns = sorted({c["identity"]["n"] for c in cells.values() if c.get("identity", {}).get("n") is not None})
    without = sorted(m for m in registered if not any(c.get("method") == m and c.get("part") == "table2"
                                                      and c.get("status") in ("done", "not_applicable")
                                                      for c in cells.values()))
    gaps = []
    if not ns or min(ns) < 100:
        gaps.append(f"records per data set: {', '.join(map(str, ns)) or 'none'} (the protocol's is 100)")
    if without:
        gaps.append(f"registered methods not measured yet: {', '.join(without)}")
    return ["", f"**Partial run.** {'; '.join(gaps)}. The figures below are what was measured; the rest "
            "is marked as such."] if gaps else []


def markdown(cells: dict[str, dict], registered: Iterable[str]) -> str:
    registered = list(registered)
    view, methods = View(cells, registered), methods_of(cells, registered)
    models = sorted({c.get("identity", {}).get("model") for c in cells.values()} - {None})
    done = sum(c.get("status") == "done" for c in cells.values())
    lines = ["# The survey's tables on the served model",
             "",
             "Written by `benchmarks/survey.py` (each cell records its command, settings, time and machine: "
             "`cells/*.json`). The seed: Yao et al. 2023, \"Editing Large Language Models: Problems, Methods, and "
             "Opportunities\" (GPT-J and T5-XL). Ours: " + (", ".join(models) or "no model yet") +
             f", {done} of {len(cells)} recorded cells with figures. Every registered method has a row; a row without "
             "figures says why (not measured yet, or the method's one-line reason it cannot apply).",
             *coverage(cells, registered),
             "",
             "Both ways of scoring: **teacher-forced** (the survey's: the target's tokens fed in, top-1 checked per "
             "token; locality: top-1 agreement with the unedited model) and **free greedy** (what a user of the "
             "server reads: the greedy continuation starts with the target or an alias as a whole word; locality: "
             "the greedy continuation is token for token the unedited model's). \"The Mirage of Model Editing\" "
             "(2025) found that teacher forcing overstates success.",
             "",
             "## Summary\n"]
    lines += summary_table(view, methods)
    lines += table2(view, methods) + table3(view, methods) + table4(view, methods) + figure5(view, methods)
    lines += curve_table(view, methods, "batch") + curve_table(view, methods, "sequential")
    lines += conclusions(view, methods)
    return "\n".join(lines) + "\n"


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    fig.savefig(tmp, dpi=110, format="png", bbox_inches="tight")  # with a legend outside the axes
    plt.close(fig)
    os.replace(tmp, path)


def chart_memory(view: View, methods: list[str], path: Path) -> None:
    import matplotlib.pyplot as plt

    rows = [(m, view.result("time", m, "counterfact"), view.result("train", m, "counterfact")) for m in methods]
    rows = [r for r in rows if r[1] or r[2]]
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(rows) + 2), 4.5))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [(r[1] or {}).get("peak_memory_bytes", 0) / 2**20 for r in rows], 0.4,
           label="editing")
    ax.bar([x + 0.2 for x in xs], [(r[2] or {}).get("peak_memory_bytes", 0) / 2**20 for r in rows], 0.4,
           label="training")
    baselines = [r[1]["baseline_memory_bytes"] / 2**20 for r in rows if r[1]]
    if baselines:
        ax.axhline(min(baselines), color="gray", linestyle=":", label="before editing")
    ax.set_xticks(list(xs), [r[0] for r in rows], fontsize=8)
    ax.set_ylabel("peak memory (MiB)")
    ax.set_title("Fig. 5: peak memory" + ("" if rows else " (nothing measured yet)"))
    if rows:
        ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def chart_curves(view: View, methods: list[str], part: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(QUALITY), figsize=(5 * len(QUALITY), 4), squeeze=False)
    colors = (plt.rcParams["axes.prop_cycle"].by_key()["color"]
              + ["black", "darkgoldenrod", "navy", "lime"])  # 11+ methods
    for i, method in enumerate(methods):
        color = colors[i % len(colors)]
        for j, (data, points) in enumerate(view.curves(part, method)):
            label = method if j == 0 else f"{method} ({data})"  # another data set: its own marker
            sizes = [k for k, _ in points]
            for ax, metric in zip(axes[0], QUALITY):
                ax.plot(sizes, [r.get(metric) for _, r in points], "o-" if j == 0 else "^-", color=color, label=label)
                greedy = [r.get(metric + "_greedy") for _, r in points]
                if any(g is not None for g in greedy):
                    ax.plot(sizes, greedy, "s--" if j == 0 else "v--", color=color, alpha=0.6,
                            label=f"{label} (free greedy)")
    xlabel = "records per patch" if part == "batch" else "sequential edits"
    for ax, metric in zip(axes[0], QUALITY):
        ax.set_xscale("log")
        ax.set_ylim(-0.02, 1.05)
        ax.set_xlabel(xlabel)
        ax.set_title(metric)
    fig.suptitle("Fig. 6: batch editing" if part == "batch" else "Fig. 7: sequential editing")
    fig.tight_layout()
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:  # beside the panels, not over a curve
        fig.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.0, 0.95), fontsize=7,
                   ncol=1 + len(handles) // 16)
    _save(fig, path)


def render(cells: dict[str, dict], registered: Iterable[str], out: Path) -> None:
    """survey.md and the three charts under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    registered = list(registered)
    view, methods = View(cells, registered), methods_of(cells, registered)
    (out / "survey.md").write_text(markdown(cells, registered))
    try:
        import matplotlib
    except ImportError:
        log.warning("no charts: they need matplotlib (pip install -e '.[bench]')")
        return
    matplotlib.use("Agg")
    chart_memory(view, methods, out / "fig5-memory.png")
    chart_curves(view, methods, "batch", out / "fig6-batch.png")
    chart_curves(view, methods, "sequential", out / "fig7-sequential.png")
