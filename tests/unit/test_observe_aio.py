"""AsyncFlowObserverService on a real grpc.aio server (one event loop in its own thread) over
loopback: the variant for an event-loop control service. Records are published from other
threads, as the Sync streams' readers do, and through the AgentMessage handler."""

from __future__ import annotations

import asyncio
import io
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio
import pytest

from agent.api import podfence_pb2 as pb
from agent.api import podfence_pb2_grpc as pb_grpc
from agent.control.flow_relay import FlowFilter, FlowRelay, Reader
from agent.control.metrics import ControlMetrics
from agent.control.observe import observe
from agent.control.observe_service import BATCH_RECORDS, AsyncFlowObserverService, ObserveAccess
from tests.unit.control_helpers import WAIT, wait_until


@dataclass
class LoopServer:
    relay: FlowRelay
    port: int
    loop: asyncio.AbstractEventLoop

    def publish(self, node: str, *ports: int, verdict: str = "allowed") -> None:
        self.relay.publish(node, pb.FlowBatch(records=[
            pb.FlowRecord(time_ns=1 + port, endpoint="shop/web-1", direction="ingress", protocol=6,
                          source="10.0.1.11", destination="10.0.1.10", destination_port=port, verdict=verdict)
            for port in ports
        ]))

    def on_loop(self, call) -> None:
        """Runs `call` on the event loop, as the event-loop Sync service runs its message handlers."""
        asyncio.run_coroutine_threadsafe(_run(call), self.loop).result(WAIT)


async def _run(call) -> None:
    call()


def _serve(access: ObserveAccess, relay: FlowRelay | None = None,
           servicer: Any = None) -> Iterator[LoopServer]:
    """`servicer`: wraps the service (to serve only some of its methods)."""
    relay = relay or FlowRelay(ControlMetrics(), max_readers=2)
    loop = asyncio.new_event_loop()
    ready: list[tuple[grpc.aio.Server, int]] = []
    started = threading.Event()

    async def start() -> None:
        server = grpc.aio.server()
        service = AsyncFlowObserverService(relay, access)
        pb_grpc.add_FlowObserverServicer_to_server(servicer(service) if servicer else service, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        ready.append((server, port))
        started.set()

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(start(), loop)
    assert started.wait(WAIT)
    server, port = ready[0]
    try:
        yield LoopServer(relay, port, loop)
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(0.5), loop).result(WAIT)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(WAIT)


@pytest.fixture
def served():
    yield from _serve(ObserveAccess(allow_unauthenticated=True))


def test_stored_and_live_records_reach_an_event_loop_reader(served):
    served.publish("n1", 1, 2)
    with grpc.insecure_channel(f"127.0.0.1:{served.port}") as channel:
        call = pb_grpc.FlowObserverStub(channel).Observe(pb.ObserveRequest(follow=True, last=10))
        try:
            assert [next(call).destination_port for _ in range(2)] == [1, 2]
            served.publish("n1", 3)  # from this thread: the relay wakes the loop
            # and on the loop itself, through the AgentMessage handler of an event-loop Sync service
            message = pb.AgentMessage(flows=pb.FlowBatch(records=[pb.FlowRecord(
                time_ns=9, direction="egress", protocol=17, source="10.0.1.10", destination="10.0.9.9",
                destination_port=53, verdict="denied", node="forged")]))
            served.on_loop(lambda: served.relay.handle_message(_Handle("n2"), message))
            third, fourth = next(call), next(call)
            assert (third.node, third.destination_port) == ("n1", 3)
            assert (fourth.node, fourth.destination_port, fourth.verdict) == ("n2", 53, "denied")
        finally:
            call.cancel()
    wait_until(lambda: served.relay.reader_count() == 0, what="the reader to leave")


def test_filters_and_bounds_hold_on_the_event_loop(served):
    served.publish("n1", 1)
    served.publish("n1", 2, verdict="denied")
    with grpc.insecure_channel(f"127.0.0.1:{served.port}") as channel:
        stub = pb_grpc.FlowObserverStub(channel)
        denied = list(stub.Observe(pb.ObserveRequest(last=10, verdicts=["denied"]), timeout=WAIT))
        assert [r.destination_port for r in denied] == [2]
        with pytest.raises(grpc.RpcError) as raised:
            list(stub.Observe(pb.ObserveRequest(verdicts=["maybe"]), timeout=WAIT))
        assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        follows = [stub.Observe(pb.ObserveRequest(follow=True)) for _ in range(2)]
        wait_until(lambda: served.relay.reader_count() == 2, what="two readers")
        with pytest.raises(grpc.RpcError) as raised:
            next(stub.Observe(pb.ObserveRequest(follow=True), timeout=WAIT))
        assert raised.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        for call in follows:
            call.cancel()


def test_without_identity_the_event_loop_service_refuses_too():
    for served in _serve(ObserveAccess()):
        target = f"127.0.0.1:{served.port}"
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.FlowObserverStub(channel)
            for rpc in (stub.Observe, stub.ObserveBatches):
                with pytest.raises(grpc.RpcError) as raised:
                    list(rpc(pb.ObserveRequest(last=1), timeout=WAIT))
                assert raised.value.code() is grpc.StatusCode.UNAUTHENTICATED


@dataclass
class _Handle:
    """The one attribute of hub.StreamHandle that the flows handler reads."""

    node: str


def test_observe_batches_sends_many_records_per_message_and_what_a_reader_lost(served):
    served.publish("n1", *range(1, 301))  # stored: 300 records, more than one message holds
    with grpc.insecure_channel(f"127.0.0.1:{served.port}") as channel:
        call = pb_grpc.FlowObserverStub(channel).ObserveBatches(pb.ObserveRequest(follow=True, last=300))
        try:
            stored = [next(call), next(call)]
            assert [len(batch.records) for batch in stored] == [BATCH_RECORDS, 300 - BATCH_RECORDS]
            assert [r.destination_port for b in stored for r in b.records] == list(range(1, 301))
            served.publish("n1", *range(1000, 1100))  # live, in one agent batch
            live: list[pb.FlowRecord] = []
            messages = 0
            while len(live) < 100:
                live += next(call).records
                messages += 1
            assert [r.destination_port for r in live] == list(range(1000, 1100))
            assert messages < 100  # the queued ones travel together
        finally:
            call.cancel()
    wait_until(lambda: served.relay.reader_count() == 0, what="the reader to leave")


def test_a_drained_reader_names_what_it_lost_on_the_first_record_it_gets():
    reader = Reader(FlowFilter(), max_queued=2)
    for port in (1, 2, 3, 4):
        reader.offer(pb.FlowRecord(destination_port=port))
    first = reader.drain(10)
    assert [(r.destination_port, r.lost_before) for r in first] == [(1, 2), (2, 0)]
    reader.offer(pb.FlowRecord(destination_port=5))
    assert [(r.destination_port, r.lost_before) for r in reader.drain(10)] == [(5, 0)]


class _BeforeBatches(pb_grpc.FlowObserverServicer):
    """A control service from before ObserveBatches: only Observe (the rest UNIMPLEMENTED)."""

    def __init__(self, service: AsyncFlowObserverService) -> None:
        self.Observe = service.Observe  # type: ignore[method-assign]


class _BatchesOnly(pb_grpc.FlowObserverServicer):
    """Only ObserveBatches: a CLI that still called Observe would get UNIMPLEMENTED."""

    def __init__(self, service: AsyncFlowObserverService) -> None:
        self.ObserveBatches = service.ObserveBatches  # type: ignore[method-assign]


@pytest.mark.parametrize("servicer", [_BatchesOnly, _BeforeBatches])
def test_podfence_observe_reads_batches_and_falls_back_to_observe(servicer):
    relay = FlowRelay(ControlMetrics())
    relay.publish("n1", pb.FlowBatch(records=[
        pb.FlowRecord(time_ns=1 + port, endpoint="shop/web-1", direction="ingress", protocol=6,
                      source="10.0.1.11", destination="10.0.1.10", destination_port=port, verdict="allowed")
        for port in (80, 81)
    ]))
    for served in _serve(ObserveAccess(allow_unauthenticated=True), relay, servicer):
        out, err = io.StringIO(), io.StringIO()
        with grpc.insecure_channel(f"127.0.0.1:{served.port}") as channel:
            code = observe(pb_grpc.FlowObserverStub(channel), pb.ObserveRequest(last=10), "jsonl", WAIT,
                           None, out=out, err=err)
        assert code == 0, err.getvalue()
        assert [json.loads(line)["destination"]["port"] for line in out.getvalue().splitlines()] == [80, 81]
