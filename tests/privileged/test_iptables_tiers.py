"""Differential: ClusterNetworkPolicy mixed with NetworkPolicy, evaluator vs iptables on real traffic.

Hypothesis draws clusters (tests/cnp_scenarios.py) whose first three pods are the lab's routed
pods (iptables_netns.py) on node n1, plus pods elsewhere that only serve as peers. The Resolver
compiles n1's policy, which crosses the wire (encode -> decode) and IptablesDataplane.apply
writes the chains and sets (tiers.py: runs of one action per tier). Every ordered pair of lab pods
then opens real connections (TCP 80 and 8080, UDP 53, SCTP INIT by raw socket, ICMP echo), and
whether each is answered must equal the evaluator's verdict (both directions judged). Fewer
examples than the eBPF differential: each denied probe waits out its timeout (probes run at once).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings

from agent.control.encode import snapshot_message
from agent.dataplane.flows import FlowRecord, FlowVerdict
from agent.dataplane.iptables import IptablesDataplane
from agent.dataplane.types import NodeState
from agent.node.decode import apply_message
from agent.policy.evaluator import Verdict, evaluate
from agent.policy.resolver import Resolver
from tests.cnp_scenarios import ICMP, NODES, SCTP, TCP, UDP, Scenario, scenarios
from tests.privileged.iptables_netns import NODE_IP, NODE_IP6, DataplaneWorker, Node, ip, running, three_pods

if os.geteuid() != 0 or shutil.which("iptables-legacy-restore") is None or shutil.which("ipset") is None:
    pytest.skip("needs root, iptables-legacy-restore and ipset", allow_module_level=True)

LAB_IPS = ("10.1.0.1", "10.1.0.2", "10.1.0.3")
FLOW_GROUP = 2472
PROBES = ((TCP, "tcp", 80), (TCP, "tcp", 8080), (UDP, "udp", 53), (SCTP, "sctp", 80), (ICMP, "icmp", 0))
TIERS = settings(
    max_examples=6,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@dataclasses.dataclass
class Lab:
    node: Node
    plane: DataplaneWorker
    sctp_dir: Path
    version: int = 0
    flows: bool = False  # flow records on: each probe's records must agree with the evaluator


@pytest.fixture(scope="module", params=[0, FLOW_GROUP], ids=["records-off", "records-on"])
def lab(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Lab]:
    sctp_dir = tmp_path_factory.mktemp("sctp")
    with three_pods(sctp_dir) as node:
        assert tuple(p.ip for p in node.pods) == LAB_IPS
        factory = functools.partial(IptablesDataplane, flow_group=request.param, denied_flow_interval_s=0.2)
        with running(node.netns, factory) as worker:
            worker.call("poll_flows", 0)  # binds the NFLOG group (records on)
            yield Lab(node, worker, sctp_dir, flows=bool(request.param))


def _apply(lab: Lab, resolver: Resolver) -> None:
    decoded = apply_message(None, snapshot_message(1, resolver.node_policy(NODES[0])))
    ifindex = {p.ip: p.ifindex for p in lab.node.pods}
    endpoints = {
        key: dataclasses.replace(e, ifindex=ifindex.get(str(e.ips[0])))
        for key, e in decoded.endpoints.items()
    }
    lab.version += 1
    lab.plane.call(
        "apply", NodeState(lab.version, endpoints, decoded.identities, (ip(NODE_IP), ip(NODE_IP6)))
    )


@TIERS
@given(scenarios(local_ips=LAB_IPS))
def test_iptables_agrees_with_the_evaluator(lab: Lab, scenario: Scenario) -> None:
    resolver = Resolver()
    resolver.replace_all(scenario.objects)
    _apply(lab, resolver)
    by_ip = {str(p.ips[0]): p for p in resolver.state.pods.values()}
    runs = [
        (source, target, protocol, kind, port)
        for source in lab.node.pods
        for target in lab.node.pods
        if source is not target
        for protocol, kind, port in PROBES
    ]

    def probe(run: tuple[Any, Any, int, str, int]) -> bool:
        source, target, _, kind, port = run
        extra = ("--sctp-log", str(lab.sctp_dir / f"{target.netns}.sctp")) if kind == "sctp" else ()
        return lab.node.probe(source, kind, target.ip, port, *extra)

    lab.plane.call("poll_flows", 500)  # the last example's late records
    with ThreadPoolExecutor(max_workers=8) as pool:  # each probe is its own process: run at once
        answered = list(pool.map(probe, runs))
    wrong = []
    verdicts = {}
    for (source, target, protocol, kind, port), passed in zip(runs, answered, strict=True):
        src, dst = by_ip[source.ip], by_ip[target.ip]
        verdict = evaluate(resolver.state, src, dst, protocol, port)
        verdicts[protocol, source.ip, target.ip, port] = verdict
        if passed != verdict.allowed:
            wrong.append(f"{src.key}->{dst.key} {kind}/{port}: {'passed' if passed else 'dropped'}")
    assert not wrong, wrong
    if lab.flows:
        assert not records_disagreeing(drained(lab.plane), verdicts)


def drained(plane: Any) -> list[FlowRecord]:
    """Every record of the probes: polled until none comes for 300 ms. One poll returns what is
    queued at once, and the kernel sends NFLOG messages in batches up to 50 ms late, so the last
    probes' records could still be on their way (seen: the last pair's records missing)."""
    records: list[FlowRecord] = []
    while batch := plane.call("poll_flows", 300):
        records += batch
    return records


def records_disagreeing(
    records: list[FlowRecord], verdicts: dict[tuple[int, str, str, int], Verdict]
) -> list[str]:
    """What the flow records of the probes say against the evaluator: each direction judged has
    a record of its verdict (the ingress only when the egress allowed), the denied ones naming
    the ClusterNetworkPolicy that denied where one did; none says otherwise. Allowed TCP/UDP
    only: an allowed SCTP/ICMP probe repeats its tuple across examples, one record per 30 s."""
    seen: dict[tuple[object, ...], set[FlowVerdict]] = {}
    policies: dict[tuple[object, ...], set[str]] = {}
    wrong = []
    for record in records:
        port = record.destination_port if record.protocol in (TCP, UDP, SCTP) else 0
        key = (record.protocol, record.source, record.destination, port)
        if key not in verdicts:
            continue
        judged = getattr(verdicts[key], record.direction)
        expected = FlowVerdict.ALLOWED if judged.allowed else FlowVerdict.DENIED
        if record.verdict != expected:
            wrong.append(f"{record.direction} {key}: recorded {record.verdict}, evaluator {expected}")
        seen.setdefault((*key, record.direction), set()).add(record.verdict)
        policies.setdefault((*key, record.direction), set()).add(record.policy)
    for key, verdict in verdicts.items():
        directions = ["egress"] + (["ingress"] if verdict.egress.allowed else [])
        for direction in directions:
            judged = getattr(verdict, direction)
            if judged.allowed and key[0] not in (TCP, UDP):
                continue
            said = "allowed" if judged.allowed else "denied"
            if not seen.get((*key, direction)):
                wrong.append(f"{direction} {key}: no record, evaluator {said}")
            elif said == "denied" and judged.rule and judged.rule.policy not in policies[(*key, direction)]:
                wrong.append(f"{direction} {key}: denied by {judged.rule.policy}, recorded {policies}")
    return wrong
