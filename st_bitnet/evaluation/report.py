"""Result files of a precision sweep: the JSON (machine-readable) and a Markdown table (for humans and model cards)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .encoder import FULL_PRECISION_BITS


def short_task_name(name: str) -> str:
    """Column header for a task: ``Banking77Classification`` -> ``Banking77``, ``AmazonCounterfactual...`` -> ``AmazonCF``."""
    name = name.replace("AmazonCounterfactual", "AmazonCF")
    for suffix in ("Classification", "Retrieval"):
        if name.endswith(suffix) and len(name) > len(suffix):
            name = name[: -len(suffix)]
    return name


def precision_label(bits: int | str) -> str:
    """``"32"`` -> ``"fp32"`` (the unquantized float output), else ``"16-bit"``, ``"1-bit"``..."""
    return "fp32" if int(bits) == FULL_PRECISION_BITS else f"{int(bits)}-bit"


def _rows(result: dict[str, Any]) -> list[tuple[str, dict[str, Any], str]]:
    rows = []
    for role in ("model", "teacher"):
        entry = result.get(role)
        if not entry:
            continue
        for bits in entry["scores"]:
            rows.append((role, entry, bits))
    return rows


def format_table(result: dict[str, Any], digits: int = 2) -> str:
    """Markdown table: one row per (model, precision), one column per task, then the average and bytes per vector."""
    task_names = [t["name"] for t in result["tasks"]]
    header = ["Model", "Precision", "Bytes / vector", *map(short_task_name, task_names), "Average"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|"]
    for role, entry, bits in _rows(result):
        per_task = entry["scores"][bits]
        storage = entry.get("storage_bytes_per_vector", {}).get(bits)
        cells = [
            f"{entry['name']}" + (" (teacher)" if role == "teacher" else ""),
            precision_label(bits),
            "" if storage is None else f"{storage:g}",
            *(f"{per_task[n]['main_score']:.{digits}f}" if n in per_task else "" for n in task_names),
            f"{entry['average'][bits]:.{digits}f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    metrics = ", ".join(sorted({f"{short_task_name(t['name'])}: {t['main_score']}" for t in result["tasks"]}))
    note = f"Scores x100 on split(s) {sorted({t['split'] for t in result['tasks']})}; main scores: {metrics}."
    if result.get("max_samples"):
        note += f" Quick run (max {result['max_samples']} samples per task): not comparable with full runs."
    return "\n".join(lines) + "\n\n" + note + "\n"


def write_results(result: dict[str, Any], output_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``results.json`` and ``results.md`` into ``output_dir``; return their paths."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    json_path = output_dir / "results.json"
    table_path = output_dir / "results.md"
    json_path.write_text(json.dumps(result, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    table_path.write_text(format_table(result), encoding="utf-8")
    return {"json": json_path, "table": table_path}


def load_results(path: str | os.PathLike) -> dict[str, Any]:
    """Read a ``results.json`` (or the folder holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    return json.loads(path.read_text(encoding="utf-8"))
