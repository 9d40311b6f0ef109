"""Markdown tables and a PNG chart from the entries of benchmarks/results/editing.json."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

METRICS = ("reliability", "generality", "locality", "portability")
#: issue 3's acceptance bars: (suite, method, mode or device kind) -> {figure: (comparison, bound)}; the quality
#: bars are set on CounterFact only (zsRE and the sequential runs are reported without a bar)
TARGETS = {
    ("quality", "rome", "single", "counterfact.jsonl"): {"reliability": (">=", 0.95), "locality": (">=", 0.90)},
    ("quality", "memit", "batch", "counterfact.jsonl"): {"reliability": (">=", 0.90), "locality": (">=", 0.85)},
    ("timing", "rome", "cpu"): {"seconds_per_edit": ("<=", 20.0)},
    ("timing", "memit", "cpu"): {"seconds_per_edit": ("<=", 20.0)},
    ("timing", "rome", "cuda"): {"seconds_per_edit": ("<=", 2.0)},  # GPT-J-6B size on an H100
}


def f(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def mib(value) -> str:
    return "-" if value is None else f"{value / 2**20:,.0f} MiB"


def _pre_post(entry: dict, metric: str) -> str:
    pre = entry.get("pre", {}).get(metric)
    return f(entry.get(metric)) if pre is None else f"{f(pre, 2)} → {f(entry.get(metric))}"


def corpus_label(corpus: str) -> str:
    """A statistics corpus as tables and result keys name it: a file by its name, else as given."""
    return Path(corpus).name if os.sep in corpus else corpus


def _where(entry: dict) -> str:
    m = entry.get("machine", {})
    return m.get("gpu") or f"{m.get('cpus')} CPUs, {m.get('torch_threads')} threads"


def quality_tables(entries: dict, suite: str) -> list[str]:
    lines: list[str] = []
    rows = [e for k, e in entries.items() if k.startswith(suite + "/")]
    for data in sorted({e["data"] for e in rows}):
        lines += [f"\n### {data}\n",
                  "| model | method | mode | records | reliability | generality | locality | portability | fluency "
                  "| s/edit | peak memory | recorded |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for e in sorted((e for e in rows if e["data"] == data), key=lambda e: (e["model"], e["method"])):
            mode = e["mode"] if e["mode"] == "single" else f"{e['mode']}, {e['batch_size']} per patch"
            lines.append(
                f"| {e['model']} | {e['method']} | {mode} | {e['n']} | "
                + " | ".join(_pre_post(e, m) for m in (*METRICS, "fluency"))
                + f" | {f(e.get('seconds_per_edit'), 2)} | {mib(e.get('peak_memory_bytes'))} | "
                  f"{e['recorded_at'][:16]} |")
    return lines


def timing_table(entries: dict) -> list[str]:
    rows = [e for k, e in entries.items() if k.startswith("timing/")]
    if not rows:
        return []
    lines = ["\n## Speed and memory (statistics cached)\n",
             "Median of the runs; each run computes patches for the first records of counterfact.jsonl "
             "(single-edit methods one record per patch, MEMIT one patch for all), after one untimed warm-up edit. "
             "Peak memory on a GPU is torch.cuda.max_memory_allocated; on the CPU it is the process's peak "
             "resident memory (model included; 'before' is the resident memory before editing).\n",
             "| model | parameters | where | method | records per run | runs | s/edit (median) | s/edit (each run) "
             "| peak memory (median) | before | recorded |",
             "|---|---:|---|---|---:|---:|---:|---|---:|---:|---|"]
    for e in sorted(rows, key=lambda e: (e["model"], e["machine"].get("device", ""), e["method"])):
        each = ", ".join(f(r["seconds_per_edit"], 2) for r in e["per_run"])
        lines.append(f"| {e['model']} | {e['parameters'] / 1e9:.2f} B | {_where(e)} | {e['method']} | "
                     f"{e['records_per_run']} | {e['runs']} | {f(e['seconds_per_edit'], 2)} | {each} | "
                     f"{mib(e['peak_memory_bytes'])} | {mib(e['baseline_memory_bytes'])} | {e['recorded_at'][:16]} |")
    return lines


def stats_table(entries: dict) -> list[str]:
    rows = [e for k, e in entries.items() if k.startswith("stats/")]
    if not rows:
        return []
    lines = ["\n## Key statistics, computed from scratch\n",
             "| model | where | method | layers | corpus | windows x tokens | seconds |",
             "|---|---|---|---|---|---|---:|"]
    for e in sorted(rows, key=lambda e: (e["model"], e["method"], e["corpus"])):
        lines.append(f"| {e['model']} | {_where(e)} | {e['method']} | {e['layers']} | {corpus_label(e['corpus'])} | "
                     f"{e['samples']} x {e['length']} | {f(e['seconds'], 1)} |")
    return lines


def target_lines(entries: dict) -> list[str]:
    lines = []
    for e in entries.values():
        device = e["machine"].get("device", "cpu").split(":")[0]
        bars = TARGETS.get((e["suite"], e["method"], device) if e["suite"] == "timing"
                           else (e["suite"], e["method"], e.get("mode"), e.get("data")))
        if not bars or (device == "cpu") == e["model"].startswith("random-"):
            continue  # the CPU bars are for the real model, the GPU bar for the full-size random one
        checks = []
        for figure, (op, bound) in bars.items():
            value = e.get(figure)
            ok = value is not None and (value >= bound if op == ">=" else value <= bound)
            checks.append(f"{figure} {f(value, 3)} {op} {bound}: {'met' if ok else 'MISSED'}")
        where = e.get("data", "") + (f", {e['n']} records" if "n" in e else f", {e['records_per_run']} records per run")
        lines.append(f"- {e['suite']} {e['method']} ({e['model']}, {where}): " + "; ".join(checks))
    return ["\n## Acceptance bars of issue 3\n", *sorted(lines)] if lines else []


def markdown(entries: dict) -> str:
    lines = ["# Editing benchmark", "",
             "Written by `benchmarks/editing.py` (each entry records its command and time; see editing.json). "
             "Metrics are token-level top-1 accuracies under teacher forcing, shown as unedited → edited; "
             "locality compares with the unedited model's own predictions; fluency is the weighted 2/3-gram "
             "entropy of greedy generations from the edit prompts. Locality probes differ by data set: CounterFact's "
             "ask other subjects for the edited relation, zsRE's (KnowEdit) ask the edited subject for other "
             "relations, which an edit of the subject's representation (ROME, MEMIT, KN) is bound to disturb."]
    lines += target_lines(entries)
    if any(k.startswith("quality/") for k in entries):
        lines += ["\n## Edit quality"] + quality_tables(entries, "quality")
    if any(k.startswith("sequential/") for k in entries):
        lines += ["\n## Sequential editing (every edit applied, scored at the end)"]
        lines += quality_tables(entries, "sequential")
    lines += timing_table(entries) + stats_table(entries)
    return "\n".join(lines) + "\n"


def _bar_label(entry: dict) -> str:
    """'memit\\nbatch/100\\nN=100': the method, how its records were grouped, how many."""
    mode = {"single": "", "batch": "\nbatch/", "sequential": "\nseq/"}[entry["mode"]]
    return f"{entry['method']}{mode}{entry['batch_size'] if mode else ''}\nN={entry['n']}"


def chart(entries: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # the charts show each method's default settings; the variants ('<method>[...]') stay in the tables
    quality = [e for k, e in entries.items() if k.startswith(("quality/", "sequential/")) and "[" not in e["method"]]
    timing = [e for k, e in entries.items() if k.startswith("timing/")]
    panels = sorted({e["data"] for e in quality})
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(6 * (len(panels) + 1), 4.5), squeeze=False)
    for ax, data in zip(axes[0], panels):
        rows = sorted((e for e in quality if e["data"] == data), key=lambda e: (e["suite"], e["method"]))
        labels = [_bar_label(e) for e in rows]
        width = 0.8 / len(METRICS)
        for i, metric in enumerate(METRICS):
            ax.bar([x + i * width for x in range(len(rows))], [e.get(metric) or 0 for e in rows], width, label=metric)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(rows))], labels, fontsize=8)
        ax.set_ylim(0, 1.2)  # headroom for the legend, which would otherwise hide low bars
        ax.set_title(f"{data} (edited; default settings)")
        ax.legend(fontsize=7, loc="upper center", ncol=len(METRICS))
    ax = axes[0][-1]
    if timing:
        timing.sort(key=lambda e: (e["model"], e["method"]))
        ax.bar(range(len(timing)), [e["seconds_per_edit"] for e in timing], color="gray")
        ax.set_xticks(range(len(timing)), [f"{e['method']}\n{e['model']}\n{_where(e)}" for e in timing], fontsize=7)
        values = [e["seconds_per_edit"] for e in timing]
        if max(values) > 20 * min(values):
            ax.set_yscale("log")
        for x, v in enumerate(values):
            ax.annotate(f"{v:.2f}", (x, v), ha="center", va="bottom", fontsize=8)
        ax.set_ylabel("seconds per edit (median)")
    ax.set_title("speed, statistics cached")
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    os.replace(tmp, path)


def render(entries: dict, md_path: Path, png_path: Path) -> None:
    md_path.write_text(markdown(entries))
    chart(entries, png_path)
