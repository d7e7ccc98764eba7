"""Cold programming of the iptables dataplane: 100 pod interfaces, 2,000 allow rules (target < 5 s).

A throw-away node netns ("pfi-bench-*") holds 100 veth pairs; the host ends are the pod
interfaces. Each pod gets 10 ingress and 10 egress allows (identity peers, CIDR peers with and
without excepts, single ports and ranges, TCP/UDP/SCTP/any), so 2,000 rules in all, spread over
50 shared identities. Measured, in one run: start() + apply() on an empty table (cold), the same
state re-applied (no-op), one endpoint's policy changed (incremental), teardown(), and as the
baseline that batching avoids, 200 of the same rules added one `iptables -A` at a time; then
the same cold start with flow records on (`flow_records`: log chains per distinct rule).

    python -m bench.iptables_cold        (root; prints one JSON object)
"""

from __future__ import annotations

import ipaddress
import json
import multiprocessing
import secrets
import shlex
import subprocess
import sys
import time
from multiprocessing.connection import Connection
from typing import Any

from agent.lab import wiring

PODS = 100
ALLOWS_PER_DIRECTION = 10
IDENTITIES = 50
TARGET_SECONDS = 5.0


def _node_state(ifindexes: dict[int, int], version: int = 1, changed_pod: int | None = None) -> Any:
    from agent.dataplane.types import (
        Allow,
        CidrPeer,
        DirectionPolicy,
        Endpoint,
        IdentityPeer,
        NodeState,
    )

    def allows(pod: int, direction: int) -> tuple[Allow, ...]:
        result = []
        for n in range(ALLOWS_PER_DIRECTION):
            seed = pod * 31 + n * 7 + direction
            protocol = (6, 17, 132, 0)[seed % 4]
            first = 1000 + seed % 5000
            last = first if n % 2 else first + 10
            if n % 3 == 0:
                peer: CidrPeer | IdentityPeer = CidrPeer(ipaddress.ip_network(f"10.{100 + seed % 50}.0.0/16"))
            elif n % 3 == 1:
                network = ipaddress.ip_network(f"172.{16 + seed % 8}.0.0/16")
                peer = CidrPeer(network, (ipaddress.ip_network(f"172.{16 + seed % 8}.{seed % 200}.0/24"),))
            else:
                peer = IdentityPeer(seed % IDENTITIES)
            if pod == changed_pod:
                first, last = 2, 2
            # five NetworkPolicies per pod, two rules each: the rule_refs flow records log by
            policy = f"bench/np{pod % 20 * 5 + n % 5}"
            ports = (first, last) if protocol else (0, 65535)
            result.append(Allow(peer, protocol, *ports, policy))
        return tuple(result)

    def pod_ip(pod: int) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        return ipaddress.IPv4Address(f"10.1.{pod // 250}.{pod % 250 + 1}")

    endpoints = {
        f"bench/pod{pod}": Endpoint(
            f"bench/pod{pod}",
            (pod_ip(pod),),
            DirectionPolicy(True, allows(pod, 0)),
            DirectionPolicy(True, allows(pod, 1)),
            ifindexes[pod],
        )
        for pod in range(PODS)
    }
    identities = {i: tuple(pod_ip(p) for p in range(PODS) if p % IDENTITIES == i) for i in range(IDENTITIES)}
    return NodeState(
        version=version,
        endpoints=endpoints,
        identities=identities,
        node_ips=(ipaddress.IPv4Address("10.99.0.1"),),
        pod_interfaces=frozenset(ifindexes.values()),
    )


def _one_by_one_seconds_per_rule(saved: str, sample: int = 200) -> float:
    """Time `iptables-legacy -A` for `sample` of the programmed endpoint rules, copied one by one
    into a scratch chain while the table holds all the others (each call rewrites the table)."""
    rules = [line.split(" ", 2)[2] for line in saved.splitlines() if line.startswith("-A PF-E")][:sample]
    subprocess.run(["iptables-legacy", "-w", "-N", "PF-BENCH"], check=True)
    started = time.perf_counter()
    for rule in rules:
        subprocess.run(["iptables-legacy", "-w", "-A", "PF-BENCH", *shlex.split(rule)], check=True)
    elapsed = time.perf_counter() - started
    subprocess.run(["iptables-legacy", "-w", "-F", "PF-BENCH"], check=True)
    subprocess.run(["iptables-legacy", "-w", "-X", "PF-BENCH"], check=True)
    return elapsed / len(rules)


def _measure(netns: str, conn: Connection) -> None:
    from pyroute2 import IPRoute
    from pyroute2 import netns as pyroute2_netns

    from agent.dataplane.iptables import IptablesDataplane
    from agent.dataplane.iptables.flowrecords import DEFAULT_NFLOG_GROUP

    try:
        pyroute2_netns.setns(netns)
        with IPRoute() as ipr:
            names = {link.get_attr("IFLA_IFNAME"): link["index"] for link in ipr.get_links()}
        ifindexes = {pod: names[f"pfb{pod}"] for pod in range(PODS)}
        state = _node_state(ifindexes)
        rules = sum(len(e.ingress.allows) + len(e.egress.allows) for e in state.endpoints.values())

        dataplane = IptablesDataplane()
        started = time.perf_counter()
        dataplane.start()
        dataplane.apply(state)
        cold = time.perf_counter() - started

        started = time.perf_counter()
        dataplane.apply(state)
        noop = time.perf_counter() - started

        started = time.perf_counter()
        dataplane.apply(_node_state(ifindexes, version=2, changed_pod=7))
        incremental = time.perf_counter() - started

        saved = subprocess.run(["iptables-legacy-save"], capture_output=True, text=True, check=True).stdout
        kernel_rules = saved.count("\n-A PF-")
        one_by_one = _one_by_one_seconds_per_rule(saved)

        started = time.perf_counter()
        dataplane.teardown()
        teardown = time.perf_counter() - started

        # The same state with flow records on: the deciding rules go through log chains
        flows = IptablesDataplane(flow_group=DEFAULT_NFLOG_GROUP)
        started = time.perf_counter()
        flows.start()
        flows.apply(state)
        flows_cold = time.perf_counter() - started
        flows_saved = subprocess.run(["iptables-legacy-save"], capture_output=True, text=True).stdout
        flows_rules = flows_saved.count("\n-A PF-")
        flows.teardown()
        conn.send(
            {
                "pods": PODS,
                "allow_rules": rules,
                "kernel_rules_ipv4": kernel_rules,
                "cold_seconds": round(cold, 3),
                "target_seconds": TARGET_SECONDS,
                "within_target": cold < TARGET_SECONDS,
                "noop_reapply_seconds": round(noop, 3),
                "one_endpoint_changed_seconds": round(incremental, 3),
                "teardown_seconds": round(teardown, 3),
                # The baseline batching avoids: one `iptables -A` per rule into the same table.
                "one_by_one_ms_per_rule": round(one_by_one * 1000, 2),
                "batch_ms_per_rule": round(cold / kernel_rules * 1000, 3),
                "batch_speedup": round(one_by_one / (cold / kernel_rules), 1),
                "flow_records": {
                    "kernel_rules_ipv4": flows_rules,
                    "log_chains_ipv4": flows_saved.count("\n:PF-L"),
                    "rules_ratio": round(flows_rules / kernel_rules, 3),
                    "cold_seconds": round(flows_cold, 3),
                    "cold_ratio": round(flows_cold / cold, 2),
                },
            }
        )
    except Exception as exc:
        conn.send({"error": repr(exc)})


def run() -> dict[str, Any]:
    netns = f"pfi-bench-{secrets.token_hex(3)}"
    wiring.create(netns, loopback_up=False)
    try:
        for pod in range(PODS):
            wiring.add_veth(netns, f"pfb{pod}", None, f"pfbp{pod}")
        context = multiprocessing.get_context("fork")
        parent, child = context.Pipe()
        worker = context.Process(target=_measure, args=(netns, child))
        worker.start()
        if not parent.poll(300):
            worker.kill()
            raise TimeoutError("benchmark worker did not report")
        result: dict[str, Any] = parent.recv()
        worker.join(30)
        if "error" in result:
            raise RuntimeError(result["error"])
        return result
    finally:
        wiring.remove(netns)


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
    sys.exit(0)
