"""One call that evaluates a model (and its teacher) at every output precision and writes JSON, table and plots."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .plots import plot_sensitivity, plot_tradeoff
from .report import format_table, write_results
from .sweep import evaluate_precisions
from .tasks import calibration_texts as default_calibration_texts
from .tasks import prepare_tasks

logger = logging.getLogger(__name__)

GENERIC_FOLDER_NAMES = {"model", "models", "checkpoint", "final", "output", "snapshot"}


def load_model(model: Any, device: str | None = None):
    """A SentenceTransformer from an instance, a local folder or a Hub id (any st_bitnet / Microsoft / stock format).

    A float32 model with latent (training-state) BitLinears is evaluated through a packed copy: the same embeddings
    (the integer products are exact) at kernel speed, about 3x faster on CPU; the model passed in is not changed.
    """
    if isinstance(model, (str, os.PathLike)):
        from st_bitnet.sentence_transformer import load

        model = load(str(model), device=device)
    return packed_for_inference(model)


def packed_for_inference(model: Any):
    """``model`` itself, or a packed copy when it holds latent BitLinears and only float32 weights."""
    import torch

    from st_bitnet.bitlinear import BitLinear

    if not isinstance(model, torch.nn.Module):
        return model
    bitlinears = [m for m in model.modules() if isinstance(m, BitLinear)]
    if not bitlinears or all(m.is_packed for m in bitlinears):
        return model
    if any(p.dtype != torch.float32 for p in model.parameters()):
        return model  # packed == latent is exact in float32 only
    import copy

    from st_bitnet.convert import pack

    return pack(copy.deepcopy(model))


def _display_name(model: Any, given: str | None) -> str:
    if given:
        return given
    if isinstance(model, (str, os.PathLike)):
        path = Path(str(model).rstrip("/"))
        # Folders named like "model" say nothing: show "<parent>/<name>" instead.
        if path.name.lower() in GENERIC_FOLDER_NAMES and path.parent.name:
            return f"{path.parent.name}/{path.name}"
        return path.name or str(model)
    card_name = getattr(getattr(model, "model_card_data", None), "model_name", None)
    return card_name or type(model).__name__


def run_evaluation(
    model: Any,
    output_dir: str | os.PathLike,
    *,
    teacher: Any | None = None,
    tasks: Sequence[str] | None = None,
    bits: Sequence[int] | None = None,
    batch_size: int = 32,
    max_samples: int | None = None,
    source: str = "auto",
    device: str | None = None,
    model_name: str | None = None,
    teacher_name: str | None = None,
    plots: bool = True,
    show_progress_bar: bool = True,
) -> dict[str, Any]:
    """Evaluate ``model`` (and optionally ``teacher``) at each output precision; write results and plots.

    Args:
        model: a SentenceTransformer, a local folder or a Hub id.
        output_dir: folder for ``results.json``, ``results.md``, ``tradeoff.png`` and ``sensitivity.png``.
        teacher: optional teacher (same forms), evaluated side by side: float32 reference + post-hoc precisions.
        tasks: mteb task names / aliases; default: the dev protocol (``st_bitnet.evaluation.DEV_TASK_NAMES``).
        bits: output precisions; default ``st_bitnet.multi_precision.BITS`` (16, 8, 4, 2, 1).
        batch_size: encode batch size.
        max_samples: cap per task for quick runs (local tasks only).
        source: ``"auto"``, ``"local"`` or ``"hub"`` (see :func:`~st_bitnet.evaluation.tasks.prepare_tasks`).
        device: device to load models on.
        model_name / teacher_name: names shown in the table and plots.
        plots: write the two PNG plots.

    Returns:
        The result dict (as written to ``results.json``) with an added ``"files"`` entry of written paths.

    Example::

        from st_bitnet.evaluation import run_evaluation

        result = run_evaluation("my-bitembed", "eval_out", teacher="sentence-transformers/all-MiniLM-L6-v2")
        print(result["model"]["average"])   # {"16": ..., "8": ..., "4": ..., "2": ..., "1": ...}
    """
    model_display, teacher_display = _display_name(model, model_name), None
    model = load_model(model, device=device)
    if teacher is not None:
        teacher_display = _display_name(teacher, teacher_name)
        teacher = load_model(teacher, device=device)
    prepared = prepare_tasks(list(tasks) if tasks else None, source=source, max_samples=max_samples)
    calibration = default_calibration_texts(n_per_source=min(200, max_samples) if max_samples else 200)
    result = evaluate_precisions(
        model,
        prepared,
        bits,
        teacher=teacher,
        model_name=model_display,
        teacher_name=teacher_display or "teacher",
        batch_size=batch_size,
        max_samples=max_samples,
        calibration_texts=calibration,
        show_progress_bar=show_progress_bar,
    )
    files = {key: str(path) for key, path in write_results(result, output_dir).items()}
    if plots:
        files["tradeoff_plot"] = str(plot_tradeoff(result, Path(output_dir) / "tradeoff.png"))
        files["sensitivity_plot"] = str(plot_sensitivity(result, Path(output_dir) / "sensitivity.png"))
    logger.info("Evaluation written to %s\n%s", output_dir, format_table(result))
    return {**result, "files": files}
