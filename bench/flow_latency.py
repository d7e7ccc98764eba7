"""Flow record latency (issue 24): from a pod's packet to the line `podfence observe --follow` prints.

One benchmark node (bench/_cluster.py) with two pods, the control service and an agent of the
dataplane under test (PODFENCE_BENCH_LATENCY_DATAPLANES, default "iptables,bpf"), and a real
`podfence observe --follow -o jsonl` reader, all in the node's netns. Pod p0 sends FLOWS UDP
datagrams to p1, each from a source port of its own (a new flow, denied by p1's ingress) and
GAP_S apart, so every record travels alone: the figure is what one flow waits, not a batch.
Reports, per dataplane, the median, 90th percentile and worst of (reader got it - packet sent),
on one clock (both ends run on this machine). Ratios within one run only: the machine is shared.
Run: `.venv/bin/python -m bench flow_latency`.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench import _netlab
from bench._cluster import Processes, node_with_pods, scrape, write_base_folder

FLOWS = int(os.environ.get("PODFENCE_BENCH_LATENCY_FLOWS", "30"))
GAP_S = 0.3
PORT = 9999
FIRST_SOURCE_PORT = 41000
_SENDER = """
import socket, sys, time
destination, port, first, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
gap = float(sys.argv[5])
for k in range(count):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("", first + k))
    sent = time.time()
    s.sendto(b"x", (destination, port))
    s.close()
    print(first + k, sent, flush=True)
    time.sleep(gap)
"""


def _read_lines(stream: Any, into: dict[int, float]) -> None:
    """Arrival time of the first record of each source port the reader prints."""
    for line in stream:
        arrived = time.time()
        try:
            flow = json.loads(line)
        except ValueError:
            continue
        into.setdefault(int(flow["source"]["port"] or 0), arrived)


def _readers(processes: Processes) -> float:
    try:
        return scrape(processes.node.netns, processes.control_metrics_port).get(
            "podfence_control_flow_readers", 0.0)
    except OSError:
        return 0.0


def measure(dataplane: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="pf-latency-") as work, node_with_pods("lat", 2) as topology:
        folder = Path(work) / "folder"
        folder.mkdir()
        write_base_folder(folder, topology, {})
        processes = Processes(topology, folder, Path(work), dataplane=dataplane,
                              control_args=("--observe-without-identity",))
        reader = None
        try:
            processes.start_control()
            processes.start_agent()
            processes.wait(lambda: processes.caught_up(2), "the agent caught up", 120)
            observe = _netlab.python_argv(
                "agent.cli", "observe", "--control", f"127.0.0.1:{processes.control_port}", "--insecure",
                "--follow", "-o", "jsonl", "--protocol", "UDP", "--port", str(PORT))
            reader = subprocess.Popen(_netlab.in_netns_argv(processes.node.netns, observe),
                                      stdout=subprocess.PIPE, text=True, env=_netlab.child_env())
            arrivals: dict[int, float] = {}
            threading.Thread(target=_read_lines, args=(reader.stdout, arrivals), daemon=True).start()
            processes.wait(lambda: _readers(processes) == 1, "the observe reader subscribed", 60)
            p0, p1 = topology.pods["p0"], topology.pods["p1"]
            sender = ["python3", "-c", _SENDER, p1.ip, str(PORT), str(FIRST_SOURCE_PORT), str(FLOWS),
                      str(GAP_S)]
            sent_lines = _netlab.run_in(p0.netns, sender, timeout=120)
            sent = {int(port): float(at) for port, at in (line.split() for line in sent_lines.splitlines())}
            deadline = time.monotonic() + 30
            while len(arrivals.keys() & sent.keys()) < len(sent) and time.monotonic() < deadline:
                time.sleep(0.1)
        finally:
            if reader is not None:
                reader.terminate()
                reader.wait(timeout=10)
            processes.stop()
    latencies = sorted(arrivals[port] - at for port, at in sent.items() if port in arrivals)
    if not latencies:
        return {"dataplane": dataplane, "flows": len(sent), "received": 0}
    return {
        "dataplane": dataplane,
        "flows": len(sent),
        "received": len(latencies),
        "missing_ports": sorted(sent.keys() - arrivals.keys()),
        "median_ms": round(statistics.median(latencies) * 1000, 1),
        "p90_ms": round(latencies[int(0.9 * (len(latencies) - 1))] * 1000, 1),
        "max_ms": round(latencies[-1] * 1000, 1),
    }


def run() -> dict[str, Any]:
    planes = os.environ.get("PODFENCE_BENCH_LATENCY_DATAPLANES", "iptables,bpf").split(",")
    results = {}
    for dataplane in planes:
        results[dataplane] = measure(dataplane)
        print(results[dataplane], flush=True)
    return results


if __name__ == "__main__":
    run()
