"""The upstream Kubernetes netpol e2e model, as data: cluster builder, case/step iterator, truth table.

Shared by the evaluator-level conformance test and the node-lab end-to-end run, so it knows
nothing about podfence's evaluator or dataplane: it produces Kubernetes objects as the API server
returns them (plain dicts, `kubectl get -o yaml` shape) and the expected reachability of every
ordered pod pair. The cases come from tests/data/k8s_netpol_cases.json; each step's
actions are YAML-ish text with placeholders (`<y>`, `<podIP of y/b>`, ...) that are filled here.

Model (from upstream model.go / kubemanager.go): namespaces x, y, z (actual names `netpol-x`...,
labelled only with kubernetes.io/metadata.name), pods a, b, c labelled `pod: <name>`, one
container per served (port, protocol) with a containerPort named `serve-<port>-<proto>`.
"""

from __future__ import annotations

import copy
import ipaddress
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import CONFORMANCE_JSON

NAMESPACE_BASES = ("x", "y", "z")
POD_NAMES = ("a", "b", "c")
ALL_PODS = tuple(f"{ns}/{pod}" for ns in NAMESPACE_BASES for pod in POD_NAMES)
OLD, NEW = "old", "new"  # the 9-pod topology, and the per-test explicit topology (PR #137110)
NODE_NAME = "node-1"
NAME_LABEL = "kubernetes.io/metadata.name"

Pair = tuple[str, str]  # ("x/a", "y/b"): from, to (model names, base namespaces)
KubeDict = dict[str, Any]


def namespace_name(base: str, root: str = "netpol") -> str:
    """The actual namespace name of model namespace `base` (upstream appends a random suffix)."""
    return f"{root}-{base}"


def pod_ip(model_pod: str) -> str:
    """A stable IPv4 per model pod; all inside 10.0.0.0/8 (so within the /4 that case 35 builds)."""
    base, name = model_pod.split("/")
    return f"10.244.{NAMESPACE_BASES.index(base) + 1}.{POD_NAMES.index(name) + 10}"


def port_name(port: int, protocol: str) -> str:
    return f"serve-{port}-{protocol.lower()}"


@dataclass(frozen=True)
class Probe:
    protocol: str  # "TCP" | "UDP" | "SCTP"
    port: int


@dataclass(frozen=True)
class Step:
    index: int
    actions: tuple[str, ...]
    probe: Probe
    blocked: dict[str, frozenset[Pair]]  # topology (OLD/NEW) -> blocked pairs

    def expected(self, pods: tuple[str, ...], topology: str) -> dict[Pair, bool]:
        """Every ordered non-loopback pair of `pods` -> should it connect (loopback is not judged)."""
        blocked = self.blocked[topology]
        return {(src, dst): (src, dst) not in blocked for src in pods for dst in pods if src != dst}


@dataclass(frozen=True)
class Case:
    id: int
    it: str
    ports: tuple[int, ...]
    protocols: tuple[str, ...]
    new_topology: tuple[str, ...]
    steps: tuple[Step, ...]

    def pods(self, topology: str) -> tuple[str, ...]:
        return ALL_PODS if topology == OLD else self.new_topology


def _pairs(items: list[str]) -> frozenset[Pair]:
    return frozenset((src, dst) for src, dst in (item.split("->") for item in items))


def load_cases(path: Path = CONFORMANCE_JSON) -> list[Case]:
    raw = json.loads(path.read_text())
    return [
        Case(
            id=c["id"],
            it=c["it"],
            ports=tuple(c["servers"]["ports"]),
            protocols=tuple(c["servers"]["protocols"]),
            new_topology=tuple(c["new_topology"]),
            steps=tuple(
                Step(
                    index=i,
                    actions=tuple(s["actions"]),
                    probe=Probe(s["probe"]["protocol"], s["probe"]["port"]),
                    blocked={OLD: _pairs(s["blocked_old_topology"]), NEW: _pairs(s["blocked_new_topology"])},
                )
                for i, s in enumerate(c["steps"])
            ),
        )
        for c in raw
    ]


@dataclass
class ConformanceCluster:
    """The mutable cluster of one case run: objects as API dicts, changed by the steps' actions."""

    case: Case
    topology: str
    namespaces: dict[str, KubeDict] = field(default_factory=dict)  # base -> Namespace
    pods: dict[str, KubeDict] = field(default_factory=dict)  # "x/a" -> Pod
    policies: dict[tuple[str, str], KubeDict] = field(default_factory=dict)  # (actual ns, name)
    _last_policy: tuple[str, str] | None = None

    def __post_init__(self) -> None:
        for base in NAMESPACE_BASES:  # all three exist even when the topology leaves one empty
            name = namespace_name(base)
            self.namespaces[base] = {
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {"name": name, "labels": {NAME_LABEL: name}},
            }
        for model_pod in self.case.pods(self.topology):
            self.pods[model_pod] = self._pod(model_pod)

    def _pod(self, model_pod: str) -> KubeDict:
        base, name = model_pod.split("/")
        ip = pod_ip(model_pod)
        containers = [
            {
                "name": f"cont-{port}-{protocol.lower()}",
                "image": "registry.k8s.io/e2e-test-images/agnhost:2.53",
                "ports": [{"containerPort": port, "protocol": protocol, "name": port_name(port, protocol)}],
            }
            for port in self.case.ports
            for protocol in self.case.protocols
        ]
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"namespace": namespace_name(base), "name": name, "labels": {"pod": name}},
            "spec": {"nodeName": NODE_NAME, "containers": containers},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
        }

    def objects(self) -> list[KubeDict]:
        """Namespaces, pods, then policies; deep copies, safe to mutate or dump."""
        return copy.deepcopy([*self.namespaces.values(), *self.pods.values(), *self.policies.values()])

    def model_pod_of(self, namespace: str, name: str) -> str:
        """Actual namespace + pod name -> model name "x/a"."""
        for base in NAMESPACE_BASES:
            if namespace_name(base) == namespace:
                return f"{base}/{name}"
        raise KeyError(namespace)

    # ---- actions ---------------------------------------------------------------------------

    def apply(self, action: str) -> None:
        header = action.split("\n", 1)[0]
        if header == "(no change)":
            return
        if header.startswith("DELETE all NetworkPolicies"):
            self.policies.clear()
            return
        if header.startswith("UPDATE same policy: spec.ingress = []"):
            assert self._last_policy is not None, "update before any policy"
            self.policies[self._last_policy]["spec"]["ingress"] = []
            return
        label = re.match(r"add label (\S+)=(\S+) to (namespace|pod) (\S+)", header)
        if label:
            key, value, kind, target = label.groups()
            obj = self.namespaces[target] if kind == "namespace" else self.pods[target]
            obj["metadata"].setdefault("labels", {})[key] = value
            return
        if header.startswith(("create", "UPDATE (not create!)")):
            for policy in self._parse_policies(action.split("\n", 1)[1]):
                key = (policy["metadata"]["namespace"], policy["metadata"]["name"])
                self.policies[key] = policy
                self._last_policy = key
            return
        raise ValueError(f"unknown action: {header!r}")

    def _fill_placeholders(self, text: str) -> str:
        def ip_of(match: re.Match[str]) -> str:
            return pod_ip(match.group(1))

        # Case 35/36: the /4 network that contains x/b's IP (upstream makeLargeCIDRForIP).
        large = str(ipaddress.ip_network(f"{pod_ip('x/b')}/4", strict=False))
        text = re.sub(r"cidr: <NEW:.*", f"cidr: {large}", text)
        text = re.sub(r"<podIP of (\w/\w)>", ip_of, text)
        text = re.sub(r"<podIP\((\w/\w)\)>", ip_of, text)
        return re.sub(r"<([xyz])>", lambda m: namespace_name(m.group(1)), text)

    def _parse_policies(self, body: str) -> list[KubeDict]:
        policies: list[KubeDict] = []
        for document in self._fill_placeholders(body).split("\n---\n"):
            # Case 28 abbreviates its second policy's rule as "(same rule: ...)": reuse the first's.
            same_rule = re.search(r"^  ingress: \(same rule.*$", document, flags=re.M)
            doc_text = document[: same_rule.start()] + "  ingress: []" if same_rule else document
            doc = yaml.safe_load(doc_text)
            spec = doc["spec"]
            if same_rule:
                spec["ingress"] = copy.deepcopy(policies[-1]["spec"]["ingress"])
            policies.append(
                {
                    "apiVersion": "networking.k8s.io/v1",
                    "kind": "NetworkPolicy",
                    "metadata": {"namespace": namespace_name(doc["ns"]), "name": doc["name"]},
                    "spec": spec,
                }
            )
        return policies


def runs() -> Iterator[tuple[Case, str]]:
    """Every (case, topology) to run."""
    for case in load_cases():
        for topology in (OLD, NEW):
            yield case, topology
