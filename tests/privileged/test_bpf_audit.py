"""Differential: audit (staged) policies in the eBPF dataplane, reference evaluator vs the kernel.

Hypothesis draws small clusters mixing ClusterNetworkPolicy and NetworkPolicy
(tests/cnp_scenarios.py) and puts a random part of their policies in audit
(`podfence.io/mode: audit`). The StagedResolver compiles each node's policy, which crosses the wire
as the agent gets it (control.encode snapshot -> node.sync decode), and BpfDataplane.apply
programs the maps. Then every connection between the scenario's pods, on TCP, UDP, SCTP and ICMP
echo, runs as a first packet through the real programs (BPF_PROG_TEST_RUN) of every local
endpoint it concerns. For each direction:
  - the kernel's verdict is the evaluator's enforced verdict (an audit policy changes no fate);
  - the flow's record is audit-denied exactly when the evaluator's enforced verdict admits it and
    its audit view (every policy enforced) denies it, and then names what the evaluator says
    denied it (the ClusterNetworkPolicy rule, or isolation); the audit-denied count of that
    endpoint direction grows by one exactly then.
Ingress audit verdicts are the kernel's (tc_to_pod); egress ones the agent's, from the allowed
record of the flow's first packet (agent/dataplane/bpf/flow_records.py): both are checked here
through the records and the counter the agent reports, so either place failing shows.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.control.encode import snapshot_message
from agent.dataplane.bpf.flow_records import NO_RULE_MATCHED
from agent.dataplane.flows import FlowRecord, FlowVerdict
from agent.dataplane.types import DirectionPolicy, Endpoint, NodeState
from agent.model.cluster_policy import ClusterNetworkPolicy
from agent.model.objects import NetworkPolicy
from agent.node.decode import apply_message
from agent.policy.audit import audit_view
from agent.policy.evaluator import DirectionVerdict, evaluate
from agent.policy.staged import StagedResolver
from agent.policy.state import ClusterState
from tests.cnp_scenarios import NODES, PROBE_PORTS, Scenario, scenarios
from tests.privileged.test_bpf_fuzz import SLOTS, Bench, _bench, ip_frame, l4_bytes, pytestmark  # noqa: F401
from tests.privileged.test_bpf_tiers import _frame

AUDIT = settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@pytest.fixture(scope="module")
def bench() -> Iterator[Bench]:
    # The probes are first packets sent as fast as Python runs them (up to ~3,000 records/s on
    # one CPU), past the shipped budget of 1,000 records/s per CPU: with it a run lost records
    # whenever the probes outpaced the refill. A budget whose burst alone holds every record of
    # a run leaves the ring buffer as the only place one can be lost, which the test still
    # asserts never happens.
    with _bench("keep", event_rate=100_000) as made:
        yield made


@st.composite
def staged_scenarios(draw: st.DrawFn) -> Scenario:
    """A scenario with each of its policies in audit or not, at random (at least one in audit)."""
    scenario = draw(scenarios())
    objects = []
    for obj in scenario.objects:
        if isinstance(obj, NetworkPolicy | ClusterNetworkPolicy):
            obj = dataclasses.replace(obj, audit=draw(st.booleans()))
        objects.append(obj)
    return Scenario(tuple(objects))


def _node_state(resolver: StagedResolver, node: str, bench: Bench) -> tuple[NodeState, dict[str, int]]:
    decoded = apply_message(None, snapshot_message(1, resolver.node_policy(node)))
    local = dict(zip(sorted(decoded.endpoints)[:SLOTS], bench.ifindexes, strict=False))
    endpoints = {key: dataclasses.replace(e, ifindex=local.get(key)) for key, e in decoded.endpoints.items()}
    return NodeState(0, endpoints, decoded.identities), local


def _kernel_passes(bench: Bench, direction: str, frame: bytes, ifindex: int) -> bool | None:
    """A first packet through the programs of one direction of the endpoint on `ifindex`."""
    if direction == "egress":
        return bench.egress_path(frame, ifindex)
    return bench.passes("to_pod", frame, ifindex)


def _record_disagreement(
    records: list[FlowRecord], key: str, direction: str, denied: bool, audit: DirectionVerdict
) -> str | None:
    """What is wrong with the records one first packet of `key`'s `direction` produced."""
    mine = [r for r in records if r.endpoint == key and r.direction == direction]
    audited = [r for r in mine if r.verdict is FlowVerdict.AUDIT_DENIED]
    if not denied:
        return f"audit-denied records {audited}, the audit view admits it" if audited else None
    if len(audited) != 1 or len(mine) != 1:
        return f"records {mine}, expected one audit-denied"
    (record,) = audited
    if audit.rule is not None:  # a ClusterNetworkPolicy rule denied it
        rule = audit.rule.name or f"{direction}[{audit.rule.index}]"
        expected = (audit.rule.tier.value.lower(), audit.rule.policy, rule)
        if (record.tier, record.policy, record.rule) != expected:
            return f"record names {record.tier}/{record.policy}/{record.rule}, evaluator {audit.rule}"
    elif (record.policy, record.rule) != ("", NO_RULE_MATCHED) or not audit.isolated:
        return f"record names {record.policy}/{record.rule}, evaluator: isolated by {audit.isolating}"
    return None


def audit_disagreements(bench: Bench, scenario: Scenario) -> list[str]:
    resolver = StagedResolver()
    resolver.replace_all(scenario.objects)
    state = ClusterState.from_objects(list(scenario.objects))
    view = audit_view(state)
    wrong = []
    for node in NODES:
        node_state, local = _node_state(resolver, node, bench)
        bench.apply(node_state)
        for src in state.pods.values():
            for dst in state.pods.values():
                if src.key == dst.key or not ({src.key, dst.key} & local.keys()):
                    continue
                for protocol, port in PROBE_PORTS:
                    enforced = evaluate(state, src, dst, protocol, port)
                    audit = evaluate(view, src, dst, protocol, port)
                    frame = _frame(src, dst, protocol, port)
                    probes = []
                    if src.key in local:
                        probes.append(("egress", src.key, enforced.egress.allowed, audit.egress))
                    if dst.key in local:
                        probes.append(("ingress", dst.key, enforced.ingress.allowed, audit.ingress))
                    for direction, key, allowed, audit_verdict in probes:
                        bench.forget_flows()
                        bench.plane.poll_flows(0)
                        before = bench.plane.audit_denied()[(key, direction)]
                        lost = bench.plane.events_lost()
                        kernel = _kernel_passes(bench, direction, frame, local[key])
                        records = bench.plane.poll_flows(0)  # names them: counts egress audit denials
                        counted = bench.plane.audit_denied()[(key, direction)] - before
                        where = f"{direction} {src.key}->{dst.key} {protocol}/{port}"
                        assert bench.plane.events_lost() == lost, f"{where}: a record was lost"
                        denied = allowed and not audit_verdict.allowed
                        if kernel != allowed:
                            wrong.append(f"{where}: kernel {kernel}, enforced verdict {allowed}")
                        if counted != int(denied):
                            wrong.append(
                                f"{where}: audit-denied counted {counted}, audit says {audit_verdict.allowed}"
                            )
                        problem = _record_disagreement(records, key, direction, denied, audit_verdict)
                        if kernel and problem:
                            wrong.append(f"{where}: {problem}")
    return wrong


@AUDIT
@given(staged_scenarios())
def test_audit_policies_change_no_fate_and_count_exactly_what_they_would_deny(
    bench: Bench, scenario: Scenario
) -> None:
    wrong = audit_disagreements(bench, scenario)
    assert not wrong, wrong[:10]


def test_an_established_flow_is_not_judged_by_the_audit_view_again(bench: Bench) -> None:
    """Only a flow's first packet looks the audit view up: the second one finds conntrack."""
    source, target = "10.7.0.1", "10.7.0.2"
    isolated = DirectionPolicy(isolated=True)
    endpoint = Endpoint(
        "ns/server",
        (ipaddress.ip_address(target),),
        ingress=DirectionPolicy(audit=isolated),
        ifindex=bench.ifindexes[0],
    )
    bench.apply(NodeState(0, {"ns/server": endpoint}))
    bench.forget_flows()
    number, l4 = l4_bytes("udp", 4, 40000, 53)
    frame = ip_frame(4, ipaddress.ip_address(source), ipaddress.ip_address(target), number, l4)
    before = bench.plane.audit_denied()[("ns/server", "ingress")]
    assert bench.passes("to_pod", frame, bench.ifindexes[0])
    assert bench.passes("to_pod", frame, bench.ifindexes[0])
    assert bench.plane.audit_denied()[("ns/server", "ingress")] - before == 1


def test_an_established_egress_flow_makes_one_audit_denied_record(bench: Bench) -> None:
    """The agent judges egress from the first packet's allowed record: later packets of the flow
    find conntrack and send none, so the flow is audit-denied and counted once."""
    source, target = "10.7.0.1", "10.7.0.2"
    endpoint = Endpoint(
        "ns/client",
        (ipaddress.ip_address(source),),
        egress=DirectionPolicy(audit=DirectionPolicy(isolated=True)),
        ifindex=bench.ifindexes[0],
    )
    bench.apply(NodeState(0, {"ns/client": endpoint}))
    bench.forget_flows()
    bench.plane.poll_flows(0)
    number, l4 = l4_bytes("udp", 4, 40000, 53)
    frame = ip_frame(4, ipaddress.ip_address(source), ipaddress.ip_address(target), number, l4)
    before = bench.plane.audit_denied()[("ns/client", "egress")]
    assert bench.egress_path(frame, bench.ifindexes[0])
    assert bench.egress_path(frame, bench.ifindexes[0])
    records = [r for r in bench.plane.poll_flows(0) if r.endpoint == "ns/client"]
    assert [(r.verdict, r.direction, r.rule) for r in records] == [
        (FlowVerdict.AUDIT_DENIED, "egress", NO_RULE_MATCHED)
    ]
    assert bench.plane.audit_denied()[("ns/client", "egress")] - before == 1
