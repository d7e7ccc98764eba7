"""PolicyHub without gRPC: version bookkeeping, per-node fan-out, bounded queues, ack validation,
and the agent-side conversion of Sync messages into dataplane NodeState (incl. malformed data)."""

from __future__ import annotations

import ipaddress
import threading

import pytest

from agent.api import podfence_pb2 as pb
from agent.control.encode import delta_message, snapshot_message
from agent.control.hub import AckError, PolicyHub, StreamClosed
from agent.control.metrics import ControlMetrics
from agent.dataplane.types import IdentityPeer
from agent.node.decode import DecodeCache, MalformedMessage, apply_message
from agent.policy.resolver import Resolver
from tests.unit.control_helpers import allow_from, change_held_open, pod, small_cluster


def make_hub(max_pending: int = 32) -> PolicyHub:
    hub = PolicyHub(Resolver(), ControlMetrics(), max_pending=max_pending, initial_version=10)
    with hub.change() as resolver:
        resolver.replace_all(small_cluster())
    return hub


def test_a_change_bumps_the_version_once_and_queues_only_for_affected_streams():
    hub = make_hub()
    n1, n3 = hub.open_stream("n1", 0), hub.open_stream("n3", 0)
    first_n1, first_n3 = n1.next(0), n3.next(0)
    assert first_n1 is not None and first_n1.snapshot
    assert first_n3 is not None and first_n3.snapshot
    with hub.change() as resolver:
        resolver.upsert(allow_from("web-from-client", "web", "client", 9090))
        resolver.upsert(pod("web-7", "n1", "10.0.1.17", "web"))
    assert hub.version == 12
    update = n1.next(0)
    assert update is not None and update.version == 12 and not update.snapshot
    assert set(update.policy.endpoints) == {"shop/web-1", "shop/web-7", "shop/client-1"}
    assert n3.next(0) is None, "n3 hosts no web pod"


def test_a_stream_too_far_behind_is_reset_to_one_snapshot_of_the_latest_version():
    hub = make_hub(max_pending=2)
    stream = hub.open_stream("n1", 0)
    for port in range(9000, 9005):  # nobody reads: the queue overflows
        with hub.change() as resolver:
            resolver.upsert(allow_from("web-from-client", "web", "client", port))
    items = []
    while (item := stream.next(0)) is not None:
        items.append(item)
    # Overflow dropped the queued deltas for a snapshot (twice); what is left ends at the latest.
    assert [(i.version, i.snapshot) for i in items] == [(hub.version - 1, True), (hub.version, False)]
    assert hub.metrics.streams_reset_total._value.get() == 2
    latest = items[-1].policy.endpoints["shop/web-1"].ingress.allows
    assert [a.port_first for a in latest] == [9004]


def test_acks_are_checked_against_what_the_stream_was_sent():
    hub = make_hub()
    stream = hub.open_stream("n1", 0)
    item = stream.next(0)
    assert item is not None
    with pytest.raises(AckError):
        hub.ack(stream, item.version, True, "")  # queued but not yet sent
    stream.mark_sent(item.version, item.policy)
    hub.ack(stream, item.version, True, "")
    assert hub.status().nodes["n1"].acked_version == item.version
    hub.ack(stream, item.version, False, "map full")
    assert hub.status().nodes["n1"].last_error == "map full"
    assert hub.status().nodes["n1"].acked_version == item.version


def test_a_newer_stream_closes_the_older_and_disconnects_are_remembered():
    hub = make_hub()
    older = hub.open_stream("n2", 0)
    newer = hub.open_stream("n2", 0)
    with pytest.raises(StreamClosed, match="superseded"):
        while older.next(0) is not None:
            pass
    hub.close_stream(older, "ended")
    assert hub.status().nodes["n2"].connected, "the older stream ending must not disconnect the newer"
    hub.close_stream(newer, "ended")
    assert not hub.status().nodes["n2"].connected
    assert "n2" in hub.status().nodes


def test_a_node_disconnected_past_the_horizon_is_forgotten_and_comes_back_on_reconnect():
    now = [100.0]
    metrics = ControlMetrics()
    hub = PolicyHub(Resolver(), metrics, initial_version=10, forget_after_s=60, clock=lambda: now[0])
    gone, staying = hub.open_stream("n1", 0), hub.open_stream("n2", 0)
    hub.close_stream(gone, "ended")
    now[0] += 59
    assert set(hub.status().nodes) == {"n1", "n2"}  # still within the horizon: shown disconnected
    lag_labels = {s.labels["node"] for m in metrics.registry.collect() for s in m.samples if "lag" in s.name}
    assert lag_labels == {"n1", "n2"}
    now[0] += 2
    assert set(hub.status().nodes) == {"n2"}, "the connected node is never forgotten"
    lag_labels = {s.labels["node"] for m in metrics.registry.collect() for s in m.samples if "lag" in s.name}
    assert lag_labels == {"n2"}, "its metric series goes with it"
    hub.open_stream("n1", 0)
    assert hub.status().nodes["n1"].connected
    assert staying.node == "n2" and hub.status().nodes["n2"].connected


def test_snapshot_and_delta_round_trip_into_node_state():
    hub = make_hub()
    before = hub._resolver.node_policy("n1")
    with hub.change() as resolver:
        resolver.upsert(allow_from("web-from-client", "web", "client", 9090))
        resolver.upsert(pod("client-2", "n2", "10.0.2.11", "client"))  # the client moves to n2
        resolver.delete("Pod", "shop", "client-1")
    after = hub._resolver.node_policy("n1")

    state = apply_message(None, snapshot_message(5, before))
    assert state.version == 5 and set(state.endpoints) == {"shop/web-1", "shop/client-1"}
    state = apply_message(state, delta_message(6, before, after))
    assert state.version == 6 and set(state.endpoints) == {"shop/web-1"}
    (allow,) = state.endpoints["shop/web-1"].ingress.allows
    assert allow.port_first == 9090
    assert isinstance(allow.peer, IdentityPeer)
    assert state.identities[allow.peer.identity] == (ipaddress.ip_address("10.0.2.11"),)
    # The delta route and a fresh snapshot agree exactly.
    assert state == apply_message(None, snapshot_message(6, after))


def test_a_decode_cache_shares_equal_lists_and_still_reads_every_change():
    """Equal allow lists decode to one object (the compiler hashes each once); a cache kept
    across messages never returns a stale list for changed bytes, nor a bad one it refused."""
    cidr = pb.Peer(cidr=pb.IPBlock(cidr="172.16.0.1/32"))
    allows = [pb.Allow(peer=cidr, protocol=6, port_first=80, port_last=80)]
    direction = pb.DirectionPolicy(isolated=True, allows=allows)
    endpoints = [pb.Endpoint(namespace="ns", name=n, ips=[ip], ingress=direction)
                 for n, ip in (("a", "10.0.0.1"), ("b", "10.0.0.2"))]  # fmt: skip
    cache = DecodeCache()
    snapshot = pb.ControlMessage(version=1, snapshot=pb.Snapshot(endpoints=endpoints))
    state = apply_message(None, snapshot, cache)
    assert state.endpoints["ns/a"].ingress is state.endpoints["ns/b"].ingress
    changed = pb.Endpoint(namespace="ns", name="a", ips=["10.0.0.1"], ingress=pb.DirectionPolicy(
        isolated=True, allows=[pb.Allow(peer=cidr, protocol=6, port_first=80, port_last=81)]))  # fmt: skip
    delta = pb.ControlMessage(version=2, delta=pb.Delta(upsert_endpoints=[changed]))
    state = apply_message(state, delta, cache)
    assert state.endpoints["ns/a"].ingress.allows[0].port_last == 81
    assert state.endpoints["ns/b"].ingress.allows[0].port_last == 80
    bad = pb.Endpoint(namespace="ns", name="a", ips=["10.0.0.1"], ingress=pb.DirectionPolicy(
        isolated=True, allows=[pb.Allow(peer=pb.Peer(cidr=pb.IPBlock(cidr="nonsense")))]))  # fmt: skip
    for _ in range(2):  # refused both times: a refusal is never cached as a result
        with pytest.raises(MalformedMessage):
            apply_message(state, pb.ControlMessage(version=3, delta=pb.Delta(upsert_endpoints=[bad])), cache)


def _first_allow(message: pb.ControlMessage) -> pb.Allow:
    return message.snapshot.endpoints[0].ingress.allows[0]


@pytest.mark.parametrize(
    ("mutate", "error"),
    [
        (lambda m: m.snapshot.endpoints[0].ips.append("10.0.0.999"), "bad IP address"),
        (lambda m: _first_allow(m).__setattr__("port_first", 70000), "bad port"),
        (lambda m: _first_allow(m).__setattr__("protocol", 300), "bad IP protocol"),
        (lambda m: _first_allow(m).peer.cidr.__setattr__("cidr", "nope/8"), "bad CIDR"),
        (lambda m: _first_allow(m).ClearField("peer"), "without a peer"),
        (lambda m: m.snapshot.identities.add(id=7, ips=["fe80::zz"]), "bad IP address"),
    ],
)
def test_malformed_server_data_is_rejected_with_a_clear_error(mutate, error):
    message = pb.ControlMessage(version=3, snapshot=pb.Snapshot(endpoints=[pb.Endpoint(
        namespace="shop", name="web-1", ips=["10.0.1.10"],
        ingress=pb.DirectionPolicy(isolated=True, allows=[pb.Allow(
            peer=pb.Peer(cidr=pb.IPBlock(cidr="10.0.0.0/8")), protocol=6, port_first=80, port_last=80)]),
    )]))
    assert apply_message(None, message).endpoints["shop/web-1"].ips == (ipaddress.ip_address("10.0.1.10"),)
    mutate(message)
    with pytest.raises(MalformedMessage, match=error):
        apply_message(None, message)


def test_a_delta_must_follow_a_snapshot_and_move_forward():
    delta = pb.ControlMessage(version=4, delta=pb.Delta())
    with pytest.raises(MalformedMessage, match="before any snapshot"):
        apply_message(None, delta)
    state = apply_message(None, pb.ControlMessage(version=4, snapshot=pb.Snapshot()))
    with pytest.raises(MalformedMessage, match="does not follow"):
        apply_message(state, delta)


def test_acks_status_and_closes_go_on_while_a_change_is_being_resolved():
    """The gRPC event loop records acks and answers status: none of that may wait for the source
    resolving a change (a large one holds the resolver for seconds). Before the hub split its
    lock, each of these calls blocked until the change below was published."""
    hub = make_hub()
    n1, n2 = hub.open_stream("n1", 0), hub.open_stream("n2", 0)
    first = n1.next(0)
    assert first is not None
    n1.mark_sent(first.version, first.policy)
    with change_held_open(hub, allow_from("web-from-client", "web", "client", 9090)):
        done = threading.Event()

        def loop_side() -> None:
            hub.ack(n1, first.version, True, "")
            hub.state_repairs(n1, 1, "tc filter on eth0")
            hub.close_stream(n2, "the agent went away")
            done.set()

        threading.Thread(target=loop_side, daemon=True).start()
        assert done.wait(2), "an ack, a repair report or a close waited for the change"
        status = hub.status()
        assert status.nodes["n1"].acked_version == status.version  # in sync before the change lands
        assert status.nodes["n1"].state_repairs == 1
        assert not status.nodes["n2"].connected
    update = n1.next(0)
    assert update is not None and update.version == hub.version, "the change still reaches n1"
    assert hub.status().nodes["n1"].acked_version < hub.version, "not acked yet"
