"""The upstream ClusterNetworkPolicy conformance suite, as data: cluster builder, steps, probes.

Reads tests/data/npa/cases.json (layout in tests/data/npa/README.md) and knows nothing about
podfence's evaluator or dataplanes, so the evaluator-level test and a later lab run share it. It
produces Kubernetes objects as the API server returns them (plain dicts): the base topology's
namespaces and pods with IPs assigned here, two Linux nodes, and each test's objects as its steps
change them (changes accumulate within a test, as upstream).

Placement (upstream leaves it to the scheduler): the pods of each StatefulSet are spread over the
two nodes by ordinal, and host-network pod centaur-<i> runs on node <i> with that node's IP.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from tests.conftest import DATA

CNP_CASES_JSON = DATA / "npa" / "cases.json"
NODE_NAMES = ("cnp-node-0", "cnp-node-1")
NODE_IPS = ("192.168.77.10", "192.168.77.11")
KubeDict = dict[str, Any]


def load_cases() -> KubeDict:
    data: KubeDict = json.loads(CNP_CASES_JSON.read_text())
    return data


@dataclass(frozen=True)
class Probe:
    source: str  # "namespace/pod"
    destination: str  # "namespace/pod"; for target nodeIP a host-network pod (its IP is its node's)
    target: str  # "podIP" | "nodeIP"
    protocol: str  # "TCP" | "UDP" | "SCTP"
    port: int
    expect: bool
    why: dict[str, str]

    def __str__(self) -> str:
        return f"{self.source} -> {self.destination} ({self.target}) {self.protocol}/{self.port}"


@dataclass(frozen=True)
class Step:
    number: int
    subtest: str
    changes: tuple[KubeDict, ...]
    probes: tuple[Probe, ...]


@dataclass(frozen=True)
class Case:
    id: str
    features: tuple[str, ...]
    policies: tuple[KubeDict, ...]
    steps: tuple[Step, ...]


def cases() -> list[Case]:
    return [
        Case(
            id=test["id"],
            features=tuple(test["features"]),
            policies=tuple(test["policies"]),
            steps=tuple(
                Step(
                    number=step["step"],
                    subtest=step["subtest"],
                    changes=tuple(step.get("changes", ())),
                    probes=tuple(
                        Probe(
                            p["from"],
                            p["to"],
                            p["target"],
                            p["protocol"].upper(),
                            p["port"],
                            p["expect"],
                            p["why"],
                        )
                        for p in step["probes"]
                    ),
                )
                for step in test["steps"]
            ),
        )
        for test in load_cases()["tests"]
    ]


def _pod_ip(namespace_index: int, ordinal: int) -> str:
    return f"10.244.{namespace_index + 1}.{ordinal + 10}"


@dataclass
class CnpCluster:
    """The mutable cluster of one case: base topology plus the case's objects, as API dicts."""

    case: Case
    # The lab's placement, when it differs: pod key -> its IP, the two node names and their IPs
    # (a host-network pod's IP is its node's).
    pod_ips: dict[str, str] = field(default_factory=dict)
    node_names: tuple[str, str] = NODE_NAMES
    node_ips: tuple[str, str] = NODE_IPS
    namespaces: dict[str, KubeDict] = field(default_factory=dict)
    pods: dict[str, KubeDict] = field(default_factory=dict)  # "ns/name" -> Pod
    nodes: dict[str, KubeDict] = field(default_factory=dict)
    policies: dict[tuple[str, str, str], KubeDict] = field(default_factory=dict)  # (kind, ns, name)

    def __post_init__(self) -> None:
        topology = load_cases()["topology"]
        for node, ip in zip(self.node_names, self.node_ips, strict=True):
            self.nodes[node] = {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": node,
                    "labels": {"kubernetes.io/os": "linux", "kubernetes.io/hostname": node},
                },
                "status": {
                    "addresses": [
                        {"type": "InternalIP", "address": ip},
                        {"type": "Hostname", "address": node},
                    ]
                },
            }
        names = [ns["name"] for ns in topology["namespaces"]]
        for ns in topology["namespaces"]:
            self.namespaces[ns["name"]] = {
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {"name": ns["name"], "labels": dict(ns["labels"])},
            }
        for pod in topology["pods"]:
            ordinal = int(pod["name"].rsplit("-", 1)[1])
            host = pod["hostNetwork"]
            key = f"{pod['namespace']}/{pod['name']}"
            ip = self.node_ips[ordinal] if host else _pod_ip(names.index(pod["namespace"]), ordinal)
            ip = self.pod_ips.get(key, ip)
            self.pods[key] = {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "namespace": pod["namespace"],
                    "name": pod["name"],
                    "labels": dict(pod["labels"]),
                },
                "spec": {
                    "nodeName": self.node_names[ordinal % len(self.node_names)],
                    "hostNetwork": host,
                    "containers": [
                        {"name": c["name"], "ports": [dict(port) for port in c["declaredPorts"]]}
                        for c in pod["containers"]
                    ],
                },
                "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
            }
        for policy in self.case.policies:
            self._put(policy)

    def pod_ip(self, key: str) -> str:
        ip: str = self.pods[key]["status"]["podIP"]
        return ip

    def _fill(self, obj: KubeDict) -> KubeDict:
        """Substitutes `${podIP:<ns>/<pod>}` (always followed by /32 in the data: IPv4 here)."""
        text = json.dumps(obj)
        for key in self.pods:
            text = text.replace(f"${{podIP:{key}}}", self.pod_ip(key))
        assert "${" not in text, f"unfilled placeholder in {text}"
        filled: KubeDict = json.loads(text)
        return filled

    def _put(self, obj: KubeDict) -> None:
        metadata = obj["metadata"]
        self.policies[(obj["kind"], metadata.get("namespace", ""), metadata["name"])] = self._fill(obj)

    def apply(self, change: KubeDict) -> None:
        op = change["op"]
        if op in ("create", "update"):
            self._put(change["object"])
        elif op == "delete":
            del self.policies[(change["kind"], change.get("namespace", ""), change["name"])]
        elif op == "setNamespaceLabels":
            self.namespaces[change["name"]]["metadata"]["labels"] = dict(change["labels"])
        else:
            raise ValueError(f"unknown change {op!r}")

    def objects(self) -> list[KubeDict]:
        """Nodes, namespaces, pods, then policies; deep copies."""
        return copy.deepcopy(
            [*self.nodes.values(), *self.namespaces.values(), *self.pods.values(), *self.policies.values()]
        )


def runs() -> Iterator[Case]:
    yield from cases()
