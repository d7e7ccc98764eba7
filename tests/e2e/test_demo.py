"""`podfence demo` end to end: it must pass, finish inside a minute and leave nothing behind."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from agent.lab.machine import leftovers
from tests.e2e.test_conformance import _missing_dataplane

DEMO_BUDGET_S = 60


@pytest.mark.parametrize("mode", ["routed", "bridged"])
@pytest.mark.parametrize("dataplane", ["bpf", "iptables"])
def test_demo_passes_quickly_and_cleans_up(dataplane: str, mode: str) -> None:
    missing = _missing_dataplane(dataplane)
    if missing:
        pytest.skip(missing)
    started = time.monotonic()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "agent.cli",
            "demo",
            "--dataplane",
            dataplane,
            "--mode",
            mode,
            "--lock-wait",
            "240",
        ],
        capture_output=True,
        text=True,
        timeout=DEMO_BUDGET_S * 2,
        check=False,
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert "demo passed: every expectation held" in result.stdout
    assert "[ok] ingress -> ratings:9080 after flushing its own rules: blocked" in result.stdout
    assert "declared connections, every one allowed by the reference evaluator" in result.stdout
    assert "AFTER derived policies" in result.stdout and "AFTER suggested policies" in result.stdout
    assert "observed connections, every one allowed by the reference evaluator" in result.stdout
    # the staged guardrail: its Deny changed no fate, and observe named it on the flow it would deny
    assert "[ok] client -> ingress:80 (the staged Deny changes no fate): reachable" in result.stdout
    assert "[ok] podfence observe --verdict audit-denied: client -> ingress:80 by staged-no-plain-http" in (
        result.stdout
    )
    assert elapsed < DEMO_BUDGET_S, f"demo took {elapsed:.1f} s"
    assert leftovers() == []


def test_interrupted_demo_cleans_up() -> None:
    """Ctrl-C in the middle of the demo (lab built, podfence running) still leaves nothing behind."""
    if _missing_dataplane("iptables"):
        pytest.skip(str(_missing_dataplane("iptables")))
    demo = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "demo", "--dataplane", "iptables", "--lock-wait", "240"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert demo.stdout is not None
    try:
        for line in demo.stdout:
            if line.startswith("BEFORE policies"):
                break
        assert leftovers(), "the lab should be up while the demo runs"
        demo.send_signal(signal.SIGINT)
        output = demo.communicate(timeout=30)[0]
    finally:
        if demo.poll() is None:
            demo.kill()
    assert demo.returncode == 1
    assert "interrupted, cleaning up" in output
    assert leftovers() == []
