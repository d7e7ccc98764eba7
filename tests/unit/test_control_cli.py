"""`podfence control` and `podfence status` as processes: usage errors, metrics and health
endpoints, status over the wire, and a clean stop on SIGTERM."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.unit.control_helpers import PODS, RecordingAgent, control_healthy, ns_doc, policy_doc, wait_until

CLI = [sys.executable, "-m", "agent.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_control_refuses_to_run_without_tls_unless_insecure_is_explicit(tmp_path):
    done = subprocess.run([*CLI, "control", "--source", str(tmp_path), "--listen", "127.0.0.1:0"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "--insecure" in done.stderr


def test_control_rejects_a_source_that_is_not_a_folder(tmp_path):
    done = subprocess.run([*CLI, "control", "--source", str(tmp_path / "missing"), "--insecure"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "not a folder" in done.stderr


def test_control_rejects_a_forget_horizon_that_is_not_positive(tmp_path):
    done = subprocess.run([*CLI, "control", "--source", str(tmp_path), "--insecure",
                           "--forget-disconnected-after", "0"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--forget-disconnected-after must be > 0" in done.stderr


@pytest.fixture
def control_process(tmp_path: Path):
    (tmp_path / "objects.yaml").write_text(yaml.safe_dump_all([ns_doc("shop"), *PODS,
                                                               policy_doc("web-in", "web", 8080)]))
    grpc_port, metrics_port = free_port(), free_port()
    process = subprocess.Popen(
        [*CLI, "control", "--source", str(tmp_path), "--listen", f"127.0.0.1:{grpc_port}", "--insecure",
         "--metrics-listen", f"127.0.0.1:{metrics_port}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )

    try:
        wait_until(lambda: control_healthy(metrics_port), timeout=30, what="control /healthz")
        yield process, f"127.0.0.1:{grpc_port}", metrics_port
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_control_process_serves_agents_status_metrics_and_stops_on_sigterm(control_process):
    process, target, metrics_port = control_process
    agent = RecordingAgent("n1", target).start()
    try:
        agent.wait_for_state(lambda s: "shop/web-1" in s.endpoints, "n1 snapshot")

        def status() -> dict:
            done = subprocess.run([*CLI, "status", "--control", target, "--json"], capture_output=True,
                                  text=True, timeout=60)
            assert done.returncode == 0, done.stderr
            return json.loads(done.stdout)

        wait_until(lambda: status()["nodes"].get("n1", {}).get("applied_version") == status()["version"],
                   timeout=30, what="n1 acked")
        table = subprocess.run([*CLI, "status", "--control", target], capture_output=True, text=True,
                               timeout=60)
        assert table.returncode == 0 and "n1" in table.stdout and "yes" in table.stdout

        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as reply:
            metrics = reply.read().decode()
        for name in ("podfence_control_policy_version", "podfence_control_connected_nodes 1.0",
                     'podfence_control_node_lag_versions{node="n1"} 0.0',
                     "podfence_control_snapshot_build_seconds_bucket", "podfence_control_source_errors_total",
                     "podfence_control_invalid_objects"):
            assert name in metrics, name
    finally:
        agent.close()

    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=20) == 0
    assert time.monotonic() - started < 15
    _, stderr = process.communicate()
    assert "shutting down" in stderr
