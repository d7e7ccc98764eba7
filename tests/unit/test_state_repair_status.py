"""The state check's findings reach `podfence status` (agent/node/repair.py -> sync stream -> hub).

The control service, the gRPC stream and the agent's SyncClient are real (loopback); the
dataplane is a stand-in that reports one removed tc filter (the privileged tests
test_bpf_state_repair.py and test_iptables_state_repair.py remove and repair the real pieces).
"""

from __future__ import annotations

import json

import pytest

from agent.node.repair import StateGuard
from tests.unit.control_helpers import small_cluster, start_control, status_output, wait_until


class RemovedFilter:
    """Stand-in dataplane: the first check finds a removed filter, later ones find nothing."""

    def __init__(self) -> None:
        self.found = [("tc_filter", "interface 7: egress (to pod) filter missing")]

    def repair_state(self) -> list[tuple[str, str]]:
        found, self.found = self.found, []
        return found


@pytest.fixture
def control():
    ctl = start_control(small_cluster())
    yield ctl
    ctl.stop()


def test_a_repair_shows_in_podfencestatus_output(control, agents) -> None:
    agent = agents("n1", control.target)
    agent.wait_for_state(lambda s: bool(s.endpoints))
    assert "state_repairs" not in json.loads(status_output(control.target))["nodes"]["n1"]  # nothing yet

    guard = StateGuard(RemovedFilter())
    assert agent.client is not None
    client = agent.client
    guard.on_repair(lambda: client.report_repairs(guard.repairs, guard.last))
    assert guard.check_once() and guard.by_kind == {"tc_filter": 1}
    assert guard.check_once() == []

    def node_view() -> dict:
        return json.loads(status_output(control.target, True))["nodes"]["n1"]

    wait_until(lambda: node_view().get("state_repairs") == 1, what="the repair reported")
    assert node_view()["last_repair"] == "tc_filter: interface 7: egress (to pod) filter missing"
    assert node_view()["last_error"] is None  # a repaired node is not a failing one
    table = status_output(control.target, False)
    assert "n1: 1 repair(s), last tc_filter: interface 7" in table


def repairs_of_n1(target: str) -> int | None:
    return json.loads(status_output(target))["nodes"]["n1"].get("state_repairs")


def test_the_count_is_sent_again_on_a_new_stream(control, agents) -> None:
    """A reconnect (another replica, a control restart) must not lose what the node reported."""
    agent = agents("n1", control.target)
    agent.wait_for_state(lambda s: bool(s.endpoints))
    assert agent.client is not None
    agent.client.report_repairs(3, "ipset: set pf-i4-1 has 0 members, not 1")
    wait_until(lambda: repairs_of_n1(control.target) == 3,
               what="the first report")
    agent.close()
    second = agents("n1", control.target)
    assert second.client is not None
    second.client.report_repairs(3, "ipset: set pf-i4-1 has 0 members, not 1")  # before any stream
    second.wait_for_state(lambda s: bool(s.endpoints))
    wait_until(lambda: repairs_of_n1(control.target) == 3,
               what="the report on the new stream")
