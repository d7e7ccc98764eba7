"""An independent check of generated policy sets: the test's own pods, the reference evaluator.

The derivation verifies itself; these helpers check it again from the outside, with endpoints
built here (not by agent.derive) and the expected connections written in each test by hand.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.cli import main
from agent.model.load import load_folder, load_text
from agent.model.objects import ContainerPort, IPAddress, NetworkPolicy, Pod, Protocol
from agent.policy.evaluator import evaluate
from agent.policy.state import ClusterState

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "data" / "derive"
BOOKINFO_ISTIO = REPO / "agent" / "lab" / "bookinfo" / "istio"
ENVOY_PORTS = (15000, 15001, 15006, 15020, 15021, 15090)
OUTSIDE = ipaddress.ip_address("192.0.2.99")  # an address no test data uses

Conn = tuple[str, str, str, int]  # (from, to, protocol, port) by endpoint name


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str
    summary: dict[str, Any]
    policies: list[NetworkPolicy]


def run_cli(capsys: pytest.CaptureFixture[str], tmp_path: Path, *argv: str) -> Run:
    summary_file = tmp_path / "summary.json"
    code = main([*argv, "--summary-json", str(summary_file)])
    out, err = capsys.readouterr()
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
    loaded = load_text(out, "<stdout>")
    assert not loaded.errors, loaded.errors
    policies = [o for o in loaded.objects if isinstance(o, NetworkPolicy)]
    assert len(policies) == len(loaded.objects) == len(summary.get("policies", [])) or code != 0
    return Run(code, out, err, summary, policies)


def pods_from_workloads(folder: Path) -> dict[str, Pod]:
    """One pod per Deployment/StatefulSet of the folder, named by the controller ("ns/name")."""
    pods: dict[str, Pod] = {}
    for file in sorted(folder.glob("*.yaml")):
        for doc in yaml.safe_load_all(file.read_text()):
            for item in doc.get("items", [doc]) if doc else []:
                if item.get("kind") not in ("Deployment", "StatefulSet"):
                    continue
                meta = item["metadata"]
                template = item["spec"]["template"]
                ports = tuple(
                    ContainerPort(p["containerPort"], Protocol(p.get("protocol", "TCP")), p.get("name"))
                    for c in template["spec"]["containers"]
                    for p in c.get("ports", [])
                )
                key = f"{meta['namespace']}/{meta['name']}"
                pods[key] = Pod(
                    meta["namespace"],
                    meta["name"],
                    "node",
                    labels=dict(template["metadata"]["labels"]),
                    ips=(ipaddress.ip_address(f"10.99.0.{len(pods) + 1}"),),
                    ports=ports,
                )
    return pods


def pods_from_source(folder: Path) -> dict[str, Pod]:
    return {o.key: o for o in load_folder(folder).objects if isinstance(o, Pod)}


def extra_pod(namespace: str, name: str, labels: dict[str, str], ip: str) -> Pod:
    return Pod(namespace, name, "node", labels=labels, ips=(ipaddress.ip_address(ip),))


def allowed(
    policies: list[NetworkPolicy], endpoints: dict[str, Pod | IPAddress], ports: set[tuple[str, int]]
) -> set[Conn]:
    """Every (from, to, protocol, port) the policies allow among `endpoints` on `ports`."""
    state = ClusterState.from_objects([*(e for e in endpoints.values() if isinstance(e, Pod)), *policies])
    result = set()
    for src_name, src in endpoints.items():
        for dst_name, dst in endpoints.items():
            if src_name == dst_name:
                continue
            for protocol, port in ports:
                if evaluate(state, src, dst, Protocol(protocol), port).allowed:
                    result.add((src_name, dst_name, protocol, port))
    return result


def isolated(policies: list[NetworkPolicy], pod: Pod | IPAddress) -> bool:
    """Does some policy select `pod` at all (either direction)?"""
    return isinstance(pod, Pod) and any(
        p.namespace == pod.namespace and p.pod_selector.matches(pod.labels) for p in policies
    )


def beyond_listed(summary: dict[str, Any]) -> set[Conn]:
    return {(b["from"], b["to"], b["protocol"], b["port"]) for b in summary["allowed_beyond"]}


def dns_to(names: list[str], dns: str) -> set[Conn]:
    return {(n, dns, proto, 53) for n in names for proto in ("UDP", "TCP")}
