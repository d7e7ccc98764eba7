"""An agent that dies in the middle of writing the maps: the restarted one knows every id the
maps hold (the state file's write-ahead line, state_file.py), hands none of them to other
content, and its first apply enforces the new state exactly. Real maps, real traffic."""

from __future__ import annotations

import pytest

from agent.dataplane.bpf import maps
from agent.dataplane.bpf.dataplane import BpfDataplane
from agent.dataplane.bpf.plan import Op
from tests.privileged.bpf_netns import Node
from tests.privileged.test_bpf_traffic import TCP, endpoint, from_pod, isolated, state
from tests.privileged.test_bpf_traffic import node as node  # the same three-pod lab fixture

pytestmark = pytest.mark.needs("nsenter", "bpffs")


class Crash(BaseException):
    """The process dying: no `except Exception` of the dataplane runs its recovery."""


@pytest.mark.parametrize("ops_before_crash", [1, 3])
def test_a_restart_after_a_crash_mid_write_knows_every_live_id(
    node: Node, monkeypatch: pytest.MonkeyPatch, ops_before_crash: int
) -> None:
    a, b, c = node.pods
    first = BpfDataplane(node.settings())
    first.start()
    first.apply(
        state(node, endpoint(a, egress=isolated(from_pod(b, TCP, 8080, 8080))), endpoint(b), endpoint(c))
    )
    # new contents under fresh ids: their policy entries are the plan's first writes
    second_state = state(
        node,
        endpoint(a, egress=isolated(from_pod(c, TCP, 9090, 9090))),
        endpoint(b, ingress=isolated(from_pod(c, TCP, 8080, 8080))),
        endpoint(c),
        version=2,
    )
    written: list[Op] = []
    real_write = maps.write

    def dying_write(module: object, live: maps.Live, op: Op) -> None:
        if len(written) == ops_before_crash:
            raise Crash
        real_write(module, live, op)
        written.append(op)

    monkeypatch.setattr(maps, "write", dying_write)
    with pytest.raises(Crash):
        first.apply(second_state)
    monkeypatch.setattr(maps, "write", real_write)
    first.close()
    assert written and all(op.table == "policy" for op in written)

    restarted = BpfDataplane(node.settings())
    restarted.start()
    try:
        assert restarted.adopted
        live, allocation = restarted._live, restarted._live.allocation
        assert allocation is not None
        policy_ids = {entry[1] for entry in live.policy}
        policy_ids |= {e.ingress_policy_id for e in live.endpoints.values()}
        policy_ids |= {e.egress_policy_id for e in live.endpoints.values()}
        policy_ids.discard(0)
        assert policy_ids <= set(allocation.policies.values())  # the half-written ids are on record
        peer_classes = set(live.ipcache.values()) | set(live.cidr.values())
        known_classes = set(allocation.identity_classes.values()) | set(allocation.cidr_classes.values())
        assert peer_classes <= known_classes
        # no live id is handed out again (a union view's split classes are remembered only so)
        class_ids = {entry[2] for entry in live.policy} | peer_classes
        assert allocation.next_id > max(policy_ids | class_ids)
        restarted.apply(second_state)
        assert a.tcp(c.ip, 9090) and not a.tcp(b.ip, 8080)
        assert c.tcp(b.ip, 8080) and not a.tcp(c.ip, 8080)
    finally:
        restarted.teardown()
