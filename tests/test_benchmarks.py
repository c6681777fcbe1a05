"""Benchmark plumbing that a lent GPU session relies on and cannot afford to debug there.

benchmarks/convergence.py --interleave trains the methods in turns so that a time limit stops all
of them at the same step; the GPU suite's convergence figure is only a comparison if that holds.
"""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
convergence = pytest.importorskip("convergence")


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def time(self) -> float:
        return self.now


def fake_run(clock: FakeClock, name: str, seconds_per_interval: float, intervals: int, log: dict):
    """Stands in for run_one: each interval costs time, then yields; stops when sent True."""
    step = 0
    while step < intervals:
        clock.now += seconds_per_interval
        step += 1
        log[name] = step
        stop = yield
        if stop and step < intervals:
            log[name + " stopped"] = step
            return


def test_runs_in_turns_stop_at_the_same_step_before_the_deadline(monkeypatch):
    clock, log = FakeClock(), {}
    monkeypatch.setattr(convergence.time, "time", clock.time)
    # three methods of unequal cost: one round is 1 + 1.5 + 2 = 4.5 s; the deadline at 10 s leaves room for two
    runs = [fake_run(clock, "fm", 1.0, 100, log), fake_run(clock, "dual", 1.5, 100, log), fake_run(clock, "sf", 2.0, 100, log)]
    convergence.train_in_turns(runs, deadline=10.0)
    assert log == {"fm": 2, "dual": 2, "sf": 2, "fm stopped": 2, "dual stopped": 2, "sf stopped": 2}
    assert clock.now <= 10.0


def test_runs_in_turns_finish_when_time_allows(monkeypatch):
    clock, log = FakeClock(), {}
    monkeypatch.setattr(convergence.time, "time", clock.time)
    runs = [fake_run(clock, "fm", 1.0, 3, log), fake_run(clock, "sf", 1.0, 3, log), fake_run(clock, "done", 1.0, 0, log)]
    convergence.train_in_turns(runs, deadline=float("inf"))
    assert log == {"fm": 3, "sf": 3}


def test_report_says_where_a_time_limit_stopped_the_runs():
    assert convergence.steps_text({"steps": 1500, "steps_reached": 1500}) == "1500 steps"
    assert convergence.steps_text({"steps": 1500, "steps_reached": 1000}).startswith("1000 of 1500 planned steps")
