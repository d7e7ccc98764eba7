"""Differential: ClusterNetworkPolicy mixed with NetworkPolicy, reference evaluator vs the kernel.

Hypothesis draws small clusters (tests/cnp_scenarios.py: both tiers, every action, equal
priorities, namespaces/pods/networks/nodes peers, numbered/ranged/named ports, unknown entries
that must fail closed). The Resolver compiles each node's policy, which crosses the wire as the
agent gets it (control.encode snapshot -> node.sync decode), and BpfDataplane.apply programs the
maps. Then every connection between the scenario's pods, on TCP, UDP, SCTP and ICMP echo, runs
through the real programs (BPF_PROG_TEST_RUN, first packets: conntrack emptied before each) of
every local endpoint it concerns: the egress verdict of the source pod's veth and netfilter
egress judge, the ingress verdict of the destination's veth. Each must equal the evaluator's
verdict for that direction (agent.policy.evaluator, which reads the objects, never the
compiled form). The node's own addresses are left out of NodeState: their kubelet exception is
the dataplane's, not the evaluator's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings

from agent.control.encode import snapshot_message
from agent.dataplane.types import NodeState
from agent.model.objects import Pod
from agent.node.decode import apply_message
from agent.policy.evaluator import evaluate
from agent.policy.resolver import Resolver
from tests.cnp_scenarios import ICMP, NODES, PROBE_PORTS, SCTP, TCP, UDP, Scenario, scenarios
from tests.privileged.test_bpf_fuzz import SLOTS, Bench, _bench, ip_frame, l4_bytes, pytestmark  # noqa: F401

KINDS = {TCP: "tcp", UDP: "udp", SCTP: "sctp", ICMP: "echo"}
TIERS = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@pytest.fixture(scope="module")
def bench() -> Iterator[Bench]:
    with _bench("keep") as made:
        yield made


def _frame(src: Pod, dst: Pod, protocol: int, port: int) -> bytes:
    number, l4 = l4_bytes(KINDS[protocol], 4, 40000, port)
    return ip_frame(4, src.ips[0], dst.ips[0], number, l4)


def _node_state(resolver: Resolver, node: str, bench: Bench) -> tuple[NodeState, dict[str, int]]:
    """The node's policy as the agent decodes it, its first SLOTS endpoints bound to veths."""
    decoded = apply_message(None, snapshot_message(1, resolver.node_policy(node)))
    local = dict(zip(sorted(decoded.endpoints)[:SLOTS], bench.ifindexes, strict=False))
    endpoints = {key: dataclasses.replace(e, ifindex=local.get(key)) for key, e in decoded.endpoints.items()}
    return NodeState(0, endpoints, decoded.identities), local


def kernel_disagreements(bench: Bench, scenario: Scenario) -> list[str]:
    resolver = Resolver()
    resolver.replace_all(scenario.objects)
    pods = resolver.state.pods
    wrong = []
    for node in NODES:
        state, local = _node_state(resolver, node, bench)
        bench.apply(state)
        for src in pods.values():
            for dst in pods.values():
                if src.key == dst.key or not ({src.key, dst.key} & local.keys()):
                    continue
                for protocol, port in PROBE_PORTS:
                    verdict = evaluate(resolver.state, src, dst, protocol, port)
                    frame = _frame(src, dst, protocol, port)
                    if src.key in local:
                        bench.forget_flows()
                        kernel = bench.egress_path(frame, local[src.key])
                        if kernel != verdict.egress.allowed:
                            wrong.append(f"egress {src.key}->{dst.key} {protocol}/{port}: kernel {kernel}")
                    if dst.key in local:
                        bench.forget_flows()
                        kernel = bench.passes("to_pod", frame, local[dst.key])
                        if kernel != verdict.ingress.allowed:
                            wrong.append(f"ingress {src.key}->{dst.key} {protocol}/{port}: kernel {kernel}")
    return wrong


@TIERS
@given(scenarios())
def test_kernel_agrees_with_the_evaluator(bench: Bench, scenario: Scenario) -> None:
    wrong = kernel_disagreements(bench, scenario)
    assert not wrong, wrong[:10]
