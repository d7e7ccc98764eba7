"""Pod sets for the lab: the upstream e2e pods, and pods read from a scenario file.

A scenario file (`podfence lab up --pods FILE`) is YAML:

    pods:
    - {namespace: x, name: a, node: node1, labels: {pod: a}, ports: ["80/TCP", "80/UDP", "81/SCTP"]}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from agent.lab.machine import LabError
from agent.lab.topology import PodSpec, Protocol, ServerPort, node_name

UPSTREAM_NAMESPACES = ("x", "y", "z")
UPSTREAM_POD_NAMES = ("a", "b", "c")
UPSTREAM_PORTS = tuple(ServerPort(port, proto) for port in (80, 81) for proto in Protocol)


def upstream_pods(node_count: int = 2) -> list[PodSpec]:
    """The 9 pods of the upstream Netpol suite, each serving 80 and 81 on TCP, UDP and SCTP.

    Pods alternate between nodes in namespace-major order (x/a node1, x/b node2, x/c node1, ...),
    so every namespace and most pod pairs cross a node boundary.
    """
    pods = []
    for index, (namespace, name) in enumerate(
        (ns, pod) for ns in UPSTREAM_NAMESPACES for pod in UPSTREAM_POD_NAMES
    ):
        pods.append(
            PodSpec(namespace, name, node_name(index % node_count + 1), {"pod": name}, UPSTREAM_PORTS)
        )
    return pods


def _server_port(text: str) -> ServerPort:
    port, _, proto = str(text).partition("/")
    try:
        return ServerPort(int(port), Protocol((proto or "TCP").upper()))
    except ValueError as err:
        raise LabError(f"bad port {text!r} (want PORT/TCP|UDP|SCTP)") from err


def pods_from_file(path: Path, node_count: int) -> list[PodSpec]:
    try:
        document: dict[str, Any] = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise LabError(f"cannot read {path}: {err}") from err
    pods = []
    for index, raw in enumerate(document.get("pods", [])):
        try:
            pods.append(
                PodSpec(
                    namespace=str(raw["namespace"]),
                    name=str(raw["name"]),
                    node=str(raw.get("node", node_name(index % node_count + 1))),
                    labels={str(k): str(v) for k, v in (raw.get("labels") or {}).items()},
                    ports=tuple(_server_port(p) for p in raw.get("ports", [])),
                )
            )
        except (KeyError, TypeError) as err:
            raise LabError(f"{path}: pods[{index}]: missing or bad field {err}") from err
    return pods
