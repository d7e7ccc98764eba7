"""Simulated agents for the fan-out benchmark: hundreds of real Sync streams per process.

A real agent decodes each version into a NodeState and programs the kernel; here an agent only
speaks the protocol with the generated stubs (agent/api): Hello (asking for heartbeats like a real
agent), then for every version received an Ack at once. Each agent has its own channel, so its
own TCP connection to the control service, as on a cluster. They run on asyncio (grpc.aio) in a
few processes so that 2,000 of them fit on a 2-core machine: 2,000 SyncClient threads would
measure the GIL of one process rather than the control service.

Every version received is reported to the coordinator as (node, version, CLOCK_MONOTONIC time),
which is one clock for all processes on Linux, in batches on a multiprocessing queue.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import random
import time
from collections import Counter
from collections.abc import AsyncIterator
from multiprocessing.synchronize import Event as MpEvent
from typing import Any

import grpc

from agent.api import podfence_pb2 as pb
from agent.api import podfence_pb2_grpc as pb_grpc

HEARTBEAT_MS = 10_000  # what a real agent asks for (agent/node/sync.py DEFAULT_HEARTBEAT_S)
FLUSH_S = 0.02
Arrival = tuple[str, int, float]  # node, version, time.monotonic() when it arrived (and was acked)


def start(target: str, nodes: list[str], processes: int, hello_gate: int,
          ) -> tuple[list[Any], Any, MpEvent]:
    """Starts `processes` worker processes sharing `nodes`; returns them, their report queue
    (lists of Arrival, and a final ("stream_errors", {code: count}) from each) and the event that stops them.
    `hello_gate` bounds the streams awaiting their first message, over all processes."""
    context = multiprocessing.get_context("spawn")  # no fork of a process that has used grpc
    reports = context.Queue()
    stop = context.Event()
    gate = max(1, hello_gate // processes)
    workers = [
        context.Process(target=worker, args=(target, nodes[i::processes], reports, stop, gate),
                        name=f"simagents-{i}", daemon=True)
        for i in range(processes)
    ]
    for process in workers:
        process.start()
    return workers, reports, stop


def worker(target: str, nodes: list[str], reports: Any, stop: MpEvent, gate: int) -> None:
    asyncio.run(_serve(target, nodes, reports, stop, gate))


async def _serve(target: str, nodes: list[str], reports: Any, stop: MpEvent, gate: int) -> None:
    arrivals: list[Arrival] = []
    errors: Counter[str] = Counter()
    hello_gate = asyncio.Semaphore(gate)
    tasks = [asyncio.create_task(_agent(target, node, arrivals, errors, hello_gate)) for node in nodes]
    while not stop.is_set():
        await asyncio.sleep(FLUSH_S)
        if arrivals:
            reports.put(list(arrivals))
            arrivals.clear()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    reports.put(("stream_errors", dict(errors)))


async def _agent(target: str, node: str, arrivals: list[Arrival], errors: Counter[str],
                 hello_gate: asyncio.Semaphore) -> None:
    """One agent: a stream, re-opened after a short random pause whenever it ends."""
    last_version = 0
    while True:
        acks: asyncio.Queue[pb.AgentMessage] = asyncio.Queue()
        hello = pb.AgentMessage(hello=pb.Hello(
            node_name=node, agent_version="bench", last_applied_version=last_version,
            heartbeat_interval_ms=HEARTBEAT_MS,
        ))

        async def requests(first: pb.AgentMessage = hello,
                           queue: asyncio.Queue[pb.AgentMessage] = acks) -> AsyncIterator[pb.AgentMessage]:
            yield first
            while True:
                yield await queue.get()

        # The control service admits few streams per client address awaiting Hello (admission.py)
        # and every agent here comes from 127.0.0.1: hold the gate until the first message.
        await hello_gate.acquire()
        gated = True
        try:
            async with grpc.aio.insecure_channel(
                target, options=[("grpc.use_local_subchannel_pool", 1)]
            ) as channel:
                call = pb_grpc.NodeSyncStub(channel).Sync(requests())
                async for message in call:
                    if gated:
                        hello_gate.release()
                        gated = False
                    if message.HasField("heartbeat"):
                        continue
                    arrivals.append((node, message.version, time.monotonic()))
                    acks.put_nowait(pb.AgentMessage(ack=pb.Ack(version=message.version, ok=True)))
                    last_version = message.version
        except grpc.aio.AioRpcError as failure:
            errors[failure.code().name] += 1
        finally:
            if gated:
                hello_gate.release()
        await asyncio.sleep(random.uniform(0.05, 0.5))
