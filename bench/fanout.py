"""Fan-out benchmark: 200 agent streams on one control service; one policy change touching every
node; time from the policy file's write until every node has applied the new version (recorded by
the agents) and until the control service has every ack (its status, polled every 10 ms after that).

The control service runs as its own process (`podfence control --source DIR`), so its RSS and CPU
are its own; the agents are SyncClient threads in this process, each on its own connection, whose
`apply` only records what arrived (the kernel side is benchmarked by the dataplane benchmarks).
The latency therefore includes the folder poll (`POLL_INTERVAL`), the resolver, encoding, the
wire, the agents' decoding and their acks. Run: `.venv/bin/python -m bench.fanout`.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agent.api import podfence_pb2 as pb
from agent.api import podfence_pb2_grpc as pb_grpc
from agent.dataplane.types import NodeState
from agent.node.sync import SyncClient
from bench import _proc

NODES = 200
PODS_PER_NODE = 2
APPS = 10
CHANGES = 20
# Seconds; the control service's default is 0.2 (set PODFENCE_BENCH_POLL_INTERVAL to compare).
POLL_INTERVAL = float(os.environ.get("PODFENCE_BENCH_POLL_INTERVAL", "0.05"))
NAMESPACE = "bench"
POLICY = "fanout"
TIMEOUT = 60.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pods() -> list[dict[str, Any]]:
    pods = []
    for node in range(NODES):
        for i in range(PODS_PER_NODE):
            n = node * PODS_PER_NODE + i
            labels = {"app": f"app-{n % APPS}"}
            pods.append({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"namespace": NAMESPACE, "name": f"pod-{n}", "labels": labels},
                "spec": {"nodeName": f"node-{node}", "containers": [
                    {"name": "c", "image": "x", "ports": [{"containerPort": 8080, "name": "http"}]}]},
                "status": {"podIP": f"10.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}"},
            })
    return pods


def _app_policies() -> list[dict[str, Any]]:
    """Per-app policies (app-k accepts app-(k-1)), so the resolver holds realistic background state."""
    return [
        {
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"namespace": NAMESPACE, "name": f"app-{k}"},
            "spec": {
                "podSelector": {"matchLabels": {"app": f"app-{k}"}},
                "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": f"app-{(k - 1) % APPS}"}}}],
                             "ports": [{"port": 8080}]}],
            },
        }
        for k in range(APPS)
    ]


def _fanout_policy(port: int) -> dict[str, Any]:
    """Selects every pod: a port change alters every node's policy."""
    return {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"namespace": NAMESPACE, "name": POLICY},
        "spec": {"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "192.168.0.0/16"}}],
                                                 "ports": [{"port": port, "protocol": "TCP"}]}]},
    }


def _write(path: Path, documents: list[dict[str, Any]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")  # hidden: the folder source ignores it
    tmp.write_text(yaml.safe_dump_all(documents))
    os.replace(tmp, path)


class _Node:
    """One simulated agent: records when each fan-out port was applied."""

    def __init__(self, name: str, target: str, board: _Board) -> None:
        self.name = name
        self.board = board
        self.client = SyncClient(name, target, self.apply, backoff_initial=0.2, backoff_max=2.0,
                                 channel_options=[("grpc.use_local_subchannel_pool", 1)])

    def apply(self, state: NodeState) -> None:
        ports = {a.port_first for e in state.endpoints.values() for a in e.ingress.allows
                 if a.policy == f"{NAMESPACE}/{POLICY}"}
        for port in ports:
            self.board.applied(self.name, port)


class _Board:
    """Collects, per fan-out port, the time each node applied it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._times: dict[int, dict[str, float]] = {}
        self._complete: dict[int, threading.Event] = {}

    def expect(self, port: int) -> threading.Event:
        with self._lock:
            return self._complete.setdefault(port, threading.Event())

    def applied(self, node: str, port: int) -> None:
        now = time.monotonic()
        with self._lock:
            times = self._times.setdefault(port, {})
            times.setdefault(node, now)
            if len(times) == NODES:
                self._complete.setdefault(port, threading.Event()).set()

    def last(self, port: int) -> float:
        with self._lock:
            return max(self._times[port].values())


def _percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    rank = max(0, min(len(ordered) - 1, round(q * len(ordered) + 0.5) - 1))  # nearest rank
    return ordered[rank]


def _wait_serving(target: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + TIMEOUT
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"control service exited with {process.returncode}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                time.sleep(0.1)
    raise TimeoutError("control service did not become ready")


def _wait_all_acked(target: str) -> float:
    """When GetStatus first shows every node at the current version (acks received and recorded)."""
    deadline = time.monotonic() + TIMEOUT
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.ControlStatusStub(channel)
        while time.monotonic() < deadline:
            status = stub.GetStatus(pb.StatusRequest(), timeout=5)
            if len(status.nodes) == NODES and all(
                n.applied_version == status.version for n in status.nodes.values()
            ):
                return time.monotonic()
            time.sleep(0.01)
    raise TimeoutError("the control service never saw every ack")


def run() -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="podfence-fanout-") as folder:
        root = Path(folder)
        _write(root / "namespace.yaml", [{"apiVersion": "v1", "kind": "Namespace",
                                          "metadata": {"name": NAMESPACE, "labels": {"team": "bench"}}}])
        _write(root / "pods.yaml", _pods())
        _write(root / "apps.yaml", _app_policies())
        _write(root / "fanout.yaml", [_fanout_policy(10_000)])
        port = _free_port()
        target = f"127.0.0.1:{port}"
        control = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "--log-level", "warning", "control", "--source", folder,
             "--listen", target, "--insecure", "--metrics-listen", f"127.0.0.1:{_free_port()}",
             "--poll-interval", str(POLL_INTERVAL)],
        )
        stop = threading.Event()
        threads: list[threading.Thread] = []
        try:
            _wait_serving(target, control)
            board = _Board()
            ready = board.expect(10_000)
            connect_started = time.monotonic()
            for n in range(NODES):
                node = _Node(f"node-{n}", target, board)
                thread = threading.Thread(target=node.client.run, args=(stop,), daemon=True)
                thread.start()
                threads.append(thread)
            if not ready.wait(TIMEOUT):
                raise TimeoutError("not every node got its first snapshot")
            connect_seconds = time.monotonic() - connect_started
            time.sleep(1.0)  # let the snapshot acks settle before measuring
            cpu_before = _proc.cpu_seconds(control.pid)
            latencies: list[float] = []
            acked: list[float] = []  # confirmed by the control service's status (polled every 10 ms)
            for i in range(1, CHANGES + 1):
                new_port = 10_000 + i
                done = board.expect(new_port)
                started = time.monotonic()
                _write(root / "fanout.yaml", [_fanout_policy(new_port)])
                if not done.wait(TIMEOUT):
                    raise TimeoutError(f"change {i} did not reach every node")
                latencies.append(board.last(new_port) - started)
                acked.append(_wait_all_acked(target) - started)
                time.sleep(0.2)  # acks drain; changes do not overlap
            cpu_seconds = _proc.cpu_seconds(control.pid) - cpu_before
            memory = _proc.memory_kib(control.pid)
            rss_mb, peak_rss_mb = memory["VmRSS"] / 1024, memory["VmHWM"] / 1024
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=5)
            control.terminate()
            try:
                control.wait(timeout=15)
            except subprocess.TimeoutExpired:
                control.kill()
        return {
            "streams": NODES,
            "pods": NODES * PODS_PER_NODE,
            "changes": CHANGES,
            "poll_interval_ms": POLL_INTERVAL * 1000,
            "initial_connect_all_snapshots_s": round(connect_seconds, 3),
            "fanout_p50_ms": round(_percentile(latencies, 0.50) * 1000, 1),
            "fanout_p99_ms": round(_percentile(latencies, 0.99) * 1000, 1),
            "fanout_max_ms": round(max(latencies) * 1000, 1),
            "acks_confirmed_p50_ms": round(_percentile(acked, 0.50) * 1000, 1),
            "acks_confirmed_p99_ms": round(_percentile(acked, 0.99) * 1000, 1),
            "control_rss_mb": round(rss_mb, 1),
            "control_peak_rss_mb": round(peak_rss_mb, 1),
            "control_cpu_seconds_per_change": round(cpu_seconds / CHANGES, 4),
            "control_exit_code_on_sigterm": control.returncode,
        }


def main() -> int:
    result = run()
    print(json.dumps(result, indent=2))
    ok = result["acks_confirmed_p99_ms"] < 500 and result["control_peak_rss_mb"] < 300
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
