"""One lab per machine: a second process waits for the lab lock instead of tearing down a lab in use."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from agent.lab.machine import LabError, leftovers, teardown

HOLDER = """
import sys, time
from agent.lab.machine import acquire_lab_lock
acquire_lab_lock(240)  # another helper's lab may hold it for minutes on a shared machine
print("held", flush=True)
time.sleep(float(sys.argv[1]))
"""


def test_teardown_waits_for_the_process_using_the_lab() -> None:
    teardown(240)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, "1.5"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(LabError, match=f"in use by pid {holder.pid}"):
            teardown(lock_wait_seconds=0.3)
        started = time.monotonic()
        teardown(lock_wait_seconds=30)  # returns once the holder exits and the kernel drops its lock
        assert time.monotonic() - started > 0.5
        assert holder.wait(timeout=5) == 0
    finally:
        holder.kill()
    assert leftovers() == []


def test_killed_holder_never_leaves_the_lock_taken() -> None:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, "60"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    holder.kill()
    holder.wait(timeout=5)
    teardown(lock_wait_seconds=2)  # no LabError: SIGKILL released the flock
