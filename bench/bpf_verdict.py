"""Cost of one eBPF verdict vs the number of rules: BPF_PROG_TEST_RUN on the real programs.

The pod's ingress policy holds N allows, each from its own identity (own address) and port, or
(`host_cidr`) each from its own ipBlock /32 on one port (issue 27: host prefixes are looked up in
pf_cidr_host, a hash, not walked in the CIDR trie); the measured packets come from the LAST
rule's peer. Measured per packet (kernel-timed mean over
REPEAT runs, median of ROUNDS): a denied first packet (the full lookup chain: conntrack misses,
node address, ipcache, CIDR LPM, policy LPM), an allowed first packet and an established one.
The claim to check: cost independent of N (ratio 10,000 rules / 10 rules close to 1). Also
reported: how long apply() took to move from the previous rule count to N (compile + map writes).

Run: `.venv/bin/python -m bench.bpf_verdict` (root).
"""

from __future__ import annotations

import ipaddress
import json
import secrets
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from agent.dataplane.bpf import loader
from agent.dataplane.bpf.dataplane import BpfDataplane
from agent.dataplane.bpf.settings import BpfSettings
from agent.dataplane.bpf.testrun import run_program_timed
from agent.dataplane.types import (
    Allow,
    CidrPeer,
    DirectionPolicy,
    Endpoint,
    IdentityPeer,
    IPAddress,
    NodeState,
)
from agent.lab import wiring
from tests.privileged import bpf_frames as frames

RULE_COUNTS = (10, 1000, 10000)
REPEAT = 200000
ROUNDS = 5
POD = "10.0.0.1"


def _peer(index: int) -> str:
    return str(ipaddress.IPv4Address("10.64.0.0") + index)


def _port(kind: str, index: int) -> int:
    return 8080 if kind == "host_cidr" else 1000 + index % 50000


def _state(rules: int, kind: str = "identity") -> NodeState:
    if kind == "host_cidr":
        allows = tuple(
            Allow(CidrPeer(ipaddress.ip_network(f"{_peer(i)}/32")), 6, 8080, 8080) for i in range(rules)
        )
        pod = Endpoint("bench/pod", (ipaddress.ip_address(POD),), DirectionPolicy(True, allows), ifindex=1)
        return NodeState(1, {pod.key: pod}, {}, (), frozenset({1}))
    allows = tuple(Allow(IdentityPeer(i), 6, 1000 + i % 50000, 1000 + i % 50000) for i in range(rules))
    pod = Endpoint("bench/pod", (ipaddress.ip_address(POD),), DirectionPolicy(True, allows), ifindex=1)
    identities: dict[int, tuple[IPAddress, ...]] = {
        i: (ipaddress.ip_address(_peer(i)),) for i in range(rules)
    }
    return NodeState(1, {pod.key: pod}, identities, (), frozenset({1}))


def _measure(plane: BpfDataplane, rules: int, kind: str = "identity") -> dict[str, float]:
    started = time.perf_counter()
    plane.apply(_state(rules, kind))
    apply_seconds = time.perf_counter() - started
    last = rules - 1
    fd = plane._programs[loader.PROGRAM_TO_POD].fd
    denied = frames.tcp4(_peer(last), POD, dport=_port(kind, last) + 1)
    allowed_first = frames.tcp4(_peer(last), POD, dport=_port(kind, last))
    results: dict[str, list[float]] = {"denied_ns": [], "established_ns": []}
    for _ in range(ROUNDS):
        verdict, ns = run_program_timed(fd, denied, REPEAT)
        assert verdict == 2, "the denied probe must be dropped"
        results["denied_ns"].append(ns)
        verdict, ns = run_program_timed(fd, allowed_first, REPEAT)  # run 1 admits, the rest are established
        assert verdict == 0, "the allowed probe must pass"
        results["established_ns"].append(ns)
    figures = {name: statistics.median(values) for name, values in results.items()}
    figures["apply_s"] = round(apply_seconds, 3)  # compile + write from the previous rule count
    return figures


@contextmanager
def bench_plane() -> Iterator[BpfDataplane]:
    """A started eBPF dataplane in a private netns with maps large enough for the rule counts,
    its programs there to be test-run; torn down after."""
    prefix = f"pfb-{secrets.token_hex(3)}"
    netns = f"{prefix}-bench"
    wiring.create(netns, loopback_up=False)
    plane = BpfDataplane(
        BpfSettings(
            pin_dir=f"/sys/fs/bpf/{prefix}",
            netns=netns,
            policy_max=262144,
            ipcache_max=65536,
            state_file=f"/run/podfence-bench/{prefix}.json",
        )
    )
    try:
        plane.start()
        yield plane
    finally:
        plane.teardown()
        wiring.remove(netns)


def run() -> dict[str, Any]:
    with bench_plane() as plane:
        figures = {rules: _measure(plane, rules) for rules in RULE_COUNTS}
        hosts = {rules: _measure(plane, rules, "host_cidr") for rules in RULE_COUNTS}

    def ratios(by_count: dict[int, dict[str, float]]) -> dict[str, float]:
        low, high = by_count[RULE_COUNTS[0]], by_count[RULE_COUNTS[-1]]
        return {name: round(high[name] / low[name], 3) for name in low if name.endswith("_ns")}

    return {
        "per_rule_count": {str(k): v for k, v in figures.items()},
        "ratio_10000_vs_10": ratios(figures),
        "host_cidr_per_peer_count": {str(k): v for k, v in hosts.items()},
        "host_cidr_ratio_10000_vs_10": ratios(hosts),
        "repeat": REPEAT,
        "rounds": ROUNDS,
    }


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
