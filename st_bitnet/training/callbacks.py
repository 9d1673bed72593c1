"""Trainer callbacks: a JSON-lines record of every logged value (total loss and each loss component)."""

from __future__ import annotations

import json
import os

from transformers import TrainerCallback


class LossLogCallback(TrainerCallback):
    """Append every ``on_log`` record (``loss``, each loss component, ``learning_rate``, eval metrics...) to a
    JSON-lines file, one object per logging step with ``step`` and ``epoch``.

    sentence-transformers already logs each component a dict-returning loss reports; this keeps them in one
    machine-readable file next to the checkpoints, so loss curves can be compared across runs (e.g. an
    interrupted and resumed run against an uninterrupted one). Only the main process writes.

    Args:
        path: the ``.jsonl`` file; appended to, so a resumed run continues the same curve.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        record = {"step": state.global_step, "epoch": state.epoch, **logs}
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")


def read_loss_log(path: str | os.PathLike) -> list[dict]:
    """The records of a :class:`LossLogCallback` file (a resumed run's repeated steps keep the last record)."""
    by_step: dict[tuple, dict] = {}
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                record = json.loads(line)
                kind = "train" if "loss" in record else "eval" if any(k.startswith("eval_") for k in record) else "other"
                by_step[(record["step"], kind)] = record
    return [by_step[key] for key in sorted(by_step)]
