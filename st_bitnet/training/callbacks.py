"""Trainer callbacks: a JSON-lines record of every logged value (total loss and each loss component)."""

from __future__ import annotations

import json
import logging
import os
import time

from transformers import TrainerCallback

LOSS_LOG = "loss_log.jsonl"  # the run's loss log, next to its checkpoints


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
        record = {"step": state.global_step, "epoch": state.epoch, "time": round(time.time(), 2), **logs}
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")


class TimeBudgetCallback(TrainerCallback):
    """Stop training (with a checkpoint) once ``minutes`` of training wall clock are spent.

    With a :class:`~st_bitnet.training.schedules.WallClockSchedule` learning rate (``decay_over_time_budget``)
    the schedule's clock decides, so the stop comes when the learning rate reaches zero and a resumed run only
    gets what is left of the budget. Otherwise this process's own clock decides (a resumed run gets the budget
    afresh) and the schedule follows ``max_steps``: a safety net for an unexpectedly slow run.
    """

    def __init__(self, minutes: float):
        if not minutes > 0:
            raise ValueError(f"training.time_budget_minutes must be positive, got {minutes!r}")
        self.seconds = 60.0 * float(minutes)
        self.start = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.monotonic()

    def _spent(self, lr_scheduler) -> bool:
        from .schedules import WallClockSchedule

        schedules = [f for f in getattr(lr_scheduler, "lr_lambdas", []) if isinstance(f, WallClockSchedule)]
        if schedules:
            return schedules[0].budget_spent()
        return self.start is not None and time.monotonic() - self.start >= self.seconds

    def on_step_end(self, args, state, control, lr_scheduler=None, **kwargs):
        if not control.should_training_stop and self._spent(lr_scheduler):
            logging.getLogger(__name__).warning(
                "time budget of %.0f min reached at step %d of %d: saving and stopping", self.seconds / 60,
                state.global_step, state.max_steps)
            control.should_training_stop = True
            control.should_save = True


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
