"""The loop of the agent's periodic checks (agent/node/periodic.py): rounds, wake, stop, failures.

Timing is asserted only one way (something happened before a generous deadline, or a long interval
did not elapse by itself), so a loaded machine slows these tests down but does not fail them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from agent.dataplane.base import TemporaryDataplaneError
from agent.node.periodic import STOP_SLICE_S, Periodic

DEADLINE_S = 10.0


class Task:
    """Counts its rounds; fails the way the test says."""

    def __init__(self) -> None:
        self.rounds = 0
        self.error: Exception | None = None
        self.ran = threading.Event()

    def __call__(self) -> int:
        self.rounds += 1
        self.ran.set()
        if self.error is not None:
            raise self.error
        return self.rounds


def wait_for(condition: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@pytest.fixture
def running() -> Iterator[Callable[[Periodic[int]], threading.Thread]]:
    """Starts `loop.run(stop)` in a thread; stops and joins it after the test."""
    stop = threading.Event()
    threads: list[threading.Thread] = []

    def start(loop: Periodic[int]) -> threading.Thread:
        thread = threading.Thread(target=loop.run, args=(stop,), daemon=True)
        thread.start()
        threads.append(thread)
        return thread

    yield start
    stop.set()
    for thread in threads:
        thread.join(DEADLINE_S)


def test_the_task_runs_every_interval(running) -> None:
    task = Task()
    running(Periodic("counting", 0.01, task))
    assert wait_for(lambda: task.rounds >= 3)


def test_no_round_before_the_interval_ends() -> None:
    """The first round waits a whole interval: a long interval means no round (no busy loop)."""
    task = Task()
    loop = Periodic("counting", 3600, task)
    stop = threading.Event()
    thread = threading.Thread(target=loop.run, args=(stop,), daemon=True)
    thread.start()
    time.sleep(5 * STOP_SLICE_S)  # several slices of the wait have passed
    stop.set()
    thread.join(DEADLINE_S)
    assert not thread.is_alive(), "stop did not end an interval of an hour"
    assert task.rounds == 0


def test_wake_runs_the_task_at_once(running) -> None:
    task = Task()
    loop = Periodic("checking", 3600, task)
    running(loop)
    loop.wake()
    assert task.ran.wait(DEADLINE_S)
    assert task.rounds == 1


def test_a_dataplane_error_is_logged_and_the_next_round_runs(running, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="agent.node.periodic")
    task = Task()
    task.error = TemporaryDataplaneError("xtables lock busy")
    running(Periodic("checking the hooks", 0.01, task))
    assert wait_for(lambda: task.rounds >= 3), "a failed round ended the loop"
    assert any(
        r.levelno == logging.WARNING and r.getMessage() == "checking the hooks failed: xtables lock busy"
        for r in caplog.records
    )


def test_once_returns_none_on_a_dataplane_error() -> None:
    task = Task()
    loop = Periodic("checking", 1.0, task)
    assert loop.once() == 1
    task.error = TemporaryDataplaneError("busy")
    assert loop.once() is None


def test_any_other_error_ends_the_loop() -> None:
    """A bug is not retried forever in silence: it reaches the worker wrapper (main._thread)."""
    task = Task()
    task.error = KeyError("a bug")
    loop = Periodic("checking", 0.01, task)
    with pytest.raises(KeyError):
        loop.run(threading.Event())
    assert task.rounds == 1


@pytest.mark.parametrize("interval", [0.0, -1.0, float("nan"), float("inf")])
def test_an_interval_that_would_spin_or_never_run_is_refused(interval: float) -> None:
    with pytest.raises(ValueError, match="positive number of seconds"):
        Periodic("checking", interval, Task())
