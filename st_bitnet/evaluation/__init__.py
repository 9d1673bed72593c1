"""Evaluation of BitEmbed models at each output precision.

mteb's own task classes and metrics run on the local dev protocol (``$ST_BITNET_DATA``) or on the Hub by name;
each text is encoded once and every precision (16/8/4/2/1 bits) is derived from the float output.

- :func:`run_evaluation`: the whole ``st-bitnet eval`` (JSON + Markdown table + two PNG plots).
- :func:`evaluate_precisions`: the sweep alone (returns the result dict).
- :func:`prepare_tasks`, :data:`DEV_TASK_NAMES`: mteb tasks with local data.
- :class:`PrecisionEncoder`, :class:`EmbeddingCache`: the mteb encoder wrapper at one precision.
- :func:`format_table`, :func:`plot_tradeoff`, :func:`plot_sensitivity`, :func:`load_results`.

Importing this package is cheap; mteb and matplotlib load when the functions run.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "run_evaluation": "run",
    "load_model": "run",
    "evaluate_precisions": "sweep",
    "evaluate_model_precisions": "sweep",
    "storage_bytes_per_vector": "sweep",
    "prepare_tasks": "tasks",
    "load_local_task": "tasks",
    "load_hub_task": "tasks",
    "calibration_texts": "tasks",
    "DEV_TASK_NAMES": "tasks",
    "DEV_TASKS": "tasks",
    "PrecisionEncoder": "encoder",
    "EmbeddingCache": "encoder",
    "quantize_from_float": "encoder",
    "format_table": "report",
    "write_results": "report",
    "load_results": "report",
    "plot_tradeoff": "plots",
    "plot_sensitivity": "plots",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
