"""New pod interface -> guarded: how long a fresh veth stays unfiltered, and what a rescan costs.

With the agent's real pieces (NetlinkMonitor, InterfaceDiscovery, Reconciler, BpfDataplane) in a
process that runs inside a `pfn-bench-` node netns, as the agent does, with EXISTING routed pods that all have
endpoints. Then NEW veths are created one at a time (pyroute2 in this process, so no `ip` start-up
is counted); measured from just before the RTM_NEWLINK request until `dataplane.apply` returned
with the new ifindex among the guarded pod interfaces (for bpf: tc filters attached, the
unknown-endpoint drop in force). Also reported: the cost of one full reconcile pass (scan +
resolve every endpoint, nothing to change) at that pod count.

Run: `.venv/bin/python -m bench.node_attach` (root; BENCH_QUICK=1 for fewer pods).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute

from agent.dataplane.base import Dataplane, EndpointCounters
from agent.dataplane.types import Endpoint, NodeState
from agent.lab import wiring
from agent.node.interfaces import InterfaceDiscovery
from agent.node.monitor import NetlinkMonitor
from agent.node.reconcile import Reconciler

QUICK = os.environ.get("BENCH_QUICK") == "1"
EXISTING = 20 if QUICK else 100
NEW = 10 if QUICK else 30
POD_NET = ipaddress.IPv4Network("10.78.0.0/16")


class TimedDataplane:
    """Passes through to the real dataplane, noting when each apply returned."""

    def __init__(self, inner: Dataplane) -> None:
        self.inner = inner
        self.name = inner.name
        self.applied: list[tuple[float, frozenset[int]]] = []
        self.apply_seconds: list[float] = []
        self.lock = threading.Lock()

    def start(self) -> None:
        self.inner.start()

    def apply(self, state: NodeState) -> None:
        started = time.monotonic()
        self.inner.apply(state)
        with self.lock:
            self.applied.append((time.monotonic(), state.pod_interfaces))
            self.apply_seconds.append(time.monotonic() - started)

    def counters(self) -> list[EndpointCounters]:
        return self.inner.counters()

    def close(self) -> None:
        self.inner.close()

    def teardown(self) -> None:
        self.inner.teardown()

    def guarded_at(self, ifindex: int, after: float) -> float | None:
        with self.lock:
            return next((t for t, guarded in self.applied if t >= after and ifindex in guarded), None)


def _dataplane(kind: str, pin_dir: str) -> Dataplane:
    if kind == "bpf":
        from agent.dataplane.bpf import BpfDataplane
        from agent.dataplane.bpf.settings import BpfSettings

        state_file = f"/run/podfence/{Path(pin_dir).name}.json"
        return BpfDataplane(BpfSettings(pin_dir=pin_dir, state_file=state_file))
    raise ValueError(kind)


def measure_inside(kind: str, pods_ns: str, pin_dir: str) -> dict[str, Any]:
    """Runs inside the node netns (as the agent does), pods' ends of the veths in `pods_ns`."""
    stop = threading.Event()
    threads: list[threading.Thread] = []
    dataplane: TimedDataplane | None = None
    discovery: InterfaceDiscovery | None = None
    reconciler: Reconciler | None = None
    ipr = IPRoute()
    try:
        uplink = wiring.add_veth(None, "up0", pods_ns, "up0")
        ipr.addr("add", index=uplink, address="192.168.78.2", prefixlen=24)
        ipr.route("add", dst="0.0.0.0/0", gateway="192.168.78.1")
        endpoints = {}
        for index in range(EXISTING):
            host, ip = f"ex{index}", POD_NET.network_address + 10 + index
            host_index = wiring.add_veth(None, host, pods_ns, f"p{index}")
            ipr.route("add", dst=f"{ip}/32", oif=host_index)
            endpoints[f"bench/pod-{index}"] = Endpoint(f"bench/pod-{index}", (ip,))
        dataplane = TimedDataplane(_dataplane(kind, pin_dir))
        dataplane.start()
        discovery = InterfaceDiscovery()
        reconciler = Reconciler(dataplane, discovery)
        reconciler.apply(NodeState(version=1, endpoints=endpoints))
        located = reconciler.status().resolved_endpoints

        # One reconcile pass with nothing to change (what every netlink notification costs).
        passes = []
        for _ in range(10):
            started = time.perf_counter()
            reconciler.reconcile_once()
            passes.append(time.perf_counter() - started)

        monitor = NetlinkMonitor(reconciler.interfaces_changed)
        threads = [
            threading.Thread(target=monitor.run, args=(stop,), daemon=True),
            threading.Thread(target=reconciler.run, args=(stop,), daemon=True),
        ]
        for thread in threads:
            thread.start()
        monitor.subscribed.wait(5)
        time.sleep(0.2)
        latencies = []
        applies_before = len(dataplane.apply_seconds)
        for index in range(NEW):
            started = time.monotonic()
            ipr.link(
                "add", ifname=f"new{index}", kind="veth", peer={"ifname": f"n{index}", "net_ns_fd": pods_ns}
            )
            new_index = ipr.link_lookup(ifname=f"new{index}")[0]
            deadline = started + 5
            while (guarded := dataplane.guarded_at(new_index, started)) is None:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"new{index} was not guarded within 5 s")
                time.sleep(0.0005)
            latencies.append(guarded - started)
            time.sleep(0.05)  # one pod at a time, as a kubelet starts them
        latencies.sort()
        return {
            "existing_pods": EXISTING,
            "existing_located": located,
            "new_interfaces": NEW,
            "guarded_ms_p50": round(statistics.median(latencies) * 1000, 2),
            "guarded_ms_p90": round(latencies[int(len(latencies) * 0.9) - 1] * 1000, 2),
            "guarded_ms_max": round(latencies[-1] * 1000, 2),
            "dataplane_apply_ms_p50": round(
                statistics.median(dataplane.apply_seconds[applies_before:]) * 1000, 2
            ),
            "noop_reconcile_ms_p50": round(statistics.median(passes) * 1000, 2),
        }
    finally:
        stop.set()
        if reconciler is not None:
            reconciler.interfaces_changed()  # wake its loop so it sees `stop`
        for thread in threads:
            thread.join(timeout=5)
        if discovery is not None:
            discovery.close()
        if dataplane is not None:
            with contextlib.suppress(Exception):
                dataplane.teardown()
        ipr.close()


def measure(kind: str) -> dict[str, Any]:
    prefix = f"pfn-bench-{uuid.uuid4().hex[:4]}"
    node, pods_ns = f"{prefix}-node", f"{prefix}-pods"
    pin_dir = f"/sys/fs/bpf/{prefix}"
    try:
        for name in (node, pods_ns):
            wiring.create(name, loopback_up=False)
        result = subprocess.run(
            wiring.argv_in(
                node, [sys.executable, "-m", "bench.node_attach", "--inside", kind, pods_ns, pin_dir]
            ),
            capture_output=True,
            text=True,
            check=False,
            cwd=Path(__file__).resolve().parents[1],
        )
        if result.returncode != 0:
            raise RuntimeError(result.stderr[-2000:])
        figures: dict[str, Any] = json.loads(result.stdout)
        return figures
    finally:
        for name in (node, pods_ns):
            wiring.remove(name)
        shutil.rmtree(pin_dir, ignore_errors=True)
        Path(f"/run/podfence/{prefix}.json").unlink(missing_ok=True)


def run() -> dict[str, Any]:
    try:
        return {"bpf": measure("bpf")}
    except Exception as exc:
        return {"bpf": {"error": repr(exc)}}


if __name__ == "__main__":
    if sys.argv[1:2] == ["--inside"]:
        print(json.dumps(measure_inside(*sys.argv[2:5])))
    else:
        print(json.dumps(run(), indent=2))
