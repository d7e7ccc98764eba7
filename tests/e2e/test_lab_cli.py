"""The lab as people use it: `podfence lab up --podfence`, a policy dropped in the folder, `lab probe`,
`podfence status --json`, `lab down` — all through the command line."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

from agent.lab.machine import RUN_DIR, leftovers
from tests.e2e.test_conformance import _missing_dataplane

PODFENCE = [sys.executable, "-m", "agent.cli"]
DENY_INGRESS_X = {
    "apiVersion": "networking.k8s.io/v1",
    "kind": "NetworkPolicy",
    "metadata": {"namespace": "x", "name": "deny-ingress"},
    "spec": {"podSelector": {}, "policyTypes": ["Ingress"], "ingress": []},
}


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    # longer than the 240 s `--lock-wait` below plus the work itself: another lab may hold the lock
    return subprocess.run([*PODFENCE, *argv], capture_output=True, text=True, timeout=360, check=False)


def _blocked_cells(probe_output: str) -> set[tuple[str, str]]:
    lines = probe_output.splitlines()[1:]
    targets = lines[0].split()
    return {
        (row.split()[0], target)
        for row in lines[1:]
        for target, mark in zip(targets, row.split()[1:], strict=True)
        if mark == "X"
    }


def test_lab_cli_with_podfence_enforces_a_dropped_in_policy(tmp_path: Path) -> None:
    dataplane = "iptables" if _missing_dataplane("bpf") else "bpf"
    source = tmp_path / "source"
    up = _run("lab", "--lock-wait", "240", "up", "--podfence", dataplane, "--source", str(source))
    try:
        assert up.returncode == 0, up.stderr
        control = re.search(r"podfence status --control (\S+) --json", up.stdout)
        assert control, up.stdout
        assert _blocked_cells(_run("lab", "probe", "--port", "80").stdout) == set()

        (source / "deny.yaml").write_text(yaml.safe_dump(DENY_INGRESS_X))
        expected = {
            (s, t)
            for s in ("x/a", "x/b", "x/c", "y/a", "y/b", "y/c", "z/a", "z/b", "z/c")
            for t in ("x/a", "x/b", "x/c")
            if s != t
        }
        deadline = time.monotonic() + 20
        while (
            blocked := _blocked_cells(_run("lab", "probe", "--port", "80", "--timeout", "0.5").stdout)
        ) != expected:
            assert time.monotonic() < deadline, f"blocked cells: {sorted(blocked)}"
            time.sleep(0.5)

        status = json.loads(_run("status", "--control", control.group(1), "--json").stdout)
        assert set(status["nodes"]) == {"node1", "node2"}
        assert all(
            n["applied_version"] == status["version"] and n["connected"] for n in status["nodes"].values()
        )
    finally:
        down = _run("lab", "--lock-wait", "240", "down")
    assert down.returncode == 0, down.stderr
    assert leftovers() == []
    assert not (RUN_DIR / "control.pid").exists()
