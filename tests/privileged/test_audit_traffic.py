"""Audit policies on real traffic, both dataplanes (the rollout of tests/privileged/audit_lab.py).

Pods in their own network namespaces behind veths of a node namespace; the node's policy comes
from the objects through the StagedResolver and the wire. Each probe (a TCP connection, a UDP
exchange, a ping) runs alone: its fate must be the evaluator's enforced verdict (the audit
policies change none), and exactly the endpoint directions the evaluator names must count an
audit denial around it. eBPF: pf_audit_denied (ingress) and the agent's count of egress
audit-denied records (the egress verdict is the agent's, bpf/lib/audit.h), and the flow records
themselves: one audit-denied record per direction the evaluator names, naming its policy;
iptables: the audit chains' AUDIT_DENY rules.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest

from agent.dataplane.bpf.dataplane import BpfDataplane
from agent.dataplane.flows import FlowRecord
from agent.dataplane.iptables import IptablesDataplane
from agent.dataplane.types import NodeState, audit_everything_state
from tests.privileged import bpf_netns, iptables_netns
from tests.privileged.audit_lab import ICMP, Expect, disagreements, expectations, lab_objects, node_state

BPF_TCP, BPF_UDP = 8080, 9090
IPT_TCP, IPT_UDP = iptables_netns.LAB_TCP[1], iptables_netns.LAB_UDP[0]  # 8080, 53: served


@pytest.fixture
def bpf_node() -> Iterator[bpf_netns.Node]:
    lab = bpf_netns.Node().create(3)
    try:
        for pod in lab.pods:
            lab.serve(pod, BPF_TCP, BPF_UDP)
        yield lab
    finally:
        lab.destroy()


@pytest.mark.needs("nsenter", "bpffs")
def test_bpf_audit_changes_no_fate_and_counts_what_the_evaluator_denies(bpf_node: bpf_netns.Node) -> None:
    pods = bpf_node.pods
    objects = lab_objects([(p.ip, p.ip6) for p in pods], BPF_TCP, BPF_UDP)
    plane = BpfDataplane(bpf_node.settings())
    plane.start()
    try:
        keys = {f"lab/p{p.index}": p.ifindex for p in pods}
        node_ips = (bpf_netns.NODE_IP,)
        plane.apply(node_state(objects, keys, node_ips))

        def run(expect: Expect) -> bool:
            source, target = pods[expect.source], pods[expect.target]
            if expect.protocol == ICMP:
                return source.ping(target.ip)
            if expect.port == BPF_TCP:
                return source.tcp(target.ip, BPF_TCP)
            return source.udp(target.ip, BPF_UDP)

        def records() -> list[FlowRecord]:
            seen, polled = [], plane.poll_flows(100)
            while polled:
                seen.extend(polled)
                polled = plane.poll_flows(20)
            return seen

        expected = expectations(objects, BPF_TCP, BPF_UDP)
        assert any(e.audit_denied for e in expected) and any(not e.passes for e in expected)
        wrong = disagreements(expected, run, plane.audit_denied, records)
        assert not wrong, wrong

        # the agent's --audit-all: nothing enforced, every policy counted
        plane.apply(
            dataclasses.replace(audit_everything_state(node_state(objects, keys, node_ips)), version=2)
        )
        expected = expectations(objects, BPF_TCP, BPF_UDP, audit_all=True)
        assert all(e.passes for e in expected)
        assert {ref for e in expected for ref in e.audit_denied} >= {
            ("lab/p2", "ingress"),
            ("lab/p1", "egress"),
        }
        wrong = disagreements(expected, run, plane.audit_denied, records)
        assert not wrong, wrong
    finally:
        plane.teardown()


def without_audit(state: NodeState) -> NodeState:
    plain = dataclasses.replace
    endpoints = {
        key: plain(e, ingress=plain(e.ingress, audit=None), egress=plain(e.egress, audit=None))
        for key, e in state.endpoints.items()
    }
    return dataclasses.replace(state, endpoints=endpoints)


@pytest.mark.needs("iptables-legacy", "ipset")
def test_iptables_audit_changes_no_fate_and_counts_what_the_evaluator_denies(
    node: iptables_netns.Node,
) -> None:
    """`node`: conftest.py's, whose pods serve IPT_TCP and IPT_UDP among others."""
    pods = node.pods
    objects = lab_objects([(p.ip, p.ip6 or p.ip) for p in pods], IPT_TCP, IPT_UDP)
    worker = iptables_netns.DataplaneWorker(node.netns, IptablesDataplane)
    try:
        worker.call("start")
        keys = {f"lab/p{i + 1}": p.ifindex for i, p in enumerate(pods)}
        node_ips = (iptables_netns.NODE_IP, iptables_netns.NODE_IP6)
        state = node_state(objects, keys, node_ips)
        # First without any audit view: the dataplane then skips reading the table for audit
        # denials, and must start again as soon as an apply writes audit chains.
        worker.call("apply", without_audit(state))
        worker.call("apply", state)

        def run(expect: Expect) -> bool:
            source, target = pods[expect.source], pods[expect.target]
            if expect.protocol == ICMP:
                return node.probe(source, "icmp", target.ip, 0)
            kind = "tcp" if expect.port == IPT_TCP else "udp"
            return node.probe(source, kind, target.ip, expect.port)

        expected = expectations(objects, IPT_TCP, IPT_UDP)
        wrong = disagreements(expected, run, lambda: worker.call("audit_denied"))
        assert not wrong, wrong
        counted = worker.call("audit_denied")
        assert counted
        worker.call("apply", without_audit(state))  # the audit chains go: what they counted stays
        assert worker.call("audit_denied") == counted
    finally:
        try:
            worker.call("teardown")
        finally:
            worker.stop()
