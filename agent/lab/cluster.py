"""podfence running on the node lab: a control service with a folder source and one agent per node.

The control service runs in the root netns and listens on the root end of node1's management link,
an address every node reaches through its own management link. Each agent runs inside its node's
netns (`nsenter --net`, the mount namespace stays shared so its pins land under
/sys/fs/bpf/pflab-<node>). The folder holds what an API server would: Namespaces, Pods (with
nodeName, labels, named container ports and pod IPs) and NetworkPolicies; scenarios change it and
wait until every agent has acknowledged the new version (`podfence status --json`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import yaml

from agent.control.status import fetch_status, status_to_dict
from agent.lab import wiring
from agent.lab.machine import RUN_DIR, LabError, child_environment, stop_pid_file
from agent.lab.topology import Lab

log = logging.getLogger(__name__)

NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"
DATAPLANES = ("bpf", "iptables")
FAILED_APPLY_GRACE_S = 5.0


def free_port(address: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((address, 0))
        return int(sock.getsockname()[1])


def namespace_object(name: str, labels: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": name, "labels": {NAMESPACE_NAME_LABEL: name, **labels}},
    }


def pod_object(lab: Lab, key: str, labels: dict[str, str]) -> dict[str, Any]:
    """The Pod as `kubectl get -o yaml` shows it, with one container per served port like upstream."""
    pod = lab.pods[key]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"namespace": pod.spec.namespace, "name": pod.spec.name, "labels": dict(labels)},
        "spec": {
            "nodeName": pod.spec.node,
            "hostNetwork": pod.spec.host_network,
            "containers": [
                {
                    "name": f"cont-{sp.port}-{sp.protocol.value.lower()}",
                    "image": "podfence-lab/servers",
                    "ports": [{"name": sp.name, "containerPort": sp.port, "protocol": sp.protocol.value}],
                }
                for sp in pod.spec.ports
            ]
            or [{"name": "main", "image": "podfence-lab/servers"}],
        },
        "status": {
            "phase": "Running",
            "podIP": pod.ip,
            "podIPs": [{"ip": pod.ip}, *([{"ip": pod.ip6}] if pod.ip6 else [])],
        },
    }


@dataclass
class PodfenceOnLab:
    """Control service + agents for one lab, and the folder source they enforce."""

    lab: Lab
    dataplane: str
    source_dir: Path
    log_dir: Path = RUN_DIR
    namespace_labels: dict[str, dict[str, str]] = field(default_factory=dict)
    pod_labels: dict[str, dict[str, str]] = field(default_factory=dict)
    control_address: str = ""
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    # --- the folder source ------------------------------------------------------------------

    def write_documents(self, file_name: str, documents: Iterable[dict[str, Any]]) -> bool:
        """Replace one file of the source atomically (the control service never sees half a file).

        Returns whether the content changed; an unchanged file is not rewritten, so callers know
        that no new policy version is coming.
        """
        target = self.source_dir / file_name
        text = yaml.safe_dump_all(list(documents), sort_keys=False)
        if target.exists() and target.read_text() == text:
            return False
        partial = self.source_dir / f".{file_name}.partial"  # hidden: the folder source skips it
        partial.write_text(text)
        partial.replace(target)
        return True

    def remove_file(self, file_name: str) -> bool:
        target = self.source_dir / file_name
        existed = target.exists()
        target.unlink(missing_ok=True)
        return existed

    def policy_files(self) -> list[Path]:
        return sorted(self.source_dir.glob("policy-*.yaml"))

    def write_cluster_objects(self) -> None:
        namespaces = sorted({p.spec.namespace for p in self.lab.pods.values()} | set(self.namespace_labels))
        self.write_documents(
            "namespaces.yaml", (namespace_object(ns, self.namespace_labels.get(ns, {})) for ns in namespaces)
        )
        self.write_documents(
            "pods.yaml",
            (
                pod_object(self.lab, key, self.pod_labels.get(key, pod.spec.labels))
                for key, pod in sorted(self.lab.pods.items())
            ),
        )

    def set_pod_labels(self, key: str, labels: dict[str, str]) -> None:
        self.pod_labels[key] = dict(labels)
        self.write_cluster_objects()

    def set_namespace_labels(self, namespace: str, labels: dict[str, str]) -> None:
        self.namespace_labels[namespace] = dict(labels)
        self.write_cluster_objects()

    def reset(self) -> None:
        """Back to the lab's own labels and no policies."""
        for path in self.policy_files():
            path.unlink()
        self.pod_labels.clear()
        self.namespace_labels.clear()
        self.write_cluster_objects()

    # --- processes --------------------------------------------------------------------------

    def _spawn(self, name: str, argv: list[str]) -> None:
        log_file = (self.log_dir / f"{name}.log").open("ab")
        process = subprocess.Popen(
            argv, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True, env=child_environment()
        )
        self.processes[name] = process
        (RUN_DIR / f"{name}.pid").write_text(str(process.pid))

    def start(self, timeout: float = 60.0) -> None:
        RUN_DIR.mkdir(parents=True, exist_ok=True)
        self.source_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.write_cluster_objects()
        address = self.lab.control_address
        self.control_address = f"{address}:{free_port(address)}"
        podfence = [sys.executable, "-m", "agent.cli"]
        self._spawn(
            "control",
            [
                *podfence,
                "control",
                "--source",
                str(self.source_dir),
                "--listen",
                self.control_address,
                "--insecure",
                # the lab's plaintext control, on an address of this host only: `podfence observe`
                # reads its flows without an identity (a real deployment names its readers)
                "--observe-without-identity",
                "--metrics-listen",
                f"{address}:{free_port(address)}",
                "--poll-interval",
                "0.1",
            ],
        )
        for node in self.lab.nodes.values():
            self._spawn(
                f"agent-{node.name}",
                wiring.argv_in(
                    node.netns,
                    [
                        *podfence,
                        "agent",
                        "--node",
                        node.name,
                        "--control",
                        self.control_address,
                        "--insecure",
                        "--dataplane",
                        self.dataplane,
                        "--pin-dir",
                        node.pin_dir,
                        "--generation-file",
                        str(RUN_DIR / f"{node.name}.enforced-generation"),
                        "--metrics-listen",
                        f"{node.mgmt_ip}:9301",
                    ],
                ),
            )
        self.wait_applied(timeout=timeout)

    def stop(self) -> None:
        # Agents first: a control service that goes away first only fills their logs with retries.
        # The agents stop side by side: each one's stop is mostly waiting for its threads.
        agents = [name for name in self.processes if name != "control"]
        with ThreadPoolExecutor(max_workers=max(1, len(agents)), thread_name_prefix="stop") as pool:
            list(pool.map(self._stop_one, agents))
        if "control" in self.processes:
            self._stop_one("control")

    def _stop_one(self, name: str) -> None:
        stop_pid_file(RUN_DIR / f"{name}.pid", grace_seconds=5.0)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.processes.pop(name).wait(timeout=1)

    def logs(self, tail_lines: int = 30) -> str:
        parts = []
        for name in ["control", *(f"agent-{n}" for n in self.lab.nodes)]:
            path = self.log_dir / f"{name}.log"
            if path.exists():
                lines = path.read_text(errors="replace").splitlines()[-tail_lines:]
                parts.append(f"--- {name} ---\n" + "\n".join(lines))
        return "\n".join(parts)

    # --- status -----------------------------------------------------------------------------

    def status(self) -> dict[str, Any] | None:
        """What `podfence status --json` prints, or None while the control service does not answer.

        Polled often, so it calls the same client code in-process instead of starting a Python
        process per poll; `status_via_cli` checks the command itself.
        """
        try:
            return status_to_dict(fetch_status(self.control_address, None, timeout=2.0))
        except grpc.RpcError:
            return None

    def status_via_cli(self) -> dict[str, Any] | None:
        """`podfence status --control ADDR --json` as a user runs it, or None if it fails."""
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "agent.cli",
                "status",
                "--control",
                self.control_address,
                "--json",
                "--timeout",
                "2",
            ],
            capture_output=True,
            text=True,
            check=False,
            env=child_environment(),
        )
        if result.returncode != 0:
            return None
        try:
            parsed: dict[str, Any] = json.loads(result.stdout)
        except json.JSONDecodeError:
            return None
        return parsed

    def _check_alive(self) -> None:
        for name, process in self.processes.items():
            if process.poll() is not None:
                raise LabError(f"{name} exited with {process.returncode}\n{self.logs()}")

    def wait_applied(self, after_version: int | None = None, timeout: float = 20.0) -> int:
        """Wait until every node has applied the current version (one newer than `after_version`).

        If the version does not move past `after_version` within a few seconds, the change did not
        alter what the control service serves; the current version is then the one to wait for.
        """
        deadline = time.monotonic() + timeout
        bump_deadline = time.monotonic() + 3.0
        failing_since: float | None = None
        while True:
            self._check_alive()
            status = self.status()
            if status is not None:
                version = int(status["version"])
                nodes = status.get("nodes", {})
                moved = after_version is None or version > after_version or time.monotonic() > bump_deadline
                applied = all(
                    name in nodes
                    and nodes[name].get("connected")
                    and int(nodes[name].get("applied_version", -1)) >= version
                    for name in self.lab.nodes
                )
                if moved and applied:
                    return version
                # A node that reports an error for the version it has not applied is not slow, it
                # failed; give it a moment to retry, then stop waiting.
                failing = [
                    name
                    for name, node in nodes.items()
                    if node.get("last_error") and int(node.get("applied_version", -1)) < version
                ]
                if not failing:
                    failing_since = None
                elif failing_since is None:
                    failing_since = time.monotonic()
                elif time.monotonic() - failing_since > FAILED_APPLY_GRACE_S:
                    raise LabError(
                        f"nodes {failing} failed to apply version {version}: {status}\n{self.logs()}"
                    )
            if time.monotonic() > deadline:
                raise LabError(f"nodes did not apply the policy in {timeout} s: {status}\n{self.logs()}")
            time.sleep(0.1)

    def current_version(self) -> int:
        status = self.status()
        if status is None:
            raise LabError(f"control service at {self.control_address} does not answer\n{self.logs()}")
        return int(status["version"])
