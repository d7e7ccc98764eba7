"""The control service on its event loop (grpc.aio): streams cost no threads, and nothing the
loop serves (status, heartbeats, other streams) waits for a change being resolved or for a
stream's snapshot. Real gRPC over loopback; the agents are raw aio streams on one client loop."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator

import grpc
import grpc.aio
import pytest

from agent.api import podfence_pb2 as pb
from agent.api import podfence_pb2_grpc as pb_grpc
from tests.unit.control_helpers import (
    Control,
    allow_from,
    change_held_open,
    small_cluster,
    start_control,
    wait_until,
)

STREAMS = 100


class ClientLoop:
    """Raw Sync streams, all on one asyncio loop in one thread (so the client adds no thread per stream)."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="client-loop", daemon=True)
        self.thread.start()
        self.channel = self.run(self._channel())
        self.calls: list[grpc.aio.StreamStreamCall] = []

    async def _channel(self) -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(self.target)

    def run(self, coroutine, timeout: float = 20.0):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def open(self, node: str, heartbeat_ms: int = 0) -> grpc.aio.StreamStreamCall:
        """A stream that said Hello (it has not necessarily received anything yet)."""
        async def start() -> grpc.aio.StreamStreamCall:
            call = pb_grpc.NodeSyncStub(self.channel).Sync()
            hello = pb.Hello(node_name=node, heartbeat_interval_ms=heartbeat_ms)
            await call.write(pb.AgentMessage(hello=hello))
            return call
        call = self.run(start())
        self.calls.append(call)
        return call

    def receive(self, call: grpc.aio.StreamStreamCall, timeout: float = 10.0) -> pb.ControlMessage:
        return self.run(asyncio.wait_for(call.read(), timeout), timeout + 5)

    def cancel(self, call: grpc.aio.StreamStreamCall) -> None:
        """Cancels `call` on its own loop (aio objects are not thread-safe)."""
        async def cancel() -> None:
            call.cancel()
        self.run(cancel())

    def close(self) -> None:
        for call in self.calls:
            self.cancel(call)
        self.run(self.channel.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def control() -> Iterator[Control]:
    ctl = start_control(small_cluster())
    yield ctl
    ctl.stop()


@pytest.fixture
def client(control: Control) -> Iterator[ClientLoop]:
    loop = ClientLoop(control.target)
    yield loop
    loop.close()


def test_a_hundred_streams_add_no_thread_each(control: Control, client: ClientLoop) -> None:
    """The thread-per-stream server held two threads per stream (4,021 for 2,000 agents)."""
    before = threading.active_count()
    calls = [client.open(f"node-{i}") for i in range(STREAMS)]
    for call in calls:
        assert client.receive(call).WhichOneof("body") == "snapshot"
    assert control.hub.status().streams == STREAMS
    grown = threading.active_count() - before
    assert grown < STREAMS // 4, f"{grown} threads more for {STREAMS} streams"


def test_status_heartbeats_and_other_streams_go_on_while_a_change_is_resolved(
        control: Control, client: ClientLoop) -> None:
    """A source resolving a large change holds the resolver for seconds; the threaded server
    answered GetStatus (and recorded acks) only after it."""
    idle = client.open("n1", heartbeat_ms=100)
    snapshot = client.receive(idle)
    assert snapshot.WhichOneof("body") == "snapshot"
    client.run(idle.write(pb.AgentMessage(ack=pb.Ack(version=snapshot.version, ok=True))))
    with change_held_open(control.hub, allow_from("web-from-client", "web", "client", 9090)):
        newcomer = client.open("n2")  # its snapshot waits for the change, off the loop
        with grpc.insecure_channel(control.target) as channel:
            status = pb_grpc.ControlStatusStub(channel).GetStatus(pb.StatusRequest(), timeout=2)
        assert status.nodes["n1"].connected and status.nodes["n1"].applied_version == snapshot.version
        assert client.receive(idle, timeout=2).HasField("heartbeat")
    assert client.receive(newcomer).WhichOneof("body") == "snapshot"
    while (message := client.receive(idle)).HasField("heartbeat"):
        pass
    assert message.WhichOneof("body") == "delta" and message.version == control.hub.version


def test_a_stream_gone_while_its_snapshot_waits_is_not_left_connected(
        control: Control, client: ClientLoop) -> None:
    """The agent leaves while the hub computes its snapshot (in the loop's executor): the stream
    the hub then registers is closed again, not left connected with nobody reading it."""
    with change_held_open(control.hub):
        leaving = client.open("n3")
        wait_until(lambda: control.admission.open_streams == 1 and control.admission.awaiting_hello == 0,
                   what="the stream's Hello read (its snapshot now waits for the change)")
        client.cancel(leaving)
        wait_until(lambda: control.admission.open_streams == 0, what="the stream's slot freed")
    # The snapshot is computed once the change is out; the stream it registers is closed at once.
    wait_until(lambda: "n3" in control.hub.status().nodes, what="the late stream registered")
    wait_until(lambda: not control.hub.status().nodes["n3"].connected, what="the late stream closed")
    assert control.hub.status().streams == 0


def test_a_shutdown_drains_every_stream_with_unavailable_and_logs_no_error(
        caplog: pytest.LogCaptureFixture) -> None:
    ctl = start_control(small_cluster())
    client = ClientLoop(ctl.target)
    try:
        calls = [client.open(f"node-{i}", heartbeat_ms=200) for i in range(5)]
        for call in calls:
            assert client.receive(call).WhichOneof("body") == "snapshot"
        with caplog.at_level(logging.WARNING):
            ctl.stop()
        for call in calls:
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                while True:
                    client.receive(call)
            assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    finally:
        ctl.stop()
        client.close()


def test_a_message_kind_without_a_handler_ends_only_its_stream(control: Control, client: ClientLoop) -> None:
    """After Hello each AgentMessage kind goes to its registered handler; a second Hello has none."""
    bystander = client.open("n1")
    assert client.receive(bystander).WhichOneof("body") == "snapshot"
    rude = client.open("n2")
    assert client.receive(rude).WhichOneof("body") == "snapshot"
    client.run(rude.write(pb.AgentMessage(hello=pb.Hello(node_name="n2"))))
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        while True:
            client.receive(rude)
    assert ended.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "only these messages are allowed: ack, flows, state_repairs" in (ended.value.details() or "")
    with control.hub.change() as resolver:
        resolver.upsert(allow_from("web-from-client", "web", "client", 7070))
    assert client.receive(bystander).WhichOneof("body") == "delta"
