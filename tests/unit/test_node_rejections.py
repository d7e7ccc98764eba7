"""The agent reports the policies its dataplane left out (issue 21 item 9): the reconciler's
status, the ack's messages and the podfence_rejected_policies gauge (dataplane test double: the
real rejection is tests/privileged/test_bpf_capacity_fit.py)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from agent.dataplane.fit import Rejection
from agent.dataplane.types import NodeState
from agent.node.metrics import register_agent_metrics
from agent.node.reconcile import Reconciler
from tests.unit.test_node_metrics import ConnectedDouble, CountingDataplaneDouble, OneInterfaceDiscoveryDouble


class RejectingDataplaneDouble(CountingDataplaneDouble):
    def __init__(self) -> None:
        super().__init__()
        self.rejected_policies: dict[str, Rejection] = {}


def test_rejections_show_in_status_messages_and_the_gauge() -> None:
    dataplane = RejectingDataplaneDouble()
    reconciler = Reconciler(dataplane, OneInterfaceDiscoveryDouble())
    registry = CollectorRegistry()
    register_agent_metrics(registry, dataplane, reconciler, ConnectedDouble())
    assert registry.get_sample_value("podfence_rejected_policies") == 0

    dataplane.rejected_policies = {
        "z/big": Rejection("z/big", "pf_cidr", 900),
        "a/huge": Rejection("a/huge", "pf_policy", 5000),
    }
    reconciler.apply(NodeState(version=3))
    assert registry.get_sample_value("podfence_rejected_policies") == 2
    assert [(p, t) for p, t, _m in reconciler.status().rejected_policies] == [
        ("a/huge", "pf_policy"),
        ("z/big", "pf_cidr"),
    ]
    first, second = reconciler.rejected_policy_messages()
    assert first.startswith("a/huge: rejected, it needs about 5000 entries of pf_policy")
    assert "stay isolated" in first and second.startswith("z/big: ")
    assert reconciler.status().last_error is None  # the version itself is applied

    dataplane.rejected_policies = {}
    assert reconciler.rejected_policy_messages() == []
    assert registry.get_sample_value("podfence_rejected_policies") == 0


def test_a_dataplane_without_capacity_limits_rejects_nothing() -> None:
    reconciler = Reconciler(CountingDataplaneDouble(), OneInterfaceDiscoveryDouble())
    reconciler.apply(NodeState(version=1))
    assert reconciler.status().rejected_policies == () and reconciler.rejected_policy_messages() == []
