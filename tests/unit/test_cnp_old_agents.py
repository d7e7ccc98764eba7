"""An agent that predates ClusterNetworkPolicy tiers never enforces NetworkPolicy alone (issue 23).

Such an agent knows the podfence.v1 messages without DirectionPolicy.tiered (field 3) and
Hello.enforces_tiers (field 48): OLD below is the current schema with exactly those fields taken
out, in a descriptor pool of its own. The test shows what it does with
tiered entries (parses them as an unknown field and ignores them: an Admin Deny would be open),
then drives the real control service over gRPC on loopback with an old Hello and a new one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from agent.api import podfence_pb2 as pb
from agent.control.hub import StreamHandle
from agent.model.load import parse_object
from tests.unit.control_helpers import Control, RecordingAgent, small_cluster, start_control, wait_until
from tests.unit.test_cnp_control import cnp_doc
from tests.unit.test_control_grpc import RawStream


def _old_schema() -> dict[str, Any]:
    """The podfence.v1 message classes as an agent from before tiers compiled them."""
    file = descriptor_pb2.FileDescriptorProto()
    pb.DESCRIPTOR.CopyToProto(file)
    for message in file.message_type:
        dropped = {"DirectionPolicy": "tiered", "Hello": "enforces_tiers"}.get(message.name)
        if dropped is not None:
            kept = [f for f in message.field if f.name != dropped]
            assert len(kept) == len(message.field) - 1, f"{message.name}.{dropped} not in the schema"
            del message.field[:]
            message.field.extend(kept)
    pool = descriptor_pool.DescriptorPool()  # its own: the names stay podfence.v1's
    pool.Add(file)
    return message_factory.GetMessages([file], pool=pool)


OLD = _old_schema()


def _as_old_agent_reads_it(message: pb.ControlMessage) -> Any:
    return OLD["podfence.v1.ControlMessage"].FromString(message.SerializeToString())


def _old_hello(node: str) -> pb.Hello:
    """The Hello an old agent sends, as the wire carries it (the current class reads the same bytes)."""
    hello = OLD["podfence.v1.Hello"](node_name=node, agent_version="0.9-before-tiers")
    return pb.Hello.FromString(hello.SerializeToString())


def _new_hello(node: str) -> pb.Hello:
    return pb.Hello(node_name=node, enforces_tiers=True)


@pytest.fixture
def control() -> Iterator[Control]:
    # web is isolated to client:8080 by a NetworkPolicy; the Admin tier denies port 15000 to every pod
    ctl = start_control([*small_cluster(), parse_object(cnp_doc("no-proxy-admin"))])
    yield ctl
    ctl.stop()


def _directions(message: Any) -> dict[str, tuple[bool, int, int]]:
    """"name ingress" -> (isolated, allows, tiered entries) of every endpoint in a snapshot."""
    found = {}
    for endpoint in message.snapshot.endpoints:
        for name in ("ingress", "egress"):
            direction = getattr(endpoint, name)
            tiered = len(direction.tiered) if hasattr(direction, "tiered") else 0
            found[f"{endpoint.name} {name}"] = (direction.isolated, len(direction.allows), tiered)
    return found


def test_an_old_agent_drops_tiered_entries_as_an_unknown_field() -> None:
    """Why the control service must not rely on them: the Deny never reaches its dataplane."""
    tiered = pb.TieredAllow(allow=pb.Allow(peer=pb.Peer(cidr=pb.IPBlock(cidr="0.0.0.0/0")), protocol=6,
                                           port_first=15000, port_last=15000), tier=1, rank=1, action=2)
    endpoint = pb.Endpoint(namespace="shop", name="client-1", ips=["10.0.1.11"],
                           ingress=pb.DirectionPolicy(tiered=[tiered]))
    old = _as_old_agent_reads_it(pb.ControlMessage(version=1, snapshot=pb.Snapshot(endpoints=[endpoint])))
    assert _directions(old) == {"client-1 ingress": (False, 0, 0), "client-1 egress": (False, 0, 0)}
    assert not old.snapshot.endpoints[0].ingress.isolated  # NetworkPolicy alone: everything allowed


def test_an_agent_without_tiers_gets_deny_all_where_tiers_apply_and_status_says_so(control: Control) -> None:
    stream = RawStream(control.target, "n1", hello=_old_hello("n1"))
    try:
        first = stream.next()
        assert first.WhichOneof("body") == "snapshot"
        assert _directions(first) == {
            # ingress has the Admin Deny: closed, whatever NetworkPolicy allowed (web: client:8080)
            "web-1 ingress": (True, 0, 0),
            "client-1 ingress": (True, 0, 0),
            # egress has no ClusterNetworkPolicy: sent exactly as to any agent
            "web-1 egress": (False, 0, 0),
            "client-1 egress": (False, 0, 0),
        }
        assert _directions(_as_old_agent_reads_it(first)) == _directions(first)
        wait_until(lambda: bool(control.hub.status().nodes["n1"].tier_fallback), what="n1's tier fallback")
        fallback = control.hub.status().nodes["n1"].tier_fallback
        assert "2 pod direction(s)" in fallback and "shop/web-1 ingress" in fallback, fallback

        # the ClusterNetworkPolicy goes away: the agent gets NetworkPolicy back, the note clears
        with control.hub.change() as resolver:
            resolver.delete("ClusterNetworkPolicy", "", "no-proxy-admin")
        update = stream.next()
        web = next(e for e in update.delta.upsert_endpoints if e.name == "web-1")
        assert web.ingress.isolated and [a.port_first for a in web.ingress.allows] == [8080]
        assert control.hub.status().nodes["n1"].tier_fallback == ""
    finally:
        stream.close()


def test_an_agent_that_enforces_tiers_gets_the_entries(control: Control) -> None:
    stream = RawStream(control.target, "n1", hello=_new_hello("n1"))
    try:
        first = stream.next()
        directions = _directions(first)
        web, client = directions["web-1 ingress"], directions["client-1 ingress"]
        assert web[:2] == (True, 1) and client[:2] == (False, 0)
        assert web[2] == client[2] > 0  # the Deny, once per peer identity of every namespace
        assert control.hub.status().nodes["n1"].tier_fallback == ""
    finally:
        stream.close()


def test_the_agent_says_it_enforces_tiers_in_its_hello(monkeypatch: pytest.MonkeyPatch) -> None:
    """SyncClient's Hello, as it goes on the wire (a regression here silently closes every pod)."""
    ctl = start_control(small_cluster())
    seen: list[bool] = []
    original = ctl.hub.open_stream

    def record(node: str, last_applied: int, wake: Callable[[], None] | None = None,
               enforces_tiers: bool = True) -> StreamHandle:
        seen.append(enforces_tiers)
        return original(node, last_applied, wake, enforces_tiers)

    monkeypatch.setattr(ctl.hub, "open_stream", record)
    agent = RecordingAgent("n1", ctl.target).start()
    try:
        wait_until(lambda: bool(seen), what="the agent's Hello")
        assert seen == [True]
    finally:
        agent.close()
        ctl.stop()
