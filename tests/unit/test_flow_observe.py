"""Flow records from an agent's buffer through its Sync stream to FlowObserver.Observe readers:
real gRPC on loopback, a real control service and a real SyncClient (whose `apply` records states
instead of programming a kernel). Records are fed into the agent's flow buffer directly, as the
node's flow feed does."""

from __future__ import annotations

import threading
import time
from functools import partial
from typing import Any

import grpc
import pytest

from agent.api import podfence_pb2 as pb
from agent.api import podfence_pb2_grpc as pb_grpc
from agent.control.observe_service import ObserveSettings
from agent.dataplane.flows import FlowRecord, FlowVerdict
from agent.node.flowbuffer import FlowBuffer
from tests.unit.control_helpers import WAIT, RecordingAgent, TestCA, small_cluster, start_control, wait_until

OPEN = ObserveSettings(allow_unauthenticated=True)  # plaintext on loopback: the lab's setting


def flow(source: str = "10.0.1.11", destination: str = "10.0.1.10", port: int = 8080,
         verdict: FlowVerdict = FlowVerdict.ALLOWED, protocol: int = 6, policy: str = "shop/web-from-client",
         time_ns: int | None = None, endpoint: str = "shop/web-1") -> FlowRecord:
    denied = verdict is not FlowVerdict.ALLOWED
    return FlowRecord(
        time_ns=time.time_ns() if time_ns is None else time_ns, endpoint=endpoint, direction="ingress",
        protocol=protocol, source=source, destination=destination, source_port=40000,
        destination_port=port, verdict=verdict, reason="policy" if denied else "",
        tier="networkpolicy", policy=policy, rule="isolated, no rule matched" if denied else "ingress[0]",
    )


class Node:
    """A recording agent with a flow buffer whose sender runs in its own thread."""

    def __init__(self, name: str, target: str, credentials: grpc.ChannelCredentials | None = None,
                 capacity: int = 8192) -> None:
        self.agent = RecordingAgent(name, target, credentials=credentials).start()
        assert self.agent.client is not None
        self.buffer = FlowBuffer(self.agent.client.offer_flows, capacity=capacity, linger_s=0.02)
        self.thread = threading.Thread(target=self.buffer.run, args=(self.agent.stop,), daemon=True)
        self.thread.start()
        self.agent.wait_for_state(lambda state: True, "a first snapshot")

    def close(self) -> None:
        self.agent.close()
        self.thread.join(timeout=5)


@pytest.fixture
def control():
    ctl = start_control(small_cluster(), observe=OPEN)
    yield ctl
    ctl.stop()


@pytest.fixture
def n1(control):
    node = Node("n1", control.target)
    yield node
    node.close()


def observe(target: str, credentials: grpc.ChannelCredentials | None = None, metadata=None,
            batches: bool = False, **request) -> list[pb.FlowRecord]:
    """The records a call without follow brings (of ObserveBatches with `batches`)."""
    channel = grpc.secure_channel(target, credentials) if credentials else grpc.insecure_channel(target)
    with channel:
        stub = pb_grpc.FlowObserverStub(channel)
        if batches:
            calls = stub.ObserveBatches(pb.ObserveRequest(**request), timeout=WAIT, metadata=metadata)
            return [record for batch in calls for record in batch.records]
        return list(stub.Observe(pb.ObserveRequest(**request), timeout=WAIT, metadata=metadata))


def stored(control, count: int, **request) -> list[pb.FlowRecord]:
    """Waits until the relay holds `count` records matching `request`; returns them."""
    found: list[pb.FlowRecord] = []

    def enough() -> bool:
        found[:] = observe(control.target, last=10_000, **request)
        return len(found) >= count

    wait_until(enough, what=f"{count} stored flow records")
    return found


def readers(control) -> float | None:
    return control.metrics.registry.get_sample_value("podfence_control_flow_readers")


def accepted(control) -> float:
    return control.metrics.flow_records_total.labels("accepted")._value.get()


def test_flows_reach_a_reader_tagged_with_the_node_and_the_pods_of_their_addresses(control, n1):
    n1.buffer.sink(flow())
    n1.buffer.sink(flow(source="192.0.2.7", verdict=FlowVerdict.DENIED))
    records = stored(control, 2)
    assert [r.node for r in records] == ["n1", "n1"]
    allowed, denied = records
    assert (allowed.source_pod, allowed.destination_pod) == ("shop/client-1", "shop/web-1")
    assert (allowed.verdict, allowed.policy) == ("allowed", "shop/web-from-client")
    assert allowed.rule == "ingress[0]"
    assert (denied.source_pod, denied.destination_pod) == ("", "shop/web-1")  # no pod holds 192.0.2.7
    assert denied.verdict == "denied" and denied.reason == "policy"
    assert accepted(control) == 2
    assert n1.buffer.sent == 2 and n1.buffer.lost == 0


def test_a_node_cannot_post_flows_as_another_node(control, n1):
    """The record's node comes from the authenticated stream, never from what the agent wrote."""
    forged = pb.FlowRecord(time_ns=time.time_ns(), endpoint="shop/web-2", direction="ingress", protocol=6,
                           source="10.0.1.11", destination="10.0.2.10", destination_port=8080,
                           verdict="allowed", node="n2")
    assert n1.agent.client is not None
    wait_until(lambda: n1.agent.client.offer_flows(pb.FlowBatch(records=[forged])), what="the stream")
    (record,) = stored(control, 1)
    assert record.node == "n1"
    assert observe(control.target, last=10, nodes=["n2"]) == []


def test_with_mutual_tls_flows_are_tagged_with_the_node_of_the_agents_certificate():
    ca = TestCA()
    ctl = start_control(small_cluster(), addr="localhost:0", tls=ca.server_tls(),
                        observe=ObserveSettings(allowed=("flow-reader",)))
    node = Node("n1", f"localhost:{ctl.port}", credentials=ca.client_credentials("n1"))
    try:
        node.buffer.sink(flow())
        reader = ca.client_credentials("flow-reader")
        wait_until(lambda: len(observe(f"localhost:{ctl.port}", reader, last=10)) == 1, what="the record")
        (record,) = observe(f"localhost:{ctl.port}", reader, last=10)
        assert record.node == "n1"
    finally:
        node.close()
        ctl.stop()


def test_malformed_records_are_counted_and_dropped_and_the_rest_relayed(control, n1):
    good = pb.FlowRecord(time_ns=1, endpoint="shop/web-1", direction="ingress", protocol=6,
                         source="10.0.1.11", destination="10.0.1.10", destination_port=8080,
                         verdict="allowed")
    fine: dict[str, Any] = {"time_ns": 1, "verdict": "allowed", "direction": "ingress",
                            "source": "10.0.0.1", "destination": "10.0.0.2"}
    spoilers: tuple[dict[str, Any], ...] = (
        {"verdict": "maybe"}, {"direction": "sideways"}, {"source": "not-an-ip"}, {"destination_port": 70000},
        {"protocol": 256}, {"policy": "x" * 5000}, {"time_ns": -5},
    )
    bad = [pb.FlowRecord(), *(pb.FlowRecord(**{**fine, **spoilt}) for spoilt in spoilers)]
    assert n1.agent.client is not None
    wait_until(lambda: n1.agent.client.offer_flows(pb.FlowBatch(records=[*bad, good])), what="the stream")
    (record,) = stored(control, 1)
    assert record.source == "10.0.1.11"
    assert control.metrics.flow_records_total.labels("invalid")._value.get() == len(bad)
    assert n1.agent.client.connected  # the stream stays up


@pytest.mark.parametrize(("request_fields", "expected_ports"), [
    ({}, {8080, 9090, 53, 5432}),
    ({"verdicts": ["denied"]}, {9090, 5432}),
    ({"verdicts": ["allowed", "audit-denied"]}, {8080, 53}),
    ({"protocols": [17]}, {53}),
    ({"ports": [9090]}, {9090}),
    ({"from_peers": ["shop/client-1"]}, {8080, 9090, 53}),
    ({"from_peers": ["10.0.1.11"]}, {8080, 9090, 53}),
    ({"from_peers": ["shop/web-2"]}, {5432}),
    ({"from_peers": ["kube-system/"]}, set()),
    ({"to_peers": ["shop/db-1"]}, {5432}),
    ({"to_peers": ["198.51.100.1"]}, {53}),
    ({"pods": ["shop/web-1"]}, {8080, 9090}),
    ({"namespaces": ["shop"]}, {8080, 9090, 53, 5432}),
    ({"namespaces": ["kube-system"]}, set()),
    ({"policies": ["shop/db-only"]}, {5432}),
    ({"nodes": ["n1"]}, {8080, 9090, 53, 5432}),
    ({"nodes": ["n2"]}, set()),
    ({"verdicts": ["denied"], "from_peers": ["shop/client-1"]}, {9090}),  # fields AND, values OR
])
def test_filters(control, n1, request_fields, expected_ports):
    n1.buffer.sink(flow(port=8080))
    n1.buffer.sink(flow(port=9090, verdict=FlowVerdict.DENIED))
    n1.buffer.sink(flow(port=53, protocol=17, verdict=FlowVerdict.AUDIT_DENIED, destination="198.51.100.1",
                        endpoint="shop/client-1"))
    n1.buffer.sink(flow(port=5432, source="10.0.2.10", destination="10.0.3.10", verdict=FlowVerdict.DENIED,
                        policy="shop/db-only", endpoint="shop/db-1"))
    stored(control, 4)
    found = observe(control.target, last=100, **request_fields)
    assert {r.destination_port for r in found} == expected_ports


@pytest.mark.parametrize("request_fields", [
    {"verdicts": ["maybe"]}, {"from_peers": ["not an address"]}, {"pods": ["web-1"]}, {"ports": [70000]},
    {"protocols": [300]}, {"since_seconds": -1.0},
])
def test_a_bad_filter_is_refused_with_invalid_argument(control, request_fields):
    with pytest.raises(grpc.RpcError) as raised:
        observe(control.target, **request_fields)
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT


def test_since_returns_only_records_that_recent_oldest_first(control, n1):
    now = time.time_ns()
    for minutes_ago in (30, 9, 3, 1):
        n1.buffer.sink(flow(port=1000 + minutes_ago, time_ns=now - minutes_ago * 60 * 10**9))
    stored(control, 4)
    recent = observe(control.target, since_seconds=5 * 60)
    assert [r.destination_port for r in recent] == [1003, 1001]
    assert [r.destination_port for r in observe(control.target, last=2)] == [1003, 1001]
    assert observe(control.target) == []  # neither since nor last: nothing stored asked for


def test_follow_gets_the_backlog_then_live_records_none_twice(control, n1):
    n1.buffer.sink(flow(port=1))
    stored(control, 1)
    with grpc.insecure_channel(control.target) as channel:
        call = pb_grpc.FlowObserverStub(channel).Observe(pb.ObserveRequest(follow=True, since_seconds=60))
        try:
            first = next(call)
            wait_until(lambda: readers(control) == 1, what="the reader")
            for port in (2, 3):
                n1.buffer.sink(flow(port=port))
            ports = [first.destination_port, next(call).destination_port, next(call).destination_port]
            assert ports == [1, 2, 3]
        finally:
            call.cancel()
    wait_until(lambda: readers(control) == 0, what="the reader to leave")


def _at_least(items: list, count: int) -> bool:
    return len(items) >= count


def test_a_slow_reader_loses_records_counted_and_slows_neither_the_agent_nor_other_readers():
    ctl = start_control(small_cluster(),
                        observe=ObserveSettings(allow_unauthenticated=True, reader_queue=1000))
    node = Node("n1", ctl.target, capacity=100_000)
    total, burst = 20_000, 500
    # Neither reader's connection may grow its flow-control window: the stalled one then fills its
    # 64 KiB window and its server thread waits on it, as a reader on a slow link would.
    options = [("grpc.http2.bdp_probe", 0)]
    slow_channel = grpc.insecure_channel(ctl.target, options=options)
    fast_channel = grpc.insecure_channel(ctl.target, options=options)
    try:
        slow = pb_grpc.FlowObserverStub(slow_channel).Observe(pb.ObserveRequest(follow=True))
        fast = pb_grpc.FlowObserverStub(fast_channel).Observe(pb.ObserveRequest(follow=True))
        wait_until(lambda: readers(ctl) == 2, what="both readers")
        got: list[pb.FlowRecord] = []

        def read_fast() -> None:
            for record in fast:
                got.append(record)
                if len(got) == total:
                    return

        reader = threading.Thread(target=read_fast, daemon=True)
        reader.start()
        started = time.monotonic()
        for first in range(0, total, burst):  # bursts the fast reader keeps up with
            for port in range(first, first + burst):
                node.buffer.sink(flow(port=port % 65535 + 1))
            wait_until(partial(_at_least, got, min(total, first + burst)), what="the fast reader")
        elapsed = time.monotonic() - started
        assert [r.lost_before for r in got] == [0] * total
        assert node.buffer.lost == 0 and node.buffer.sent == total
        lost = ctl.metrics.flow_reader_lost_total._value.get()
        assert lost > total / 2, f"the stalled reader should have lost most records, not {lost}"
        # the stalled reader, read now: what it kept, and records that say how many it lost before
        received, reported = 0, 0
        for record in slow:
            received += 1
            reported += record.lost_before
            if received + reported >= total:
                break
        assert reported == lost and received + reported == total
        print(f"{total} records relayed to a reader in {elapsed:.2f} s while a stalled one lost {lost:.0f}")
    finally:
        slow_channel.close()
        fast_channel.close()
        node.close()
        ctl.stop()


def test_a_follow_reader_beyond_the_bound_is_refused():
    ctl = start_control(small_cluster(), observe=ObserveSettings(allow_unauthenticated=True, max_readers=1))
    try:
        with grpc.insecure_channel(ctl.target) as channel:
            first = pb_grpc.FlowObserverStub(channel).Observe(pb.ObserveRequest(follow=True))
            wait_until(lambda: readers(ctl) == 1, what="the first reader")
            with pytest.raises(grpc.RpcError) as raised:
                observe(ctl.target, follow=True)
            assert raised.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            first.cancel()
    finally:
        ctl.stop()


# --- authorisation ------------------------------------------------------------------------------------


def test_without_tls_observe_is_refused_unless_the_service_allows_it():
    ctl = start_control(small_cluster())  # plaintext, the default observe settings
    try:
        with pytest.raises(grpc.RpcError) as raised:
            observe(ctl.target, last=10)
        assert raised.value.code() is grpc.StatusCode.UNAUTHENTICATED
        assert "without TLS" in raised.value.details()
    finally:
        ctl.stop()


def test_with_mutual_tls_only_allowed_certificates_observe():
    ca = TestCA()
    ctl = start_control(small_cluster(), addr="localhost:0", tls=ca.server_tls(),
                        observe=ObserveSettings(allowed=("flow-reader",)))
    target = f"localhost:{ctl.port}"
    try:
        for batches in (False, True):  # Observe and ObserveBatches: the same readers
            assert observe(target, ca.client_credentials("flow-reader"), batches=batches, last=1) == []
            # a status admin
            assert observe(target, ca.client_credentials("podfence-admin"), batches=batches, last=1) == []
            for name in ("n1", "someone-else"):  # a node's own certificate is not a reader's
                with pytest.raises(grpc.RpcError) as raised:
                    observe(target, ca.client_credentials(name), batches=batches, last=1)
                assert raised.value.code() is grpc.StatusCode.PERMISSION_DENIED, name
    finally:
        ctl.stop()


def test_with_token_identity_only_allowed_users_observe(tmp_path):
    from agent.control.identity import TokenAuthenticator, TokenReviewer
    from tests.unit.apiserver_double import TokenReviewApiDouble
    from tests.unit.test_control_token_identity import AGENT_NS, AGENT_SA, agent_pod

    apiserver = TokenReviewApiDouble(TestCA(), tmp_path).start()
    apiserver.issue_pod_token("tok-n1", AGENT_NS, AGENT_SA, "podfence-agent-a", "uid-a")
    apiserver.issue_pod_token("tok-hubble-ui", "monitoring", "flow-ui", "flow-ui-1", "uid-ui")
    apiserver.issue_user_token("tok-admin", "alice@example.com")
    apiserver.issue_user_token("tok-bob", "bob@example.com")
    ca = TestCA()
    issued = ca.issue("podfence-control", server=True)
    from agent.control.tls_files import TlsFiles

    reviewer = TokenReviewer(apiserver.api_client(), timeout_s=2.0)
    ctl = start_control(
        [*small_cluster(), agent_pod("podfence-agent-a", "n1", "uid-a", "192.168.0.1")], addr="localhost:0",
        tls=TlsFiles(issued.cert, issued.key, None),
        authenticator=lambda hub: TokenAuthenticator(reviewer, hub.find_pod, f"{AGENT_NS}/{AGENT_SA}",
                                                     admin_users=["alice@example.com"]),
        observe=ObserveSettings(allowed=("monitoring/flow-ui",)),
    )
    target, credentials = f"localhost:{ctl.port}", grpc.ssl_channel_credentials(ca.pem)
    try:
        for allowed in ("tok-hubble-ui", "tok-admin"):
            assert observe(target, credentials, [("authorization", f"Bearer {allowed}")], last=1) == []
        refused: list[tuple[str | None, grpc.StatusCode]] = [
            ("tok-n1", grpc.StatusCode.PERMISSION_DENIED),  # an agent's token: not a reader's
            ("tok-bob", grpc.StatusCode.PERMISSION_DENIED),
            (None, grpc.StatusCode.UNAUTHENTICATED),
            ("tok-forged", grpc.StatusCode.UNAUTHENTICATED),
        ]
        for token, code in refused:
            metadata = [("authorization", f"Bearer {token}")] if token else None
            with pytest.raises(grpc.RpcError) as raised:
                observe(target, credentials, metadata, last=1)
            assert raised.value.code() is code, token
    finally:
        ctl.stop()
        apiserver.stop()


# --- older peers ----------------------------------------------------------------------------------------


def test_an_agent_keeps_its_flows_for_an_older_control_that_does_not_take_them():
    """A control without the relay (as before issue 24) never sets accepts_flows: the agent sends
    it no flow message (which it would end the stream on), keeps the newest records, counts the rest."""
    ctl = start_control(small_cluster(), observe=ObserveSettings(enabled=False))
    node = Node("n1", ctl.target, capacity=5)
    try:
        for port in range(1, 9):
            node.buffer.sink(flow(port=port))
        time.sleep(0.3)  # several send attempts
        assert node.buffer.pending() == 5 and node.buffer.lost == 3 and node.buffer.sent == 0
        assert node.agent.client is not None and node.agent.client.connected
        assert len(node.agent.states) == 1  # one stream, never ended and reopened
        with pytest.raises(grpc.RpcError) as raised:
            observe(ctl.target, last=1)
        assert raised.value.code() is grpc.StatusCode.UNIMPLEMENTED
    finally:
        node.close()
        ctl.stop()


def test_an_older_agent_that_sends_no_flows_syncs_as_before(control):
    """A plain SyncClient without a flow buffer (an agent before issue 24)."""
    agent = RecordingAgent("n1", control.target).start()
    try:
        state = agent.wait_for_state(lambda s: "shop/web-1" in s.endpoints, "n1's snapshot")
        assert state.endpoints["shop/web-1"].ingress.isolated
        wait_until(lambda: control.hub.status().nodes["n1"].acked_version == state.version, what="the ack")
    finally:
        agent.close()


def test_records_kept_while_the_control_is_away_are_sent_when_it_is_back():
    ctl = start_control(small_cluster(), observe=OPEN)
    port = ctl.port
    node = Node("n1", ctl.target)
    ctl.stop()
    wait_until(lambda: node.agent.client is not None and not node.agent.client.connected, what="disconnect")
    for p in (1, 2, 3):
        node.buffer.sink(flow(port=p))
    time.sleep(0.2)
    assert node.buffer.pending() == 3
    again = start_control(small_cluster(), addr=f"127.0.0.1:{port}", observe=OPEN)
    try:
        assert [r.destination_port for r in stored(again, 3)] == [1, 2, 3]
    finally:
        node.close()
        again.stop()


def test_the_agent_side_counts_what_its_buffer_dropped_at_the_control(control):
    node = Node("n1", control.target, capacity=2)
    try:
        assert node.agent.client is not None
        with node.buffer._cond:  # hold the sender off while the feed overflows the buffer
            for p in range(1, 6):
                node.buffer.sink(flow(port=p))
        wait_until(lambda: control.metrics.flow_agent_lost_total._value.get() == 3, what="the lost count")
        assert [r.destination_port for r in stored(control, 2)] == [4, 5]
    finally:
        node.close()
