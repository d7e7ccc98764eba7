"""Flow records against the reference evaluator (agent/policy/evaluator.py), on random scenarios.

Kubernetes objects go the agent's whole way: the resolver, the wire (snapshot message), the
agent's decoding, BpfDataplane.apply. Pod "shop/web" is this node's pod (behind ifindex 1, as in
test_bpf_packets.py), three client pods live on another node. For each client and port, a new
flow's first packet runs through the real programs (tc_to_pod for web's ingress, the egress
socket filter for web's egress) and its record must carry the evaluator's verdict for that
direction and name one of the rules the evaluator says allowed it, or why none decided.
"""

from __future__ import annotations

import ipaddress
import itertools
from collections.abc import Iterator
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.control.encode import snapshot_message
from agent.dataplane.bpf import loader
from agent.dataplane.bpf.dataplane import BpfDataplane
from agent.dataplane.bpf.flow_records import NO_POLICY, NO_RULE_MATCHED
from agent.dataplane.bpf.testrun import TC_ACT_OK, run_program
from agent.dataplane.flows import FlowRecord, FlowVerdict
from agent.model.objects import (
    IPBlock,
    LabelSelector,
    Namespace,
    NetworkPolicy,
    Peer,
    PolicyType,
    PortSpec,
    Protocol,
    Rule,
)
from agent.node.decode import apply_message
from agent.policy.evaluator import DirectionVerdict, evaluate
from agent.policy.resolver import Resolver
from agent.policy.state import ClusterState
from tests.privileged import bpf_frames as f
from tests.privileged.test_bpf_packets import started_plane
from tests.unit.model_builders import pod, sel

pytestmark = pytest.mark.needs("bpffs")

WEB_IP = "10.0.0.1"
WEB = pod("shop", "web", WEB_IP, app="web")
CLIENTS = (
    pod("shop", "a", "10.1.0.1", node="n2", app="a"),
    pod("shop", "b", "10.1.0.2", node="n2", app="b", tier="x"),
    pod("other", "c", "10.1.0.3", node="n2", app="a"),
)
NAMESPACES = (Namespace("shop", {"team": "shop"}), Namespace("other", {"team": "other"}))
PORTS = (80, 81)
_sports = itertools.count(20000)


@pytest.fixture(scope="module")
def plane() -> Iterator[BpfDataplane]:
    yield from started_plane("keep", event_rate=100_000)  # every flow of an example gets its record


peers = st.sampled_from(
    (
        Peer(pod_selector=sel(app="a")),
        Peer(pod_selector=sel(tier="x")),
        Peer(pod_selector=LabelSelector(), namespace_selector=sel(team="other")),
        Peer(ip_block=IPBlock(ipaddress.ip_network("10.1.0.0/30"), (ipaddress.ip_network("10.1.0.2/32"),))),
    )
)
ports = st.sampled_from(
    ((), (PortSpec(Protocol.TCP, 80),), (PortSpec(Protocol.TCP, 81), PortSpec(Protocol.UDP, 80)))
)
rules = st.builds(Rule, st.lists(peers, max_size=2).map(tuple), ports)


@st.composite
def policies(draw: st.DrawFn) -> list[NetworkPolicy]:
    made = []
    for index in range(draw(st.integers(0, 3))):
        types = draw(
            st.sampled_from(
                ({PolicyType.INGRESS}, {PolicyType.EGRESS}, {PolicyType.INGRESS, PolicyType.EGRESS})
            )
        )
        made.append(
            NetworkPolicy(
                "shop",
                f"p{index}",
                draw(st.sampled_from((sel(app="web"), LabelSelector()))),
                frozenset(types),
                ingress=tuple(draw(st.lists(rules, max_size=2))),
                egress=tuple(draw(st.lists(rules, max_size=2))),
            )
        )
    return made


def _apply(plane: BpfDataplane, objects: list[object], version: int) -> ClusterState:
    resolver = Resolver()
    for obj in objects:
        resolver.upsert(obj)  # type: ignore[arg-type]
    node = apply_message(None, snapshot_message(version, resolver.node_policy("n1")))
    web = replace(node.endpoints["shop/web"], ifindex=1)
    plane.apply(replace(node, version=version, endpoints={web.key: web}, pod_interfaces=frozenset({1})))
    return ClusterState.from_objects(objects)  # type: ignore[arg-type]


def _check(record: FlowRecord, expected: DirectionVerdict, direction: str) -> None:
    assert record.verdict is (FlowVerdict.ALLOWED if expected.allowed else FlowVerdict.DENIED), record
    if not expected.isolated:
        assert (record.policy, record.rule) == ("", NO_POLICY), record
    elif expected.allowed:
        named = {(m.policy, f"{direction}[{m.index}]") for m in expected.allowing}
        assert (record.policy, record.rule) in named, (record, named)
        assert record.rule_ref != 0
    else:
        assert (record.policy, record.rule, record.reason) == ("", NO_RULE_MATCHED, "policy"), record


_versions = itertools.count(1)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(policies())
def test_records_carry_the_evaluators_verdict_and_one_of_its_rules(
    plane: BpfDataplane, made: list[NetworkPolicy]
) -> None:
    objects: list[object] = [*NAMESPACES, WEB, *CLIENTS, *made]
    state = _apply(plane, objects, next(_versions))
    plane.poll_flows(0)
    to_pod = plane._programs[loader.PROGRAM_TO_POD].fd
    egress = plane._programs[loader.PROGRAM_NF_EGRESS].fd
    for client, port in itertools.product(CLIENTS, PORTS):
        client_ip = str(client.ips[0])
        ingress_frame = f.tcp4(client_ip, WEB_IP, sport=next(_sports), dport=port)
        passed = run_program(to_pod, ingress_frame) == TC_ACT_OK
        (record,) = [r for r in plane.poll_flows(0) if r.direction == "ingress"]
        expected = evaluate(state, client, WEB, Protocol.TCP, port).ingress
        assert passed == expected.allowed
        _check(record, expected, "ingress")

        egress_frame = f.tcp4(WEB_IP, client_ip, sport=next(_sports), dport=port)
        passed = run_program(egress, egress_frame) == 0  # the socket filter: non-zero drops
        (record,) = [r for r in plane.poll_flows(0) if r.direction == "egress"]
        expected = evaluate(state, WEB, client, Protocol.TCP, port).egress
        assert passed == expected.allowed
        _check(record, expected, "egress")
