"""NodeSync over a real gRPC server on loopback: snapshots, deltas, per-node scoping, acks and
status, reconnects, mTLS node identity, and malformed or oversized client messages."""

from __future__ import annotations

import argparse
import io
import ipaddress
import json
import queue
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from contextlib import redirect_stderr, redirect_stdout

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agent.api import podfence_pb2 as pb
from agent.api import podfence_pb2_grpc as pb_grpc
from agent.control import status as status_cmd
from agent.control.hub import SourceProblem
from agent.control.server import SYNC_SERVICE, ServerSettings
from agent.dataplane.base import TemporaryDataplaneError
from agent.dataplane.types import CidrPeer, IdentityPeer
from tests.unit.control_helpers import (
    WAIT,
    RecordingAgent,
    TestCA,
    allow_from,
    pod,
    small_cluster,
    start_control,
    wait_until,
)


@pytest.fixture
def control():
    ctl = start_control(small_cluster())
    yield ctl
    ctl.stop()


class RawStream:
    """A hand-driven Sync stream, to see the exact messages (snapshot vs delta) on the wire."""

    def __init__(self, target: str, node: str, last_applied: int = 0) -> None:
        self.channel = grpc.insecure_channel(target)
        self.outgoing: queue.Queue[pb.AgentMessage | None] = queue.Queue()
        self.outgoing.put(pb.AgentMessage(hello=pb.Hello(node_name=node, last_applied_version=last_applied)))
        self.call = pb_grpc.NodeSyncStub(self.channel).Sync(self._requests())
        self.received: queue.Queue[pb.ControlMessage | grpc.RpcError] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _requests(self) -> Iterator[pb.AgentMessage]:
        while (message := self.outgoing.get()) is not None:
            yield message

    def _read(self) -> None:
        try:
            for message in self.call:
                self.received.put(message)
        except grpc.RpcError as exc:
            self.received.put(exc)

    def next(self, timeout: float = WAIT) -> pb.ControlMessage:
        item = self.received.get(timeout=timeout)
        assert isinstance(item, pb.ControlMessage), f"stream ended: {item}"
        return item

    def ack(self, version: int, ok: bool = True, error: str = "") -> None:
        self.outgoing.put(pb.AgentMessage(ack=pb.Ack(version=version, ok=ok, error=error)))

    def ended_with(self, timeout: float = WAIT) -> grpc.StatusCode:
        while True:
            item = self.received.get(timeout=timeout)
            if isinstance(item, grpc.RpcError):
                return item.code()

    def close(self) -> None:
        self.outgoing.put(None)
        self.call.cancel()
        self.channel.close()


def _endpoint_keys(message: pb.ControlMessage) -> set[str]:
    return {f"{e.namespace}/{e.name}" for e in message.snapshot.endpoints}


def _status(ctl) -> dict:
    out = io.StringIO()
    args = argparse.Namespace(control=ctl.target, json=True, insecure=False, tls_cert=None, tls_key=None,
                              tls_ca=None, timeout=5.0)
    with redirect_stdout(out):
        assert status_cmd.run(args) == 0
    return json.loads(out.getvalue())


def test_snapshot_first_then_a_delta_with_only_what_changed(control):
    stream = RawStream(control.target, "n1")
    try:
        first = stream.next()
        assert first.WhichOneof("body") == "snapshot"
        assert first.version == control.hub.version
        assert _endpoint_keys(first) == {"shop/web-1", "shop/client-1"}
        web = next(e for e in first.snapshot.endpoints if e.name == "web-1")
        assert web.ingress.isolated and [a.port_first for a in web.ingress.allows] == [8080]
        stream.ack(first.version)

        with control.hub.change() as resolver:
            resolver.upsert(allow_from("web-from-client", "web", "client", 9090))
        second = stream.next()
        assert second.WhichOneof("body") == "delta"
        assert second.version > first.version
        assert [e.name for e in second.delta.upsert_endpoints] == ["web-1"]  # client-1 did not change
        assert [a.port_first for a in second.delta.upsert_endpoints[0].ingress.allows] == [9090]
        assert not second.delta.remove_endpoints

        with control.hub.change() as resolver:
            resolver.delete("Pod", "shop", "client-1")
        third = stream.next()
        assert list(third.delta.remove_endpoints) == ["shop/client-1"]
    finally:
        stream.close()


def test_each_node_gets_only_its_own_pods_and_the_peers_they_reference(control, agents):
    n1, n2, n3 = (agents(n, control.target) for n in ("n1", "n2", "n3"))
    s1 = n1.wait_for_state(lambda s: bool(s.endpoints), "snapshot")
    s2 = n2.wait_for_state(lambda s: bool(s.endpoints), "snapshot")
    s3 = n3.wait_for_state(lambda s: bool(s.endpoints), "snapshot")
    assert set(s1.endpoints) == {"shop/web-1", "shop/client-1"}
    assert set(s2.endpoints) == {"shop/web-2"}
    assert set(s3.endpoints) == {"shop/db-1"}
    # web-2 on n2 admits the client identity, so n2 learns the client's IP; db-1 references nothing.
    allow = s2.endpoints["shop/web-2"].ingress.allows[0]
    assert isinstance(allow.peer, IdentityPeer)
    assert s2.identities[allow.peer.identity] == (ipaddress.ip_address("10.0.1.11"),)
    assert s3.identities == {}
    assert s2.endpoints["shop/web-2"].ifindex is None  # the node layer finds interfaces, not sync


def test_a_policy_change_reaches_every_affected_node_and_only_those(control, agents):
    n1, n2, n3 = (agents(n, control.target) for n in ("n1", "n2", "n3"))
    for agent in (n1, n2, n3):
        agent.wait_for_state(lambda s: bool(s.endpoints), "snapshot")
    wait_until(
        lambda: all(v["applied_version"] == control.hub.version for v in _status(control)["nodes"].values()),
        what="all nodes acked the snapshot",
    )
    applied_on_n3 = len(n3.states)

    with control.hub.change() as resolver:
        resolver.upsert(allow_from("web-from-client", "web", "client", 9090))
    version = control.hub.version
    for agent in (n1, n2):
        state = agent.wait_for_state(lambda s: s.version == version, "the new version")
        web = next(e for k, e in state.endpoints.items() if k.startswith("shop/web"))
        assert [a.port_first for a in web.ingress.allows] == [9090]
    wait_until(lambda: _status(control)["nodes"]["n2"]["applied_version"] == version, what="n2 acked")
    assert len(n3.states) == applied_on_n3, "n3 hosts no web pod and must not be sent anything"
    # n3 is still reported in sync: nothing it enforces changed since its last ack.
    assert _status(control)["nodes"]["n3"] == {"applied_version": version, "connected": True,
                                               "last_error": None}


def test_status_json_has_exactly_the_documented_shape(control, agents):
    agent = agents("n1", control.target)
    agent.wait_for_state(lambda s: bool(s.endpoints))
    wait_until(lambda: _status(control)["nodes"].get("n1", {}).get("applied_version") == control.hub.version)
    status = _status(control)
    # the contract's two, and extras
    assert set(status) == {"version", "nodes", "source_errors", "source_freshness"}
    assert status["source_errors"] == []
    assert status["source_freshness"] is None, "no API server behind this hub's source"
    assert isinstance(status["version"], int) and status["version"] == control.hub.version
    assert status["nodes"] == {"n1": {"applied_version": control.hub.version, "connected": True,
                                      "last_error": None}}

    agent.close()
    wait_until(lambda: _status(control)["nodes"]["n1"]["connected"] is False, what="n1 shown disconnected")


def test_status_lists_the_source_errors_and_what_stays_in_force(control):
    control.hub.set_source_problems([
        SourceProblem("NetworkPolicy shop/deny", "/src/deny.yaml", "NetworkPolicy shop/deny: bad port", True),
        SourceProblem(None, "/src/broken.yaml", "invalid YAML at line 2", False),
    ])
    assert _status(control)["source_errors"] == [
        {"object": None, "source": "/src/broken.yaml", "error": "invalid YAML at line 2",
         "last_valid_in_force": False},
        {"object": "NetworkPolicy shop/deny", "source": "/src/deny.yaml",
         "error": "NetworkPolicy shop/deny: bad port", "last_valid_in_force": True},
    ]
    out = io.StringIO()
    args = argparse.Namespace(control=control.target, json=False, insecure=False, tls_cert=None,
                              tls_key=None, tls_ca=None, timeout=5.0)
    with redirect_stdout(out):
        assert status_cmd.run(args) == 0
    assert "/src/deny.yaml: NetworkPolicy shop/deny: bad port (last valid form in force)" in out.getvalue()


def test_status_asks_the_first_replica_that_answers(control):
    out = io.StringIO()
    args = argparse.Namespace(control=f"127.0.0.1:1,{control.target}", json=True, insecure=False,
                              tls_cert=None, tls_key=None, tls_ca=None, timeout=2.0)
    with redirect_stdout(out):
        assert status_cmd.run(args) == 0
    assert json.loads(out.getvalue())["version"] == control.hub.version


def test_status_exits_1_with_a_message_when_unreachable():
    args = argparse.Namespace(control="127.0.0.1:1", json=True, insecure=False, tls_cert=None, tls_key=None,
                              tls_ca=None, timeout=1.0)
    err, out = io.StringIO(), io.StringIO()
    with redirect_stderr(err), redirect_stdout(out):
        assert status_cmd.run(args) == 1
    assert "unreachable" in err.getvalue() and out.getvalue() == ""


def test_a_failed_apply_is_nacked_and_reported_without_advancing_the_applied_version(control, agents):
    good = agents("n2", control.target)
    good.wait_for_state(lambda s: bool(s.endpoints))
    wait_until(lambda: _status(control)["nodes"]["n2"]["applied_version"] == control.hub.version)
    before = _status(control)["nodes"]["n2"]["applied_version"]
    good.fail_with = TemporaryDataplaneError("tc filter busy")

    with control.hub.change() as resolver:
        resolver.upsert(allow_from("web-from-client", "web", "client", 7070))
    wait_until(lambda: _status(control)["nodes"]["n2"]["last_error"] == "tc filter busy", what="the nack")
    node = _status(control)["nodes"]["n2"]
    assert node["applied_version"] == before
    assert good.client is not None and good.client.last_applied_version == before


def test_agent_keeps_its_state_while_the_server_is_down_and_resyncs_after_restart(agents):
    ctl = start_control(small_cluster(), initial_version=100)
    port = ctl.port
    agent = agents("n1", ctl.target)
    agent.wait_for_state(lambda s: "shop/web-1" in s.endpoints)
    wait_until(lambda: agent.client is not None and agent.client.last_applied_version == 101)
    ctl.stop()
    wait_until(lambda: agent.client is not None and not agent.client.connected, what="disconnect noticed")
    applied = len(agent.states)

    # While nothing listens the agent must leave the kernel alone (no apply calls at all).
    threading.Event().wait(0.5)
    assert len(agent.states) == applied

    # The replacement (e.g. another replica) has other objects and its own version numbering.
    objects = [*small_cluster(), pod("web-3", "n1", "10.0.1.12", "web")]
    restarted = start_control(objects, addr=f"127.0.0.1:{port}", initial_version=500)
    try:
        state = agent.wait_for_state(lambda s: "shop/web-3" in s.endpoints, "a snapshot from the new server")
        assert state.version == 501
        wait_until(lambda: _status(restarted)["nodes"]["n1"]["applied_version"] == 501)
    finally:
        agent.close()
        restarted.stop()


def test_a_restarted_agent_resumes_with_a_fresh_snapshot(control, agents):
    first = agents("n2", control.target)
    first.wait_for_state(lambda s: bool(s.endpoints))
    wait_until(lambda: first.client is not None and first.client.last_applied_version == control.hub.version)
    first.close()
    with control.hub.change() as resolver:
        resolver.upsert(pod("web-9", "n2", "10.0.2.19", "web"))

    second = agents("n2", control.target)
    state = second.wait_for_state(lambda s: "shop/web-9" in s.endpoints, "snapshot with the new pod")
    assert set(state.endpoints) == {"shop/web-2", "shop/web-9"}
    wait_until(lambda: _status(control)["nodes"]["n2"] == {
        "applied_version": control.hub.version, "connected": True, "last_error": None})


def test_the_newest_stream_of_a_node_wins(control):
    older = RawStream(control.target, "n1")
    newer = None
    try:
        older.next()
        newer = RawStream(control.target, "n1")
        assert newer.next().WhichOneof("body") == "snapshot"
        assert older.ended_with() == grpc.StatusCode.CANCELLED
        # Updates go to the newer stream only.
        with control.hub.change() as resolver:
            resolver.upsert(allow_from("web-from-client", "web", "client", 9090))
        assert newer.next().WhichOneof("body") == "delta"
        assert _status(control)["nodes"]["n1"]["connected"] is True
    finally:
        older.close()
        if newer is not None:
            newer.close()


def _raw_sync(target: str, payloads: list[bytes]) -> grpc.StatusCode:
    """Sends raw bytes as Sync requests through a generic (serializer-less) call."""
    with grpc.insecure_channel(target) as channel:
        call = channel.stream_stream("/podfence.v1.NodeSync/Sync")(iter(payloads), timeout=WAIT)
        with pytest.raises(grpc.RpcError) as failure:
            for _ in call:
                pass
        return failure.value.code()


def test_garbage_and_oversized_messages_are_refused_without_disturbing_other_streams(agents):
    ctl = start_control(small_cluster(), settings=ServerSettings(max_receive_bytes=64 * 1024))
    try:
        bystander = agents("n2", ctl.target)
        bystander.wait_for_state(lambda s: bool(s.endpoints))

        assert _raw_sync(ctl.target, [b"\xff\xff\xff\xff garbage"]) == grpc.StatusCode.INVALID_ARGUMENT
        ack_first = pb.AgentMessage(ack=pb.Ack(version=1, ok=True)).SerializeToString()
        assert _raw_sync(ctl.target, [ack_first]) == grpc.StatusCode.INVALID_ARGUMENT
        bad_name = pb.AgentMessage(hello=pb.Hello(node_name="Not A Node!")).SerializeToString()
        assert _raw_sync(ctl.target, [bad_name]) == grpc.StatusCode.INVALID_ARGUMENT
        assert _raw_sync(ctl.target, [b"\x00" * (256 * 1024)]) == grpc.StatusCode.RESOURCE_EXHAUSTED
        # A valid Hello followed by an ack of a version never sent: malformed, that stream closes.
        hello = pb.AgentMessage(hello=pb.Hello(node_name="n9")).SerializeToString()
        bogus_ack = pb.AgentMessage(ack=pb.Ack(version=123456, ok=True)).SerializeToString()
        assert _raw_sync(ctl.target, [hello, bogus_ack]) == grpc.StatusCode.INVALID_ARGUMENT

        with ctl.hub.change() as resolver:
            resolver.upsert(allow_from("web-from-client", "web", "client", 6060))
        version = ctl.hub.version
        bystander.wait_for_state(lambda s: s.version == version, "the bystander still receives updates")
        assert bystander.client is not None and bystander.client.connected
    finally:
        ctl.stop()


def test_mtls_node_certificate_only_subscribes_as_its_own_node(agents, tmp_path):
    ca = TestCA()
    ctl = start_control(small_cluster(), addr="localhost:0", tls=ca.server_tls())
    try:
        target = f"localhost:{ctl.port}"
        own = agents("n1", target, credentials=ca.client_credentials("n1"))
        state = own.wait_for_state(lambda s: bool(s.endpoints), "n1 over mTLS")
        assert set(state.endpoints) == {"shop/web-1", "shop/client-1"}

        # The same certificate asking for n2's policy is refused.
        with grpc.secure_channel(target, ca.client_credentials("n1")) as channel:
            hello = pb.AgentMessage(hello=pb.Hello(node_name="n2"))
            call = pb_grpc.NodeSyncStub(channel).Sync(iter([hello]), timeout=WAIT)
            with pytest.raises(grpc.RpcError) as refused:
                list(call)
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED

        # No client certificate at all: the TLS handshake fails.
        anonymous = grpc.ssl_channel_credentials(ca.pem)
        with grpc.secure_channel(target, anonymous) as channel:
            hello = pb.AgentMessage(hello=pb.Hello(node_name="n1"))
            with pytest.raises(grpc.RpcError) as no_cert:
                list(pb_grpc.NodeSyncStub(channel).Sync(iter([hello]), timeout=5))
            assert no_cert.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "n2" not in ctl.hub.status().nodes

        # `podfence status` over mTLS with an operator's certificate.
        assert _tls_status(ca, "podfence-admin", target, tmp_path)["nodes"]["n1"]["connected"] is True
    finally:
        ctl.stop()


def _tls_status(ca: TestCA, common_name: str, target: str, tmp_path) -> dict:
    issued = ca.issue(common_name)
    for name, data in (("cert.pem", issued.cert), ("key.pem", issued.key), ("ca.pem", ca.pem)):
        (tmp_path / name).write_bytes(data)
    args = argparse.Namespace(
        control=target, json=True, insecure=False, tls_cert=str(tmp_path / "cert.pem"),
        tls_key=str(tmp_path / "key.pem"), tls_ca=str(tmp_path / "ca.pem"), timeout=5.0,
    )
    out = io.StringIO()
    with redirect_stdout(out):
        assert status_cmd.run(args) == 0
    return json.loads(out.getvalue())


def test_mtls_status_shows_a_node_only_its_own_entry_and_an_admin_everything(agents, tmp_path):
    ca = TestCA()
    ctl = start_control(small_cluster(), addr="localhost:0", tls=ca.server_tls())
    try:
        target = f"localhost:{ctl.port}"
        for node in ("n1", "n2"):
            agents(node, target, credentials=ca.client_credentials(node))
        wait_until(lambda: {"n1", "n2"} <= set(ctl.hub.status().nodes), what="both nodes connected")
        ctl.hub.set_source_problems([SourceProblem("NetworkPolicy t/secret", "/f.yaml", "bad port", True)])

        own = _tls_status(ca, "n1", target, tmp_path)
        assert set(own["nodes"]) == {"n1"} and own["source_errors"] == []
        assert own["version"] == ctl.hub.version
        assert _tls_status(ca, "n3", target, tmp_path)["nodes"] == {}, "a node without a stream"
        assert _tls_status(ca, "operator", target, tmp_path)["nodes"] == {}, "not an admin name"
        admin = _tls_status(ca, "podfence-admin", target, tmp_path)
        assert set(admin["nodes"]) == {"n1", "n2"}
        assert [e["object"] for e in admin["source_errors"]] == ["NetworkPolicy t/secret"]
    finally:
        ctl.stop()


def test_health_service_reports_serving(control):
    with grpc.insecure_channel(control.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "podfence.v1.NodeSync"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=WAIT)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_cidr_peers_arrive_as_dataplane_networks(agents):
    from agent.model.objects import IPBlock, LabelSelector, NetworkPolicy, Peer, PolicyType, Rule

    block = NetworkPolicy(
        namespace="shop", name="db-from-range", pod_selector=LabelSelector(),
        policy_types=frozenset({PolicyType.INGRESS}),
        ingress=(Rule(peers=(Peer(ip_block=IPBlock(ipaddress.ip_network("192.168.0.0/16"),
                                                   (ipaddress.ip_network("192.168.1.0/24"),))),)),),
    )
    ctl = start_control([*small_cluster(), block])
    try:
        agent = agents("n3", ctl.target)
        state = agent.wait_for_state(lambda s: bool(s.endpoints))
        peers = [a.peer for a in state.endpoints["shop/db-1"].ingress.allows]
        expected = CidrPeer(ipaddress.ip_network("192.168.0.0/16"), (ipaddress.ip_network("192.168.1.0/24"),))
        assert expected in peers
    finally:
        ctl.stop()


def test_a_stuck_agent_does_not_hold_back_the_others_and_catches_up_later(control, agents):
    release = threading.Event()
    stuck = agents("n1", control.target)
    stuck.wait_for_state(lambda s: bool(s.endpoints))
    fast = agents("n2", control.target)
    fast.wait_for_state(lambda s: bool(s.endpoints))
    stuck.hold = release

    for port in range(9100, 9140):
        with control.hub.change() as resolver:
            resolver.upsert(allow_from("web-from-client", "web", "client", port))
    final = control.hub.version
    fast.wait_for_state(lambda s: s.version == final, "n2 reaches the last version while n1 is stuck")
    assert _status(control)["nodes"]["n1"]["applied_version"] < final

    release.set()
    state = stuck.wait_for_state(lambda s: s.version == final, "n1 catches up once unstuck")
    assert [a.port_first for a in state.endpoints["shop/web-1"].ingress.allows] == [9139]
    wait_until(lambda: _status(control)["nodes"]["n1"]["applied_version"] == final, what="n1 acked")


class MalformedControl(pb_grpc.NodeSyncServicer):
    """Test double of a broken control service (ours cannot be made to send bad data): the first
    stream gets a snapshot with an invalid IP, later streams a valid one. Records every ack."""

    def __init__(self) -> None:
        self.acks: queue.Queue[tuple[int, pb.Ack]] = queue.Queue()
        self.streams = 0

    def Sync(self, request_iterator, context):
        self.streams += 1
        stream = self.streams
        hello = next(request_iterator)
        assert hello.hello.node_name == "n1"
        ips = ["10.0.0.300"] if stream == 1 else ["10.0.0.30"]
        yield pb.ControlMessage(version=7 + stream, snapshot=pb.Snapshot(
            endpoints=[pb.Endpoint(namespace="shop", name="web-1", ips=ips)]))
        for message in request_iterator:
            self.acks.put((stream, message.ack))


def test_the_agent_nacks_malformed_server_data_and_resyncs_without_crashing(agents):
    from concurrent import futures

    double = MalformedControl()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_NodeSyncServicer_to_server(double, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        agent = agents("n1", f"127.0.0.1:{port}")
        stream, nack = double.acks.get(timeout=WAIT)
        assert stream == 1 and not nack.ok and nack.version == 8
        assert "malformed" in nack.error and "10.0.0.300" in nack.error
        stream, ack = double.acks.get(timeout=WAIT)
        assert stream == 2 and ack.ok and ack.version == 9
        assert [s.version for s in agent.states] == [9], "the malformed version never reached apply"
        assert agent.last.endpoints["shop/web-1"].ips == (ipaddress.ip_address("10.0.0.30"),)
    finally:
        server.stop(0)


# --- stream exhaustion ----------------------------------------------------------------------------------


class HalfOpen:
    """Sync streams that are opened and then say nothing (no Hello), as an attacker holds them."""

    def __init__(self, target: str, count: int, credentials: grpc.ChannelCredentials | None = None) -> None:
        self._quiet = threading.Event()
        self.channels = [
            grpc.secure_channel(target, credentials) if credentials else grpc.insecure_channel(target)
            for _ in range(count)
        ]
        self.calls = [pb_grpc.NodeSyncStub(c).Sync(self._nothing()) for c in self.channels]
        self.ended: queue.Queue[grpc.StatusCode] = queue.Queue()
        for call in self.calls:
            threading.Thread(target=self._watch, args=(call,), daemon=True).start()

    def _nothing(self) -> Iterator[pb.AgentMessage]:
        self._quiet.wait()
        return
        yield  # a generator that never yields: the stream stays half-open

    def _watch(self, call) -> None:
        try:
            for _ in call:
                pass
        except grpc.RpcError as exc:
            self.ended.put(exc.code())

    def codes(self, count: int, timeout: float = WAIT) -> list[grpc.StatusCode]:
        return [self.ended.get(timeout=timeout) for _ in range(count)]

    def close(self) -> None:
        self._quiet.set()
        for call in self.calls:
            call.cancel()
        for channel in self.channels:
            channel.close()


def _refused(ctl, reason: str) -> float:
    return ctl.metrics.streams_refused_total.labels(reason)._value.get()


def test_half_open_streams_of_a_compromised_node_do_not_lock_other_agents_out(agents):
    """40 streams that never say Hello, from one node's certificate, against a pool of 24 threads:
    before the caps every thread waited for a Hello forever and no agent could sync again."""
    ca = TestCA()
    ctl = start_control(small_cluster(), addr="localhost:0", tls=ca.server_tls(),
                        settings=ServerSettings(max_workers=24))
    target = f"localhost:{ctl.port}"
    attacker = HalfOpen(target, 40, ca.client_credentials("n9"))
    try:
        time.sleep(0.5)  # the attacker's streams are in place
        agent = agents("n1", target, credentials=ca.client_credentials("n1"))
        agent.wait_for_state(lambda s: bool(s.endpoints), "n1 syncs while the attacker holds streams")
        with grpc.secure_channel(target, ca.client_credentials("podfence-admin")) as channel:
            status = pb_grpc.ControlStatusStub(channel).GetStatus(pb.StatusRequest(), timeout=WAIT)
        assert status.nodes["n1"].connected
        assert _refused(ctl, "client_limit") == 32, "8 may wait for their Hello, the rest are refused"
        assert set(attacker.codes(32)) == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    finally:
        attacker.close()
        ctl.stop()


def test_a_stream_without_hello_ends_at_its_deadline_and_frees_its_slot(agents):
    ctl = start_control(small_cluster(), settings=ServerSettings(hello_timeout_s=0.5))
    try:
        silent = HalfOpen(ctl.target, 3)
        assert silent.codes(3, timeout=5) == [grpc.StatusCode.DEADLINE_EXCEEDED] * 3
        assert _refused(ctl, "hello_timeout") == 3
        wait_until(lambda: ctl.server_sync_streams() == 0, what="the slots freed")
        assert ctl.hub.open_streams() == [], "a stream without Hello is never registered"
        silent.close()
    finally:
        ctl.stop()


def test_without_tls_a_flood_from_one_address_delays_an_agent_at_most_one_hello_deadline(agents):
    """Without TLS the client is its address, and the lab's agents share 127.0.0.1 with the
    attacker here: the agent's own stream may be refused while the flood fills the address's
    pending slots, but those end at the Hello deadline and the agent's retry gets through."""
    ctl = start_control(small_cluster(), settings=ServerSettings(max_workers=24, hello_timeout_s=1.0))
    flood = HalfOpen(ctl.target, 40)
    try:
        agent = agents("n1", ctl.target)
        agent.wait_for_state(lambda s: bool(s.endpoints), "n1 syncs despite the flood")
        assert _refused(ctl, "client_limit") >= 32
    finally:
        flood.close()
        ctl.stop()


def test_the_total_stream_limit_refuses_with_a_clear_status_and_status_still_answers():
    ca = TestCA()
    settings = ServerSettings(max_workers=8)  # 6 streams, 2 threads kept for GetStatus and health
    assert settings.max_streams == 6
    ctl = start_control(small_cluster(), addr="localhost:0", tls=ca.server_tls(), settings=settings)
    target = f"localhost:{ctl.port}"
    holders = [HalfOpen(target, 1, ca.client_credentials(f"n{i}")) for i in range(10, 16)]
    try:
        wait_until(lambda: ctl.server_sync_streams() == 6, what="six streams held")
        extra = HalfOpen(target, 1, ca.client_credentials("n20"))
        assert extra.codes(1) == [grpc.StatusCode.RESOURCE_EXHAUSTED]
        assert _refused(ctl, "total_limit") == 1
        with grpc.secure_channel(target, ca.client_credentials("podfence-admin")) as channel:
            assert pb_grpc.ControlStatusStub(channel).GetStatus(pb.StatusRequest(), timeout=WAIT).version
        extra.close()
    finally:
        for holder in holders:
            holder.close()
        ctl.stop()


class SilentControl:
    """A control replica that accepts Sync streams and never answers (stuck, or hostile)."""

    def __init__(self) -> None:
        self.streams = 0
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        handler = grpc.stream_stream_rpc_method_handler(self._sync)
        self.server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler(SYNC_SERVICE, {"Sync": handler})]
        )
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _sync(self, requests, context):
        self.streams += 1
        for _ in requests:  # until the agent gives up on this stream
            pass
        return
        yield

    def stop(self) -> None:
        self.server.stop(0)


def test_an_agent_whose_first_snapshot_is_overdue_reconnects():
    silent = SilentControl()
    agent = RecordingAgent("n1", silent.target, first_message_timeout=0.4).start()
    try:
        wait_until(lambda: silent.streams >= 3, timeout=5, what="new streams after each deadline")
    finally:
        agent.close()
        silent.stop()


def test_an_agent_fails_over_to_the_next_control_address(control):
    silent = SilentControl()
    agent = RecordingAgent("n1", f"{silent.target},{control.target}", first_message_timeout=0.4).start()
    try:
        state = agent.wait_for_state(lambda s: bool(s.endpoints), "a snapshot from the second replica")
        assert set(state.endpoints) == {"shop/web-1", "shop/client-1"}
        assert silent.streams >= 1
        assert agent.client is not None and agent.client.target == control.target
    finally:
        agent.close()
        silent.stop()
