"""Upstream Netpol e2e on a kind cluster (kindnet, which enforces nothing) with podfence deployed.

Runs scripts/kind-e2e.sh where kind and a Docker engine exist; elsewhere the test skips with the
script's own reason. The script's prerequisite checks are tested here too, since they are what
runs on machines without kind.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "kind-e2e.sh"
SKIP_EXIT = 3
SUITE_TIMEOUT_S = 3600


def _missing_prerequisite() -> str | None:
    if shutil.which("kind") is None:
        return "kind not installed"
    if shutil.which("docker") is None:
        return "no Docker engine (docker CLI not installed)"
    if subprocess.run(["docker", "info"], capture_output=True, check=False).returncode != 0:
        return "no Docker engine (docker info cannot reach a daemon)"
    return None


def test_script_is_valid_bash() -> None:
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, check=False).returncode == 0


def test_script_reports_the_missing_prerequisite_and_exits_with_skip_code() -> None:
    missing = _missing_prerequisite()
    if missing is None:
        pytest.skip("kind and a Docker engine are present: nothing is missing to report")
    result = subprocess.run([str(SCRIPT)], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == SKIP_EXIT
    assert f"SKIP: {missing}" in result.stderr


def test_upstream_netpol_suite_passes_on_kind() -> None:
    missing = _missing_prerequisite()
    if missing is not None:
        pytest.skip(missing)
    result = subprocess.run(
        [str(SCRIPT)], capture_output=True, text=True, timeout=SUITE_TIMEOUT_S, check=False
    )
    if result.returncode == SKIP_EXIT:
        pytest.skip(result.stderr.strip().splitlines()[-1])
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
