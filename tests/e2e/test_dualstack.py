"""IPv6 end to end on a dual-stack lab: the same policies must hold for both address families.

Upstream runs its Netpol suite once per cluster IP family; here one dual-stack lab per (dataplane,
CNI mode) checks that a default-deny-ingress policy and an IPv6 ipBlock egress rule are enforced on
IPv6 traffic through Service ClusterIPs exactly as they are on IPv4.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from agent.lab.cluster import PodfenceOnLab
from agent.lab.machine import teardown
from agent.lab.prober import Endpoint, TruthTable, comparison, probe_table
from agent.lab.scenarios import upstream_pods
from agent.lab.topology import CniMode, Lab
from tests.e2e.test_conformance import LAB_LOCK_WAIT_S, _missing_dataplane

PODS = [f"{ns}/{pod}" for ns in "xyz" for pod in "abc"]


@pytest.fixture(
    scope="module",
    params=[(dp, mode) for dp in ("bpf", "iptables") for mode in CniMode],
    ids=lambda p: f"{p[0]}-{p[1].value}",
)
def podfence(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PodfenceOnLab]:
    dataplane, mode = request.param
    missing = _missing_dataplane(dataplane)
    if missing:
        pytest.skip(missing)
    teardown(LAB_LOCK_WAIT_S)
    lab = Lab(node_count=2, mode=mode, ipv6=True)
    work = tmp_path_factory.mktemp(f"dualstack-{dataplane}-{mode.value}")
    running = PodfenceOnLab(lab, dataplane, source_dir=work / "source", log_dir=work / "logs")
    try:
        lab.build(upstream_pods(2), lock_wait_seconds=LAB_LOCK_WAIT_S)
        running.start()
        yield running
    finally:
        running.stop()
        teardown(LAB_LOCK_WAIT_S)


def _policy(namespace: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"namespace": namespace, "name": name},
        "spec": spec,
    }


def _apply(podfence: PodfenceOnLab, policies: list[dict[str, Any]]) -> None:
    version = podfence.current_version()
    podfence.write_documents("policies.yaml", policies)
    podfence.wait_applied(after_version=version)


def _check(podfence: PodfenceOnLab, blocked: set[tuple[str, str]], family: int) -> None:
    pods = podfence.lab.pods
    endpoints = [
        Endpoint(key, pods[key].netns, (pods[key].service_ip if family == 4 else pods[key].service_ip6) or "")
        for key in PODS
    ]
    expected = TruthTable.filled(PODS, PODS)
    expected.cells.update({cell: False for cell in blocked})
    observed = probe_table(endpoints, endpoints, 80, "TCP", timeout=0.6)
    if expected.differences(observed):
        observed = probe_table(endpoints, endpoints, 80, "TCP", timeout=0.6)  # upstream probes twice too
    assert expected.differences(observed) == [], (
        f"IPv{family}\n{comparison(expected, observed)}\n{podfence.logs()}"
    )


def test_default_deny_ingress_holds_for_ipv6(podfence: PodfenceOnLab) -> None:
    _apply(
        podfence,
        [_policy("x", "deny-ingress", {"podSelector": {}, "policyTypes": ["Ingress"], "ingress": []})],
    )
    blocked = {(src, dst) for src in PODS for dst in PODS if dst.startswith("x/") and src != dst}
    _check(podfence, blocked, family=6)
    _check(podfence, blocked, family=4)


def test_ipv6_ipblock_egress_allows_only_that_pod(podfence: PodfenceOnLab) -> None:
    target = podfence.lab.pods["y/b"]
    spec = {
        "podSelector": {"matchLabels": {"pod": "a"}},
        "policyTypes": ["Egress"],
        "egress": [{"to": [{"ipBlock": {"cidr": f"{target.ip6}/128"}}]}],
    }
    _apply(podfence, [_policy("x", "egress-to-yb-v6", spec)])
    _check(podfence, {("x/a", dst) for dst in PODS if dst not in ("x/a", "y/b")}, family=6)
    # The IPv6 block says nothing about IPv4: over IPv4, x/a reaches nobody.
    _check(podfence, {("x/a", dst) for dst in PODS if dst != "x/a"}, family=4)
