"""Cold start: agent start until all 100 endpoints of a node are enforced, compile vs programming.

Two views, on one `pfbench-` node with 100 routed pods (bench/_cluster.py):

* in process: `BpfDataplane.start()` (BCC compile, load, pin, adopt: the compile part) and then
  `apply()` of a 100-endpoint NodeState (map writes and 100 tc attaches: the programming part),
  REPETITIONS times from an empty kernel (teardown in between).
* whole agent: a real `podfence agent` process started against a running `podfence control`
  whose folder holds the 100 pods and 10 ring policies; time from spawn until the agent's
  metrics show the control service's version applied and 100 endpoints located, plus the agent's
  own programming histogram (podfence_policy_programming_seconds). Cold (no pins) and warm (a
  restart that adopts the pinned state). The iptables dataplane's process figures are beside.

Target: programming (after compile) < 2 s for 100 endpoints.

Run: `.venv/bin/python -m bench.coldstart` (root). `BENCH_QUICK=1`: one repetition.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from agent.dataplane.netns import inside
from agent.dataplane.types import (
    Allow,
    CidrPeer,
    DirectionPolicy,
    Endpoint,
    IdentityPeer,
    IPAddress,
    NodeState,
)
from bench import _cluster
from bench._netlab import Topology

QUICK = os.environ.get("BENCH_QUICK") == "1"
PODS = 100
REPETITIONS = 1 if QUICK else 3
PROCESS_DATAPLANES = tuple(os.environ.get("BENCH_DATAPLANES", "bpf,iptables").split(","))
TARGET_PROGRAMMING_S = 2.0
TCP = 6


def node_state(topology: Topology) -> NodeState:
    """The ring of _cluster in dataplane terms: app k admits app k+1 on TCP 8080, plus a CIDR allow
    (a monitoring range) on every endpoint, so both peer kinds are programmed."""
    pods = list(topology.pods.values())
    identities: dict[int, tuple[IPAddress, ...]] = {
        app + 1: tuple(ipaddress.IPv4Address(p.ip) for i, p in enumerate(pods) if i % _cluster.APPS == app)
        for app in range(_cluster.APPS)
    }
    monitoring = CidrPeer(ipaddress.IPv4Network("10.90.0.0/16"), (ipaddress.IPv4Network("10.90.1.0/24"),))
    endpoints = {}
    for index, pod in enumerate(pods):
        app = index % _cluster.APPS
        admitted = IdentityPeer((app + 1) % _cluster.APPS + 1)
        ingress = DirectionPolicy(
            isolated=True,
            allows=(
                Allow(admitted, TCP, _cluster.SERVE_PORT, _cluster.SERVE_PORT, f"bench/ring-{app}"),
                Allow(monitoring, TCP, 9100, 9100, "bench/monitoring"),
            ),
        )
        key = f"{_cluster.NAMESPACE}/{pod.name}"
        endpoints[key] = Endpoint(key, (ipaddress.IPv4Address(pod.ip),), ingress, ifindex=pod.host_ifindex)
    node = topology.nodes[_cluster.NODE]
    return NodeState(
        version=1,
        endpoints=endpoints,
        identities=identities,
        node_ips=(ipaddress.IPv4Address(node.link_ip),),
        pod_interfaces=frozenset(p.host_ifindex for p in pods),
    )


def one_endpoint_changed(state: NodeState) -> NodeState:
    """`state` with the first endpoint admitting one more identity: a typical single policy edit."""
    key = next(iter(state.endpoints))
    endpoint = state.endpoints[key]
    extra = Allow(IdentityPeer(1), TCP, 9090, 9090, "bench/edit")
    ingress = DirectionPolicy(isolated=True, allows=(*endpoint.ingress.allows, extra))
    endpoints = {**state.endpoints, key: dataclasses.replace(endpoint, ingress=ingress)}
    return dataclasses.replace(state, version=state.version + 1, endpoints=endpoints)


def in_process(topology: Topology) -> dict[str, Any]:
    from agent.dataplane.bpf.dataplane import BpfDataplane
    from agent.dataplane.bpf.settings import BpfSettings

    node = topology.nodes[_cluster.NODE]
    state = node_state(topology)
    changed = one_endpoint_changed(state)
    start_s, apply_s, reapply_s, change_s = [], [], [], []
    with inside(node.netns):
        for _ in range(REPETITIONS):
            plane = BpfDataplane(BpfSettings(pin_dir=node.pin_dir))
            try:
                t0 = time.perf_counter()
                plane.start()
                t1 = time.perf_counter()
                plane.apply(state)
                t2 = time.perf_counter()
                plane.apply(state)  # unchanged state: what a periodic resync costs
                t3 = time.perf_counter()
                plane.apply(changed)  # one endpoint's allows changed: what a policy edit costs
                t4 = time.perf_counter()
            finally:
                plane.teardown()
            start_s.append(t1 - t0)
            apply_s.append(t2 - t1)
            reapply_s.append(t3 - t2)
            change_s.append(t4 - t3)
    programming = statistics.median(apply_s)
    return {
        "endpoints": len(state.endpoints),
        "compile_and_load_s": round(statistics.median(start_s), 3),
        "programming_s": round(programming, 3),
        "reapply_unchanged_s": round(statistics.median(reapply_s), 3),
        "apply_one_endpoint_changed_s": round(statistics.median(change_s), 3),
        "samples": {"start": start_s, "apply": apply_s},
        "target_programming_s": TARGET_PROGRAMMING_S,
        "meets_target": programming < TARGET_PROGRAMMING_S,
    }


def interface_scan(topology: Topology) -> dict[str, Any]:
    """One netlink scan of the node's interfaces, as the agent makes before every apply (it finds
    each pod's host interface from it): a fixed cost of every policy change, beside apply()."""
    from agent.node.interfaces import InterfaceDiscovery

    seconds = []
    with inside(topology.nodes[_cluster.NODE].netns):
        discovery = InterfaceDiscovery()
        for _ in range(5):
            started = time.perf_counter()
            view = discovery.scan()
            seconds.append(time.perf_counter() - started)
    return {"pod_interfaces": len(view.pod_interfaces), "scan_s": round(statistics.median(seconds), 3)}


def remove_kernel_state(dataplane: str, topology: Topology) -> None:
    """What a stopped agent left in the node: removed so the next start is cold."""
    node = topology.nodes[_cluster.NODE]
    with inside(node.netns):
        if dataplane == "bpf":
            from agent.dataplane.bpf.dataplane import BpfDataplane
            from agent.dataplane.bpf.settings import BpfSettings

            BpfDataplane(BpfSettings(pin_dir=node.pin_dir)).teardown()
        else:
            from agent.dataplane.iptables import IptablesDataplane

            IptablesDataplane().teardown()


def agent_start(processes: _cluster.Processes) -> dict[str, float]:
    """Spawn the agent; seconds until caught up, and its own programming-time histogram."""
    t0 = time.monotonic()
    processes.start_agent()
    t1 = processes.wait(lambda: processes.caught_up(PODS), "agent caught up", 180)
    metrics = processes.agent_metrics()
    processes.stop_agent()
    return {
        "to_enforced_s": t1 - t0,
        "programming_sum_s": metrics.get("podfence_policy_programming_seconds_sum", float("nan")),
        "programming_count": metrics.get("podfence_policy_programming_seconds_count", float("nan")),
    }


def whole_agent(dataplane: str, topology: Topology, workdir: Path) -> dict[str, Any]:
    folder = workdir / f"source-{dataplane}"
    folder.mkdir()
    _cluster.write_base_folder(folder, topology, {})
    processes = _cluster.Processes(topology, folder, workdir, dataplane)
    cold: list[dict[str, float]] = []
    warm: list[dict[str, float]] = []
    try:
        processes.start_control()
        for _ in range(REPETITIONS):
            remove_kernel_state(dataplane, topology)
            cold.append(agent_start(processes))
            warm.append(agent_start(processes))  # the pins/chains of the cold start are still there
    finally:
        processes.stop()
        remove_kernel_state(dataplane, topology)

    def medians(samples: list[dict[str, float]]) -> dict[str, float]:
        return {key: round(statistics.median(s[key] for s in samples), 3) for key in samples[0]}

    return {"cold": medians(cold), "warm_restart": medians(warm)}


def run() -> dict[str, Any]:
    results: dict[str, Any] = {
        "load_average": [round(x, 2) for x in os.getloadavg()],  # the neighbours' load, for context
        "pods": PODS,
        "repetitions": REPETITIONS,
    }
    with _cluster.node_with_pods("c0", PODS) as topology, tempfile.TemporaryDirectory() as tmp:
        try:
            results["bpf_in_process"] = in_process(topology)
        except Exception as exc:  # reported beside the other figures
            results["bpf_in_process"] = {"error": repr(exc)}
        try:
            results["agent_interface_scan"] = interface_scan(topology)
        except Exception as exc:
            results["agent_interface_scan"] = {"error": repr(exc)}
        for dataplane in PROCESS_DATAPLANES:
            try:
                results[f"{dataplane}_agent_process"] = whole_agent(dataplane, topology, Path(tmp))
            except Exception as exc:
                results[f"{dataplane}_agent_process"] = {"error": repr(exc)}
    return results


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
