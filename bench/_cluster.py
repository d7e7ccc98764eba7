"""One benchmark node with many pods, the control service's folder, and real `podfence` processes.

Shared by the propagation, cold-start and footprint benchmarks. The node is a `pfbench-` netns
(bench/_netlab.py) with one routed veth per pod; the control service and the agent both run
inside it (the control service listens on the node's loopback), so nothing is added to the root
netns. The folder holds one Namespace, the pods (spec.nodeName = the node, status.podIP = the
address the topology gave them) and a ring of per-app policies: app k admits app k+1 on TCP 8080,
so every pod is isolated and every endpoint carries allows.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from agent.dataplane.netns import inside
from bench import _netlab
from bench._netlab import Topology

NAMESPACE = "bench"
NODE = "n1"
APPS = 10
SERVE_PORT = 8080


def pod_manifest(name: str, ip: str, labels: dict[str, str], node: str = NODE) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"namespace": NAMESPACE, "name": name, "labels": labels},
        "spec": {
            "nodeName": node,
            "containers": [{"name": "c", "image": "bench", "ports": [{"containerPort": SERVE_PORT}]}],
        },
        "status": {"podIP": ip, "podIPs": [{"ip": ip}]},
    }


def pod_labels(index: int) -> dict[str, str]:
    return {"app": f"a{index % APPS}"}


def ingress_policy(name: str, selected: dict[str, str], admitted: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"namespace": NAMESPACE, "name": name},
        "spec": {
            "podSelector": {"matchLabels": selected},
            "policyTypes": ["Ingress"],
            "ingress": [
                {
                    "from": [{"podSelector": {"matchLabels": admitted}}],
                    "ports": [{"protocol": "TCP", "port": SERVE_PORT}],
                }
            ],
        },
    }


def write_yaml(path: Path, objects: list[dict[str, Any]]) -> None:
    """Atomic replace, so the control service never reads a half-written file."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(yaml.safe_dump_all(objects, sort_keys=False))
    os.replace(temporary, path)


def write_base_folder(folder: Path, topology: Topology, extra_labels: dict[str, dict[str, str]]) -> None:
    namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}
    pods = []
    for index, pod in enumerate(topology.pods.values()):
        labels = {**pod_labels(index), **extra_labels.get(pod.name, {})}
        pods.append(pod_manifest(pod.name, pod.ip, labels))
    write_yaml(folder / "00-namespace.yaml", [namespace])
    write_yaml(folder / "10-pods.yaml", pods)
    ring = [ingress_policy(f"ring-{k}", {"app": f"a{k}"}, {"app": f"a{(k + 1) % APPS}"}) for k in range(APPS)]
    write_yaml(folder / "20-ring.yaml", ring)


def build_node(tag: str, pod_count: int) -> Topology:
    topology = Topology(tag=tag)
    topology.build(1, [(f"p{i}", 1) for i in range(pod_count)])
    return topology


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def scrape(netns_name: str, port: int) -> dict[str, float]:
    """Every sample of a /metrics page served inside `netns_name`, keyed by name{labels}."""
    url = f"http://127.0.0.1:{port}/metrics"
    with inside(netns_name), urllib.request.urlopen(url, timeout=2) as response:
        text = response.read().decode()
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = float(sample.value)
    return samples


@dataclass
class Processes:
    """`podfence control` and `podfence agent` inside the node netns; logs under `workdir`."""

    topology: Topology
    folder: Path
    workdir: Path
    dataplane: str = "bpf"
    poll_interval: float = 0.2
    control_port: int = field(default_factory=free_port)
    control_metrics_port: int = field(default_factory=free_port)
    agent_metrics_port: int = field(default_factory=free_port)
    agent_log_level: str = "info"
    control_args: tuple[str, ...] = ()  # more `podfence control` flags
    control: subprocess.Popen[bytes] | None = None
    agent: subprocess.Popen[bytes] | None = None

    @property
    def node(self) -> _netlab.BenchNode:
        return self.topology.nodes[NODE]

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = (self.workdir / f"{name}.log").open("ab")
        return subprocess.Popen(
            _netlab.in_netns_argv(self.node.netns, argv),
            stdout=log,
            stderr=log,
            env=_netlab.child_env(),
            start_new_session=True,
        )

    def start_control(self) -> None:
        self.control = self._spawn(
            "control",
            _netlab.python_argv(
                "agent.cli", "--log-format", "json", "control", "--source", str(self.folder), "--insecure",
                "--listen", f"127.0.0.1:{self.control_port}",
                "--metrics-listen", f"127.0.0.1:{self.control_metrics_port}",
                "--poll-interval", str(self.poll_interval), *self.control_args,
            ),
        )
        self.wait(lambda: self.control_version() >= 0, "control service metrics", 30)

    def start_agent(self) -> None:
        self.agent = self._spawn(
            "agent",
            _netlab.python_argv(
                "agent.cli", "--log-format", "json", "--log-level", self.agent_log_level,
                "agent", "--node", NODE, "--control", f"127.0.0.1:{self.control_port}",
                "--insecure", "--dataplane", self.dataplane, "--pin-dir", self.node.pin_dir,
                "--metrics-listen", f"127.0.0.1:{self.agent_metrics_port}",
            ),
        )

    def control_version(self) -> int:
        try:
            return int(scrape(self.node.netns, self.control_metrics_port)["podfence_control_policy_version"])
        except (OSError, KeyError):
            return -1

    def agent_metrics(self) -> dict[str, float]:
        try:
            return scrape(self.node.netns, self.agent_metrics_port)
        except OSError:
            return {}

    def caught_up(self, endpoints: int) -> bool:
        """The agent has programmed the control service's current version for every endpoint."""
        metrics = self.agent_metrics()
        version = self.control_version()
        return (
            version >= 0
            and metrics.get("podfence_applied_version") == version
            and metrics.get("podfence_located_endpoints", 0) >= endpoints
        )

    def wait(self, condition: Any, what: str, timeout: float, interval: float = 0.02) -> float:
        """Poll `condition` until true; returns when it became true (monotonic). Fails on a dead child."""
        deadline = time.monotonic() + timeout
        while True:
            if condition():
                return time.monotonic()
            for process in (self.control, self.agent):
                if process is not None and process.poll() is not None:
                    raise RuntimeError(f"{what}: a podfence process exited; see logs in {self.workdir}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what}: not reached within {timeout} s; see logs in {self.workdir}")
            time.sleep(interval)

    def stop_agent(self) -> None:
        _stop(self.agent)
        self.agent = None

    def stop(self) -> None:
        _stop(self.agent)
        _stop(self.control)
        self.agent = self.control = None


def read_json_log(path: Path) -> list[dict[str, Any]]:
    """The JSON log lines of a process (other lines, e.g. from BCC's compiler, are skipped)."""
    entries = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                entries.append(json.loads(line))
    return entries


def log_time(entry: dict[str, Any]) -> float:
    """Wall-clock seconds of a JSON log entry ("2026-11-22T06:10:38.123Z")."""
    stamp = datetime.datetime.strptime(entry["ts"], "%Y-%m-%dT%H:%M:%S.%fZ")
    return stamp.replace(tzinfo=datetime.UTC).timestamp()


def _stop(process: subprocess.Popen[bytes] | None, grace: float = 10.0) -> None:
    if process is None or process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def agent_pid(processes: Processes) -> int:
    """The agent's own pid: Popen runs nsenter, which execs python in place (same pid)."""
    assert processes.agent is not None
    return processes.agent.pid


@contextlib.contextmanager
def node_with_pods(tag: str, pod_count: int) -> Iterator[Topology]:
    _netlab.remove_all(f"{_netlab.PREFIX}{tag}-")
    topology = build_node(tag, pod_count)
    try:
        yield topology
    finally:
        topology.teardown()
