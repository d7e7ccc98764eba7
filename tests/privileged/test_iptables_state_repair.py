"""The state check on the iptables dataplane: chains and ipsets emptied by hand come back.

Each test removes one piece the way root in the node's namespace would (`iptables -F` of a
chain, `iptables -D` of a rule, `ipset flush`) and shows enforcement back, and whether a denied
flow could pass in between: an emptied endpoint or dispatch chain lets the traffic it judged fall
through (not defended: iptables has no way to forbid it), an emptied ipset only denies more.
"""

from __future__ import annotations

import threading
import time

from agent.node.repair import StateGuard
from tests.privileged import test_iptables_dataplane as base
from tests.privileged.iptables_netns import DataplaneWorker, Node, wait_for
from tests.privileged.test_iptables_dataplane import TCP, from_pod, identity_of, isolated, node_state

dataplane = base.dataplane  # the fixture: a started worker in conftest.py's node (three pods)


def p2_admits_p1(node: Node, dataplane: DataplaneWorker) -> None:
    """p2 admits p1 on tcp/80: p1 -> p2 the allowed flow, p3 -> p2 the denied one."""
    p1, p2, p3 = node.pods
    dataplane.call("apply", node_state(node, ingress={2: isolated(from_pod(p1, TCP, 80, 80))}))
    assert dataplane.call("repair_state") == [], "a fresh apply must verify clean"
    assert node.probe(p1, "tcp", p2.ip, 80) and not node.probe(p3, "tcp", p2.ip, 80)


def dispatch_to_p2(node: Node, family: int = 4) -> str:
    """The PF-TO rule that sends traffic to p2 into its ingress chain."""
    (rule,) = [line for line in node.legacy_save(family).splitlines()
               if line.startswith("-A PF-TO") and '"podfence:ep ingress default/pod2"' in line]
    return rule


def p2_ingress_chain(node: Node, family: int = 4) -> str:
    return dispatch_to_p2(node, family).rsplit(" ", 1)[1]


def test_a_flushed_endpoint_chain_is_rewritten(node: Node, dataplane: DataplaneWorker) -> None:
    p1, p2, p3 = node.pods
    p2_admits_p1(node, dataplane)
    chain = p2_ingress_chain(node)
    rules = sum(line.startswith(f"-A {chain} ") for line in node.legacy_save(4).splitlines())
    node.in_node("iptables-legacy", "-F", chain)
    # Not defended: the empty chain RETURNs, the packet goes on to the rules after the hook.
    assert node.probe(p3, "tcp", p2.ip, 80), "the lab must show the chain is what filtered"
    found = dataplane.call("repair_state")
    assert found == [("chain", f"ipv4 chain {chain} has 0 rules, not {rules}")], found
    assert not node.probe(p3, "tcp", p2.ip, 80) and node.probe(p1, "tcp", p2.ip, 80)
    assert dataplane.call("repair_state") == []


def test_a_deleted_dispatch_rule_is_put_back(node: Node, dataplane: DataplaneWorker) -> None:
    p1, p2, p3 = node.pods
    p2_admits_p1(node, dataplane)
    node.in_node("sh", "-c", f"iptables-legacy {dispatch_to_p2(node).replace('-A ', '-D ', 1)}")
    assert node.probe(p3, "tcp", p2.ip, 80), "the lab must show the dispatch rule is what filtered"
    found = dataplane.call("repair_state")
    assert [kind for kind, _ in found] == ["chain"], found
    assert found[0][1].startswith("ipv4 chain PF-TO has "), found
    assert not node.probe(p3, "tcp", p2.ip, 80) and node.probe(p1, "tcp", p2.ip, 80)


def test_a_flushed_ipset_is_refilled_and_nothing_opened(node: Node, dataplane: DataplaneWorker) -> None:
    p1, p2, p3 = node.pods
    p2_admits_p1(node, dataplane)
    name = f"pf-i4-{identity_of(p1)}"
    node.in_node("ipset", "flush", name)
    # Fail-closed in between: every podfence set lists what is allowed.
    assert not node.probe(p1, "tcp", p2.ip, 80) and not node.probe(p3, "tcp", p2.ip, 80)
    found = dataplane.call("repair_state")
    assert found == [("ipset", f"set {name} has 0 members, not 1")], found
    assert node.probe(p1, "tcp", p2.ip, 80) and not node.probe(p3, "tcp", p2.ip, 80)


class _WorkerState:
    """The worker's dataplane as the agent's StateGuard sees it."""

    def __init__(self, worker: DataplaneWorker) -> None:
        self.worker = worker

    def repair_state(self) -> list[tuple[str, str]]:
        return [tuple(item) for item in self.worker.call("repair_state")]  # type: ignore[misc]


def test_the_guard_repairs_a_flushed_chain_within_its_interval(
    node: Node, dataplane: DataplaneWorker
) -> None:
    p1, p2, p3 = node.pods
    p2_admits_p1(node, dataplane)
    guard = StateGuard(_WorkerState(dataplane), interval_s=0.5)
    stop = threading.Event()
    checker = threading.Thread(target=guard.run, args=(stop,))
    checker.start()
    try:
        for family, tool in ((4, "iptables-legacy"), (6, "ip6tables-legacy")):
            node.in_node(tool, "-F", "PF-FROM")
            node.in_node(tool, "-F", p2_ingress_chain(node, family))
        assert wait_for(lambda: guard.by_kind["chain"] >= 4, timeout=3), guard.by_kind
        assert not node.probe(p3, "tcp", p2.ip, 80) and node.probe(p1, "tcp", p2.ip, 80)
        assert not node.probe(p3, "tcp", p2.ip6 or "", 80)
        repairs = guard.repairs
        time.sleep(1.2)
        assert guard.repairs == repairs, "a clean check must repair nothing"
        assert "chain" in guard.last
    finally:
        stop.set()
        checker.join(5)
