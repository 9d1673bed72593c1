"""The precision sweep: evaluate a model (and optionally its teacher) on mteb tasks at each output precision.

Each text is encoded once in float32 (:class:`~st_bitnet.evaluation.encoder.EmbeddingCache`); every precision is
derived from those floats. The result is a plain JSON-able dict (see :func:`evaluate_precisions`).
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ..multi_precision.precision import BITS, bytes_per_vector
from .encoder import FULL_PRECISION_BITS, EmbeddingCache, PrecisionEncoder, calibration_quantizer
from .tasks import PreparedTask

logger = logging.getLogger(__name__)

# A few secondary metrics kept in the JSON next to the main score (all x100).
SECONDARY_METRICS = ("cosine_pearson", "f1", "recall_at_10", "ndcg_at_10", "accuracy", "cosine_spearman")


def storage_bytes_per_vector(dimension: int, bits: int) -> int:
    """Bytes to store one ``dimension``-d vector at ``bits`` per dimension, as stored
    (:func:`st_bitnet.multi_precision.precision.bytes_per_vector`)."""
    return bytes_per_vector(dimension, bits)


def _task_scores(prepared: PreparedTask, encoder: PrecisionEncoder, batch_size: int) -> dict[str, Any]:
    with warnings.catch_warnings():
        # sklearn warns about undefined precision for labels never predicted in small runs; not our signal.
        warnings.simplefilter("ignore")
        by_subset = prepared.task.evaluate(
            encoder, split=prepared.split, encode_kwargs={"batch_size": batch_size, "show_progress_bar": False}
        )
    main = float(np.mean([scores["main_score"] for scores in by_subset.values()]))
    secondary = {}
    for metric in SECONDARY_METRICS:
        values = [s[metric] for s in by_subset.values() if isinstance(s.get(metric), (int, float))]
        if values:
            secondary[metric] = round(100 * float(np.mean(values)), 4)
    return {"main_score": round(100 * main, 4), "metrics": secondary}


def evaluate_model_precisions(
    model: Any,
    tasks: Sequence[PreparedTask],
    bits: Sequence[int] = BITS,
    *,
    name: str = "model",
    batch_size: int = 32,
    calibration_texts: Sequence[str] | None = None,
    show_progress_bar: bool = True,
) -> dict[str, Any]:
    """Scores of one model on ``tasks`` at each precision in ``bits`` (32 = unquantized float output).

    A model with a trained ``MultiPrecisionQuantizer`` uses its ranges; otherwise post-hoc ranges are calibrated
    once on ``calibration_texts`` (see :func:`~st_bitnet.evaluation.tasks.calibration_texts`).

    Returns:
        ``{"name", "embedding_dim", "encode_seconds_total", "scores": {bits: {task: {"main_score", "metrics"}}},
        "average": {bits: mean main score}}`` with bits as strings (JSON keys) and scores x100.
    """
    cache = EmbeddingCache(model, batch_size=batch_size, show_progress_bar=show_progress_bar)
    needs_quantizer = any(b != FULL_PRECISION_BITS for b in bits)
    quantizer = calibration_quantizer(model, cache, calibration_texts) if needs_quantizer else None
    if not needs_quantizer:
        ranges = "none (float only)"
    elif quantizer is not None:
        ranges = f"post-hoc min/max per dimension, calibrated on {len(calibration_texts)} training-side texts"
    else:
        from st_bitnet.multi_precision import find_quantizer

        ranges = "trained (MultiPrecisionQuantizer)" if find_quantizer(model) is not None else "post-hoc per batch"
    scores: dict[str, dict[str, Any]] = {str(b): {} for b in bits}
    started = time.perf_counter()
    progress = tqdm(total=len(tasks) * len(bits), desc=f"eval {name}", disable=not show_progress_bar)
    for prepared in tasks:
        for b in bits:  # precisions innermost: the first one encodes, the others reuse the cache
            progress.set_postfix_str(f"{prepared.name} @ {b} bit")
            scores[str(b)][prepared.name] = _task_scores(prepared, PrecisionEncoder(cache, b, name, quantizer=quantizer), batch_size)
            progress.update(1)
    progress.close()
    dimension = cache.dimension
    return {
        "name": name,
        "embedding_dim": dimension,
        "quantization_ranges": ranges,
        "texts_encoded": cache.encoded_count,
        "seconds_total": round(time.perf_counter() - started, 2),
        "scores": scores,
        "average": {
            key: round(float(np.mean([t["main_score"] for t in per_task.values()])), 4)
            for key, per_task in scores.items()
            if per_task
        },
        "storage_bytes_per_vector": {str(b): storage_bytes_per_vector(dimension, b) for b in bits} if dimension else {},
    }


def evaluate_precisions(
    model: Any,
    tasks: Sequence[PreparedTask],
    bits: Sequence[int] | None = None,
    *,
    teacher: Any | None = None,
    model_name: str = "model",
    teacher_name: str = "teacher",
    batch_size: int = 32,
    max_samples: int | None = None,
    calibration_texts: Sequence[str] | None = None,
    show_progress_bar: bool = True,
) -> dict[str, Any]:
    """The full sweep: the model at each precision, and the teacher side by side (its float output + each precision).

    Returns:
        A JSON-able dict: ``{"protocol", "bits", "tasks": [...], "model": {...}, "teacher": {...} | None, ...}``,
        each model entry as from :func:`evaluate_model_precisions`.
    """
    bits = tuple(int(b) for b in (bits or BITS))
    for b in bits:
        if b not in (*BITS, FULL_PRECISION_BITS):
            raise ValueError(f"Unsupported precision {b} bits; use one of {BITS} (or {FULL_PRECISION_BITS} for float).")
    result: dict[str, Any] = {
        "protocol": "st_bitnet-dev-v1" if all(t.source == "local" for t in tasks) else "mteb",
        "bits": list(bits),
        "max_samples": max_samples,
        "tasks": [
            {
                "name": t.name,
                "type": t.type,
                "main_score": t.main_score_name,
                "split": t.split,
                "source": t.source,
                "data": t.data_description,
            }
            for t in tasks
        ],
        "model": evaluate_model_precisions(
            model, tasks, bits, name=model_name, batch_size=batch_size,
            calibration_texts=calibration_texts, show_progress_bar=show_progress_bar,
        ),
        "teacher": None,
    }
    if teacher is not None:
        teacher_bits = (FULL_PRECISION_BITS,) + tuple(b for b in bits if b != FULL_PRECISION_BITS)
        result["teacher"] = evaluate_model_precisions(
            teacher, tasks, teacher_bits, name=teacher_name, batch_size=batch_size,
            calibration_texts=calibration_texts, show_progress_bar=show_progress_bar,
        )
    return result
