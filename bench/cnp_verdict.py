"""Cost of one eBPF verdict vs the number of ClusterNetworkPolicy Admin rules (issue 23).

The pod's ingress holds N Admin-tier entries (ranks 1..N, actions Deny/Accept/Pass in turn,
each from its own identity and port) in front of 1,000 NetworkPolicy allows (each from its own
identity and port), as the resolver compiles 1,000 admin rules + 1,000 NetworkPolicies. Measured
on the real tc_to_pod program with BPF_PROG_TEST_RUN (kernel-timed mean over REPEAT runs, median
of ROUNDS), per packet: a first packet the LAST Admin rule denies (`admin_denied_ns`), a first
packet no tier admits (`policy_denied_ns`: Admin misses, NetworkPolicy isolates) and an
established one (`established_ns`: one allowed by a NetworkPolicy allow, then its flow). The claim:
flat from 10 to 1,000 Admin rules (ratio ~1, the issue asks >= 0.97 in rate terms) because
precedence is resolved at compile time (agent/dataplane/bpf/tiered.py). Also: apply() time.

Run: `.venv/bin/python -m bench cnp_verdict` (root). eBPF only (BPF_PROG_TEST_RUN); both
dataplanes on real traffic, iptables included: bench/cnp_datapath.py.
"""

from __future__ import annotations

import ipaddress
import json
import statistics
import time
from typing import Any

from agent.dataplane.bpf import loader
from agent.dataplane.bpf.dataplane import BpfDataplane
from agent.dataplane.bpf.testrun import run_program_timed
from agent.dataplane.types import (
    ACTION_ACCEPT,
    ACTION_DENY,
    ACTION_PASS,
    TIER_ADMIN,
    Allow,
    DirectionPolicy,
    Endpoint,
    IdentityPeer,
    IPAddress,
    NodeState,
    TieredAllow,
)
from bench.bpf_verdict import bench_plane
from tests.privileged import bpf_frames as frames

ADMIN_COUNTS = (10, 1000)
NETWORK_POLICY_ALLOWS = 1000
REPEAT = 200000
ROUNDS = 5
POD = "10.0.0.1"
ADMIN_BASE = 100_000  # identity ids of the admin peers; NetworkPolicy peers use 0..999
_ACTIONS = (ACTION_PASS, ACTION_ACCEPT, ACTION_DENY)  # the last entry (index N-1) must deny


def _np_peer(index: int) -> str:
    return str(ipaddress.IPv4Address("10.64.0.0") + index)


def _admin_peer(index: int) -> str:
    return str(ipaddress.IPv4Address("10.65.0.0") + index)


def _admin_port(index: int) -> int:
    return 20000 + index


def _state(admin: int, version: int) -> NodeState:
    tiered = tuple(
        TieredAllow(TIER_ADMIN, i + 1, _ACTIONS[(i - admin + 1) % 3], IdentityPeer(ADMIN_BASE + i), 6,
                    _admin_port(i), _admin_port(i))
        for i in range(admin)
    )  # fmt: skip
    allows = tuple(Allow(IdentityPeer(i), 6, 1000 + i, 1000 + i) for i in range(NETWORK_POLICY_ALLOWS))
    ingress = DirectionPolicy(True, allows, tiered)
    pod = Endpoint("bench/pod", (ipaddress.ip_address(POD),), ingress, ifindex=1)
    identities: dict[int, tuple[IPAddress, ...]] = {
        i: (ipaddress.ip_address(_np_peer(i)),) for i in range(NETWORK_POLICY_ALLOWS)
    }
    identities.update({ADMIN_BASE + i: (ipaddress.ip_address(_admin_peer(i)),) for i in range(admin)})
    return NodeState(version, {pod.key: pod}, identities, (), frozenset({1}))


def _measure(plane: BpfDataplane, admin: int, version: int) -> dict[str, float]:
    started = time.perf_counter()
    plane.apply(_state(admin, version))
    apply_seconds = time.perf_counter() - started
    last = admin - 1
    fd = plane._programs[loader.PROGRAM_TO_POD].fd
    probes = {
        "admin_denied_ns": (frames.tcp4(_admin_peer(last), POD, dport=_admin_port(last)), 2),
        "policy_denied_ns": (frames.tcp4(_np_peer(7), POD, dport=1000 + 8), 2),
        # run 1 admits (a NetworkPolicy allow under no Admin hit), the others are established
        "established_ns": (frames.tcp4(_np_peer(NETWORK_POLICY_ALLOWS - 1), POD, dport=1999), 0),
    }
    results: dict[str, list[float]] = {name: [] for name in probes}
    for _ in range(ROUNDS):
        for name, (frame, expected) in probes.items():
            verdict, ns = run_program_timed(fd, frame, REPEAT)
            assert verdict == expected, f"{name}: verdict {verdict}, expected {expected}"
            results[name].append(ns)
    figures = {name: statistics.median(values) for name, values in results.items()}
    figures["apply_s"] = round(apply_seconds, 3)
    return figures


def run() -> dict[str, Any]:
    with bench_plane() as plane:
        figures = {count: _measure(plane, count, version) for version, count in enumerate(ADMIN_COUNTS, 1)}
    low, high = figures[ADMIN_COUNTS[0]], figures[ADMIN_COUNTS[-1]]
    return {
        "per_admin_rule_count": {str(k): v for k, v in figures.items()},
        # time per packet at 1,000 vs 10 Admin rules; the rate ratio is its inverse
        "ratio_1000_vs_10": {name: round(high[name] / low[name], 3) for name in low if name.endswith("_ns")},
        "network_policy_allows": NETWORK_POLICY_ALLOWS,
        "repeat": REPEAT,
        "rounds": ROUNDS,
    }


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
