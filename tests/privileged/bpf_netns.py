"""A simulated node for the BPF dataplane tests: network namespaces, veths, real traffic.

A "node" netns (netns_node.py) holds the host side of every pod veth (routed /32 and /128 per
pod, proxy ARP, a link-local gateway for IPv6, as routed CNIs do), the node address on lo and a
fake ClusterIP DNAT in nat PREROUTING. Every namespace starts with "pfb-", every pin directory with
/sys/fs/bpf/pfb-; the root namespace's networking is never touched.
"""

from __future__ import annotations

import ipaddress
import secrets
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyroute2.netns import setns

from agent.dataplane.bpf import state_file
from agent.dataplane.bpf.settings import BpfSettings
from tests.privileged import bpf_traffic_tool as traffic
from tests.privileged.netns_node import NetnsNode, in_netns, sh

TOOL = Path(__file__).with_name("bpf_traffic_tool.py")
PYTHON = sys.executable
NODE_IP = "10.98.0.1"
NODE_IP6 = "fd00:98::1"
CLUSTER_IP = "10.97.0.10"
CLUSTER_PORT = 80


@dataclass
class Pod:
    index: int
    netns: str
    host_if: str
    ip: str
    ip6: str
    ifindex: int = 0

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return sh(*in_netns(self.netns, *argv), check=check)

    # The probes are the tool's own (bpf_traffic_tool.py), run by a thread of this process that
    # enters the pod's netns: no Python process started per probe.
    def tcp(self, host: str, port: int) -> bool:
        return _from_netns(self.netns, lambda: traffic.tcp_once(host, port)) == 0

    def udp(self, host: str, port: int) -> bool:
        return _from_netns(self.netns, lambda: traffic.udp_once(host, port)) == 0

    def ping(self, host: str) -> bool:
        # an ident of its own: every probe of this process shares its pid
        return _from_netns(self.netns, lambda: traffic.ping_once(host, secrets.randbelow(0x10000))) == 0


def _from_netns(netns: str, probe: Callable[[], int]) -> int:
    """`probe()` in a helper thread that enters `netns` (the calling thread stays where it is)."""

    def entered() -> int:
        setns(netns, flags=0)  # flags=0: never creates the namespace
        return probe()

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="probe") as pool:
        return pool.submit(entered).result()


@dataclass
class Node(NetnsNode):
    prefix: str = field(default_factory=lambda: f"pfb-{secrets.token_hex(3)}")
    pods: list[Pod] = field(default_factory=list)

    @property
    def state_file(self) -> str:
        return f"/run/podfence-tests/{self.prefix}.json"

    def settings(self, **overrides: Any) -> BpfSettings:
        """The bpf dataplane's settings for this node: its pins, namespace and state file."""
        return BpfSettings(pin_dir=self.pin_dir, netns=self.netns, state_file=self.state_file, **overrides)

    def create(self, pod_count: int, service_backend: int = 2, service_port: int = 8080) -> Node:
        self.create_node((f"{NODE_IP}/32", f"{NODE_IP6}/128"), "10.97.0.0/16")
        for index in range(1, pod_count + 1):
            self.add_pod(index)
        backend = self.pods[service_backend - 1]
        self.run(
            "iptables", "-t", "nat", "-A", "PREROUTING", "-d", CLUSTER_IP, "-p", "tcp",
            "--dport", str(CLUSTER_PORT), "-j", "DNAT", "--to-destination", f"{backend.ip}:{service_port}",
        )  # fmt: skip
        return self

    def add_pod(self, index: int) -> Pod:
        pod = Pod(
            index, f"{self.prefix}-p{index}", f"pfbv{index}", f"10.2.0.{index + 1}", f"fd00:2::{index + 1}"
        )
        self.add_routed(pod, pod.ip6)
        self.pods.append(pod)
        return pod

    def serve(self, pod: Pod, *ports: int) -> None:
        self.start(pod.netns, PYTHON, str(TOOL), "serve", *map(str, ports), ready=True)

    def destroy(self) -> None:
        super().destroy()
        state_file.remove(Path(self.state_file))


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)
