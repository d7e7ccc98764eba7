"""Flow relay benchmark (issue 24): records from an agent's flow buffer to `podfence observe`.

A real control service and a real SyncClient on loopback (in this process), and READERS
`--follow` readers, each a process of its own reading every record over gRPC, once with Observe
(a message per record) and once with ObserveBatches (the queued records in one message). The
agent's flow buffer is fed RECORDS records as fast as the feed can hand them over. Reports the feed's cost
per record (what the node's flow feed pays: the sink never waits for the network), how soon the
control service had accepted every record, how soon the slowest reader had them all, the CPU
of this process (agent and control together) per record, and what was lost (nothing expected:
the buffers are large enough here). Ratios within one run only: the machine is shared.
Run: `.venv/bin/python -m bench flow_relay`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from agent.control.observe_service import ObserveSettings
from agent.dataplane.flows import FlowRecord, FlowVerdict
from agent.node.flowbuffer import FlowBuffer
from tests.unit.control_helpers import RecordingAgent, small_cluster, start_control, wait_until

RECORDS = int(os.environ.get("PODFENCE_BENCH_FLOW_RECORDS", "50000"))
READERS = int(os.environ.get("PODFENCE_BENCH_FLOW_READERS", "4"))
REPO = Path(__file__).resolve().parent.parent
_READER = """
import sys, time
import grpc
from agent.api import podfence_pb2 as pb, podfence_pb2_grpc as pb_grpc
target, wanted, rpc = sys.argv[1], int(sys.argv[2]), sys.argv[3]
got = 0
with grpc.insecure_channel(target) as channel:
    print("ready", flush=True)
    stub = pb_grpc.FlowObserverStub(channel)
    if rpc == "Observe":  # one record per message
        messages = ([record] for record in stub.Observe(pb.ObserveRequest(follow=True)))
    else:
        messages = (batch.records for batch in stub.ObserveBatches(pb.ObserveRequest(follow=True)))
    for records in messages:
        got += sum(1 + record.lost_before for record in records)
        if got >= wanted:
            break
print(time.time(), flush=True)
"""


def _record(i: int) -> FlowRecord:
    return FlowRecord(time_ns=time.time_ns(), endpoint="shop/web-1", direction="ingress", protocol=6,
                      source="10.0.1.11", destination="10.0.1.10", source_port=1024 + i % 60000,
                      destination_port=8080, verdict=FlowVerdict.ALLOWED, tier="networkpolicy",
                      policy="shop/web-from-client", rule="ingress[0]")


def _readers(ctl: Any) -> float | None:
    return ctl.metrics.registry.get_sample_value("podfence_control_flow_readers")


def run() -> dict[str, Any]:
    """Both Observe RPCs, one after the other in this run (compare their ratio, not the figures)."""
    return {rpc: measure(rpc) for rpc in ("Observe", "ObserveBatches")}


def measure(rpc: str) -> dict[str, Any]:
    ctl = start_control(small_cluster(), observe=ObserveSettings(
        allow_unauthenticated=True, ring_size=RECORDS, reader_queue=RECORDS))
    agent = RecordingAgent("n1", ctl.target).start()
    assert agent.client is not None
    buffer = FlowBuffer(agent.client.offer_flows, capacity=RECORDS)
    sender = threading.Thread(target=buffer.run, args=(agent.stop,), daemon=True)
    sender.start()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    readers = [subprocess.Popen([sys.executable, "-c", _READER, ctl.target, str(RECORDS), rpc], env=env,
                                stdout=subprocess.PIPE, text=True) for _ in range(READERS)]
    try:
        agent.wait_for_state(lambda state: True, "a snapshot")
        wait_until(lambda: _readers(ctl) == READERS, timeout=60, what="the readers")
        records = [_record(i) for i in range(RECORDS)]
        cpu_before = time.process_time()
        started_wall, started = time.time(), time.perf_counter()
        for record in records:
            buffer.sink(record)
        sink_s = time.perf_counter() - started
        wait_until(lambda: ctl.metrics.flow_records_total.labels("accepted")._value.get() >= RECORDS,
                   timeout=600, what="every record at the control service")
        accepted_s = time.perf_counter() - started
        finished = []
        for reader in readers:
            out, _ = reader.communicate(timeout=600)
            finished.append(float(out.split()[-1]))
        cpu_s = time.process_time() - cpu_before
        slowest_s = max(finished) - started_wall
        return {
            "records": RECORDS,
            "readers": READERS,
            "sink_us_per_record": round(sink_s / RECORDS * 1e6, 2),
            "control_accepted_all_s": round(accepted_s, 2),
            "slowest_reader_got_all_s": round(slowest_s, 2),
            "records_per_s_to_every_reader": round(RECORDS / slowest_s),
            "agent_and_control_cpu_us_per_record": round(cpu_s / RECORDS * 1e6, 1),
            "agent_lost": buffer.lost,
            "reader_lost": int(ctl.metrics.flow_reader_lost_total._value.get()),
        }
    finally:
        for reader in readers:
            if reader.poll() is None:
                reader.kill()
                reader.wait()
        agent.close()
        ctl.stop()


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
