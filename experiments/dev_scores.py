"""Shared by the experiment drivers: score a model on the dev protocol at 16 and 1 bit, keep one JSON record per run
in a ``.jsonl`` file, and render the latest records as a Markdown table.

Drivers import it with ``sys.path`` pointing at ``experiments/`` (they are run as scripts).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from st_bitnet.bitlinear import BitLinear
from st_bitnet.evaluation.report import short_task_name

EVAL_BITS = (16, 1)


def chosen(parser, names: list[str], known, what: str) -> list[str]:
    """The ``--rows`` / ``--stage`` values of a driver: ``["all"]`` means every known one; unknown ones stop the
    parser with the list of known names."""
    names = list(known) if names == ["all"] else list(names)
    unknown = [n for n in names if n not in known]
    if unknown:
        parser.error(f"unknown {what} {unknown}; known: {', '.join(known)}")
    return names


def evaluate_dev(model, folder: Path, name: str, *, max_samples: int | None, max_seq_length: int, batch_size: int,
                 tasks: list[str] | None = None) -> dict:  # fmt: skip
    """Dev-protocol main scores (x100) of ``model`` at :data:`EVAL_BITS`, via ``st_bitnet.evaluation.run_evaluation``.

    A model with latent BitLinear layers is packed first (in place): the same outputs as the latent model in fp32,
    about 3x faster to encode on CPU. Returns ``{"scores": {bits: {task: score}}, "average", "quantization_ranges",
    "eval_minutes", "eval_results"}``.
    """
    import st_bitnet
    from st_bitnet.evaluation import run_evaluation

    model.max_seq_length = max_seq_length
    model.eval()
    if any(isinstance(m, BitLinear) for m in model.modules()):
        st_bitnet.pack(model)
    started = time.time()
    result = run_evaluation(
        model, folder, tasks=tasks, bits=list(EVAL_BITS), max_samples=max_samples, batch_size=batch_size,
        source="local", model_name=name, plots=False, show_progress_bar=False,
    )  # fmt: skip
    entry = result["model"]
    return {
        "scores": {b: {t: s["main_score"] for t, s in per.items()} for b, per in entry["scores"].items()},
        "average": entry["average"],
        "quantization_ranges": entry.get("quantization_ranges"),
        "eval_minutes": round((time.time() - started) / 60, 2),
        "eval_results": str(Path(folder) / "results.json"),
    }


def append_record(path: Path, record: dict) -> None:
    """Append one JSON record to the ``.jsonl`` file ``path``."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def latest_records(path: Path, key: str) -> dict[str, dict]:
    """The last record per ``record[key]`` in the ``.jsonl`` file ``path`` (a re-run replaces the earlier one)."""
    latest: dict[str, dict] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                latest[record[key]] = record
    return latest


def score_table(records: list[dict], label: str, key: str) -> list[str]:
    """Markdown lines: one row per record and bit width (16, 1) with every task score, the average, the steps and the
    train / eval minutes (``train_minutes``, or ``train_seconds`` / 60)."""
    if not records:
        return []
    tasks = list(records[0]["scores"]["16"])
    head = [label, "bits", *(short_task_name(t) for t in tasks), "avg", "steps", "train min", "eval min"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for record in records:
        train_minutes = record.get("train_minutes", record.get("train_seconds", 0) / 60)
        for bits in ("16", "1"):
            scores = record["scores"].get(bits, {})
            cells = [record[key], bits, *(f"{scores.get(t, float('nan')):.2f}" for t in tasks),
                     f"{record['average'].get(bits, float('nan')):.2f}", str(record.get("steps", 0)),
                     f"{train_minutes:.1f}", f"{record['eval_minutes']:.1f}"]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
    return lines
