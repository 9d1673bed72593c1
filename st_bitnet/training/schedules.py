"""A learning-rate schedule that ends with the wall-clock budget: linear warmup, then linear decay to zero over
whichever comes first, ``max_steps`` or the budget.

A step-based schedule sized for one machine's speed ends too early on a faster one and is cut before the decay
on a slower or busier one (the budget stop then leaves a high learning rate and a worse model). Measuring the
elapsed time at every step makes the run end with a decayed learning rate whatever the speed.
"""

from __future__ import annotations

import time
import uuid

# the monotonic clock is per process: a restored state from another process must not be read as a start time
_PROCESS = uuid.uuid4().hex


class WallClockSchedule:
    """``LambdaLR`` factor: ``step / warmup_steps`` during warmup, then ``(1 - progress) / (1 - warmup share)``
    with ``progress = max(step / max_steps, trained seconds / budget seconds)``, clipped to [0, 1].

    Trained seconds accumulate across resumed runs: they live in the object's ``__dict__``, which ``LambdaLR``
    saves with the scheduler state in every checkpoint and restores on resume.

    Args:
        warmup_steps: linear-warmup steps.
        max_steps: the step count at which the decay ends (an upper bound when the budget binds first).
        budget_minutes: the wall-clock budget of training, in minutes.
    """

    def __init__(self, warmup_steps: int, max_steps: int, budget_minutes: float):
        if not budget_minutes > 0:
            raise ValueError(f"budget_minutes must be positive, got {budget_minutes!r}")
        if max_steps < 1 or warmup_steps < 0:
            raise ValueError(f"need max_steps >= 1 and warmup_steps >= 0, got {max_steps}, {warmup_steps}")
        self.warmup_steps = int(warmup_steps)
        self.max_steps = int(max_steps)
        self.budget_seconds = 60.0 * float(budget_minutes)
        self.trained_seconds = 0.0
        self.clock = None  # (process id, monotonic time of the last call)

    def tick(self) -> float:
        """Add the time since the last call (in this process) to ``trained_seconds``; return the total."""
        now = time.monotonic()
        if self.clock is not None and self.clock[0] == _PROCESS:
            self.trained_seconds += now - self.clock[1]
        self.clock = (_PROCESS, now)
        return self.trained_seconds

    def progress(self, step: int) -> float:
        return max(step / self.max_steps, self.trained_seconds / self.budget_seconds)

    def budget_spent(self) -> bool:
        return self.tick() >= self.budget_seconds

    def __call__(self, step: int) -> float:
        self.tick()
        if step < self.warmup_steps:
            return step / max(1, self.warmup_steps)
        warm_share = self.warmup_steps / self.max_steps
        return min(1.0, max(0.0, (1.0 - self.progress(step)) / max(1e-12, 1.0 - warm_share)))


def wall_clock_scheduler(optimizer, warmup_steps: int, max_steps: int, budget_minutes: float):
    """A ``torch.optim.lr_scheduler.LambdaLR`` over one :class:`WallClockSchedule` per parameter group (they
    share the clock, so every group decays together)."""
    from torch.optim.lr_scheduler import LambdaLR

    schedule = WallClockSchedule(warmup_steps, max_steps, budget_minutes)
    return LambdaLR(optimizer, [schedule] * len(optimizer.param_groups))
