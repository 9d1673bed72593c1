"""The wall-clock learning-rate schedule: decay over whichever ends first, steps or budget; its clock survives a
checkpoint round trip and a new process; the runner stops when the budget is spent."""

from __future__ import annotations

import pytest
import torch

from st_bitnet.training import schedules
from st_bitnet.training.schedules import WallClockSchedule, wall_clock_scheduler


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(schedules.time, "monotonic", fake)
    return fake


def test_warmup_then_the_faster_of_steps_and_time_decides(clock):
    schedule = WallClockSchedule(warmup_steps=10, max_steps=110, budget_minutes=1.0)
    assert schedule(0) == 0.0 and schedule(5) == pytest.approx(0.5)
    assert schedule(10) == pytest.approx(1.0)  # no time spent yet: steps decide
    assert schedule(60) == pytest.approx(0.5)  # half the post-warmup steps
    clock.now += 45.0  # 3/4 of the budget: time runs ahead of steps now
    assert schedule(61) == pytest.approx(0.25 / (1 - 10 / 110))
    clock.now += 15.0
    assert schedule(62) == 0.0 and schedule.budget_spent()
    clock.now += 100.0
    assert schedule(63) == 0.0  # never negative


def test_trained_seconds_survive_a_checkpoint_and_a_new_process(clock, monkeypatch):
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = wall_clock_scheduler(optimizer, warmup_steps=0, max_steps=1000, budget_minutes=1.0)
    for _ in range(3):
        clock.now += 10.0
        optimizer.step()
        scheduler.step()
    state = scheduler.state_dict()
    assert state["lr_lambdas"][0]["trained_seconds"] == pytest.approx(30.0)

    monkeypatch.setattr(schedules, "_PROCESS", "another process")  # a resumed run: the old monotonic time is void
    clock.now = 5.0
    optimizer2 = torch.optim.SGD(model.parameters(), lr=1.0)
    restored = wall_clock_scheduler(optimizer2, warmup_steps=0, max_steps=1000, budget_minutes=1.0)
    restored.load_state_dict(state)
    optimizer2.step()
    restored.step()  # the first step after a resume starts this process's clock
    clock.now += 6.0
    optimizer2.step()
    restored.step()
    assert restored.lr_lambdas[0].trained_seconds == pytest.approx(36.0)
    assert optimizer2.param_groups[0]["lr"] == pytest.approx(1.0 - 36.0 / 60.0, abs=1e-3)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="positive"):
        WallClockSchedule(0, 10, 0)
    with pytest.raises(ValueError, match="max_steps"):
        WallClockSchedule(0, 0, 1.0)
