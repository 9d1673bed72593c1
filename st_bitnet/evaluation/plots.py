"""PNG plots of a precision sweep (matplotlib, headless).

- :func:`plot_tradeoff`: average quality vs bits per dimension (log2 axis; bytes per vector on the top axis),
  the teacher's float score as a reference line and its post-hoc quantized scores side by side.
- :func:`plot_sensitivity`: per task type, the score change relative to the model's highest precision.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import Any

from .encoder import FULL_PRECISION_BITS
from .report import short_task_name

TYPE_COLORS = {"STS": "tab:blue", "Classification": "tab:green", "Retrieval": "tab:red"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _null_locator():
    from matplotlib.ticker import NullLocator

    return NullLocator()


def _save(fig, path: str | os.PathLike) -> Path:
    """Lay out, write (creating the folder) and close a figure."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    _pyplot().close(fig)
    return path


def _quantized_points(entry: dict[str, Any]) -> tuple[list[int], list[float]]:
    bits = sorted(int(b) for b in entry["average"] if int(b) != FULL_PRECISION_BITS)
    return bits, [entry["average"][str(b)] for b in bits]


def plot_tradeoff(result: dict[str, Any], path: str | os.PathLike, title: str | None = None) -> Path:
    """Quality (average main score) vs bits per dimension, teacher as reference; saved as PNG at ``path``."""
    plt = _pyplot()
    model, teacher = result["model"], result.get("teacher")
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=130)
    bits, scores = _quantized_points(model)
    ax.plot(bits, scores, "o-", color="tab:blue", lw=2, ms=7, label=f"{model['name']}")
    for b, s in zip(bits, scores):
        ax.annotate(f"{s:.1f}", (b, s), textcoords="offset points", xytext=(0, 8), ha="center", fontsize=8)
    if str(FULL_PRECISION_BITS) in model["average"]:
        ax.axhline(model["average"][str(FULL_PRECISION_BITS)], color="tab:blue", ls=":", lw=1,
                   label=f"{model['name']} float32")
    if teacher:
        t_bits, t_scores = _quantized_points(teacher)
        if t_bits:
            ax.plot(t_bits, t_scores, "s--", color="tab:gray", lw=1.3, ms=5,
                    label=f"teacher {teacher['name']} (post-hoc quantized)")
        if str(FULL_PRECISION_BITS) in teacher["average"]:
            ax.axhline(teacher["average"][str(FULL_PRECISION_BITS)], color="black", ls="--", lw=1.2,
                       label=f"teacher {teacher['name']} float32")
    all_bits = sorted(set(bits) | ({b for b in _quantized_points(teacher)[0]} if teacher else set()))
    ax.set_xscale("log", base=2)
    ax.set_xticks(all_bits)
    ax.set_xticklabels([str(b) for b in all_bits])
    ax.set_xlabel("output precision (bits per dimension)")
    ax.set_ylabel(f"average main score over {len(result['tasks'])} tasks (x100)")
    dimension = model.get("embedding_dim")
    if dimension:
        from matplotlib.ticker import FixedFormatter, FixedLocator, NullLocator

        from ..multi_precision.precision import bytes_per_vector

        # the axis maps bits to payload bits / 8 (monotone, as matplotlib needs); the labels are the stored bytes
        top = ax.secondary_xaxis("top", functions=(lambda b: b * dimension / 8, lambda n: n * 8 / dimension))
        top.xaxis.set_major_locator(FixedLocator([b * dimension / 8 for b in all_bits]))
        top.xaxis.set_major_formatter(FixedFormatter([str(bytes_per_vector(dimension, b)) for b in all_bits]))
        top.xaxis.set_minor_locator(NullLocator())
        top.tick_params(labelsize=8)
        top.set_xlabel(f"bytes per vector ({dimension} dims)")
    ax.xaxis.set_minor_locator(_null_locator())
    ax.margins(x=0.08, y=0.18)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="best", framealpha=0.9)
    ax.set_title(title or "Quality vs storage per output precision", fontsize=11)
    return _save(fig, path)


def type_deltas(entry: dict[str, Any], tasks: list[dict[str, Any]]) -> dict[str, dict[int, float]]:
    """Per task type, mean score change (points) at each quantized precision relative to the highest one."""
    bits, _ = _quantized_points(entry)
    if not bits:
        return {}
    reference = str(max(bits))
    by_type: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for task in tasks:
        ref_score = entry["scores"][reference][task["name"]]["main_score"]
        for b in bits:
            by_type[task["type"]][b].append(entry["scores"][str(b)][task["name"]]["main_score"] - ref_score)
    return {t: {b: sum(v) / len(v) for b, v in per_bits.items()} for t, per_bits in by_type.items()}


def plot_sensitivity(result: dict[str, Any], path: str | os.PathLike, title: str | None = None) -> Path:
    """Per task type (thick) and per task (thin), score change vs the model's highest precision; saved as PNG."""
    plt = _pyplot()
    model = result["model"]
    bits, _ = _quantized_points(model)
    reference = max(bits)
    fig, ax = plt.subplots(figsize=(8.5, 4.8), dpi=130)
    styles = [(":", "v"), ("--", "^"), ("-.", "s"), ((0, (1, 3)), "D")]
    seen_per_type: dict[str, int] = defaultdict(int)
    for task in result["tasks"]:
        ref_score = model["scores"][str(reference)][task["name"]]["main_score"]
        deltas = [model["scores"][str(b)][task["name"]]["main_score"] - ref_score for b in bits]
        line_style, marker = styles[seen_per_type[task["type"]] % len(styles)]
        seen_per_type[task["type"]] += 1
        ax.plot(bits, deltas, linestyle=line_style, marker=marker, ms=3.5, lw=1, alpha=0.75,
                color=TYPE_COLORS.get(task["type"], "tab:purple"), label=short_task_name(task["name"]))
    for task_type, per_bits in type_deltas(model, result["tasks"]).items():
        ax.plot(bits, [per_bits[b] for b in bits], "o-", lw=2.2, ms=6,
                color=TYPE_COLORS.get(task_type, "tab:purple"), label=f"{task_type} (mean)")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(bits)
    ax.set_xticklabels([str(b) for b in bits])
    ax.set_xlabel("output precision (bits per dimension)")
    ax.xaxis.set_minor_locator(_null_locator())
    ax.set_ylabel(f"score change vs {reference}-bit (points, x100 scale)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), title="thick: task type mean",
              title_fontsize=8)
    ax.set_title(title or f"Per-task-type sensitivity to output precision: {model['name']}", fontsize=11)
    return _save(fig, path)
