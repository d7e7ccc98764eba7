"""A minimal node/pod topology of network namespaces that belongs to the benchmarks alone.

The lab in agent/lab names everything `pflab-` and keeps machine-wide state (root-netns routes,
/run/podfence-lab); the lab engineer's tests use it while benchmarks run, so the benchmarks build
their own smaller topology here instead: every name starts with `pfbench-`, nothing is added to
the root netns, and deleting the namespaces (plus the bpffs pins under /sys/fs/bpf/pfbench-*)
removes every trace.

Wiring is the routed (Calico/ptp) CNI style: each pod owns a /32 with a default route via the
link-local gateway that every host-side veth answers for; a node routes each local pod /32 to
its veth, and other nodes' pod /24s over a direct veth link between the two node namespaces.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from agent.lab import wiring

PREFIX = "pfbench-"
BPF_FS = Path("/sys/fs/bpf")
BPF_STATE_DIR = Path("/run/podfence")
NODE_LINK_NET = ipaddress.IPv4Network("10.78.0.0/24")
REPO_ROOT = Path(__file__).resolve().parents[1]


def pod_cidr(node_index: int) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network(f"10.77.{node_index}.0/24")


@dataclass(frozen=True)
class BenchPod:
    name: str
    node: str
    ip: str
    netns: str
    host_ifname: str
    host_ifindex: int


@dataclass(frozen=True)
class BenchNode:
    name: str
    index: int
    netns: str
    link_ip: str  # its address on the node-to-node link; also what it sources traffic from
    pin_dir: str


@dataclass
class Topology:
    """Nodes and pods under one name prefix (`pfbench-<tag>-`). `build` then `teardown`."""

    tag: str
    nodes: dict[str, BenchNode] = field(default_factory=dict)
    pods: dict[str, BenchPod] = field(default_factory=dict)

    @property
    def prefix(self) -> str:
        return f"{PREFIX}{self.tag}-"

    def build(self, node_count: int, pods: Sequence[tuple[str, int]]) -> None:
        """`pods`: (name, node index) pairs. Any failure tears down what was made."""
        try:
            for index in range(1, node_count + 1):
                self._add_node(index)
            if node_count == 2:
                self._link_nodes()
            for name, node_index in pods:
                self._add_pod(name, self.nodes[f"n{node_index}"])
        except BaseException:
            self.teardown()
            raise

    def _add_node(self, index: int) -> None:
        name = f"n{index}"
        node = BenchNode(
            name=name,
            index=index,
            netns=f"{self.prefix}{name}",
            link_ip=str(NODE_LINK_NET.network_address + index),
            pin_dir=str(BPF_FS / f"{self.prefix}{name}"),
        )
        wiring.create(node.netns)
        wiring.sysctl(
            node.netns,
            {
                "net.ipv4.ip_forward": 1,
                "net.ipv4.conf.all.rp_filter": 0,
                "net.ipv4.conf.default.rp_filter": 0,
            },
        )
        with wiring.ipr(node.netns) as ipr:
            # The node address lives on lo, so a node without a link to another node still has one.
            ipr.addr("add", index=wiring.index(ipr, "lo"), address=node.link_ip, prefixlen=32)
        self.nodes[name] = node

    def _link_nodes(self) -> None:
        first, second = self.nodes["n1"], self.nodes["n2"]
        wiring.add_veth(first.netns, "link0", second.netns, "link0")
        for node, other in ((first, second), (second, first)):
            with wiring.ipr(node.netns) as ipr:
                link = wiring.index(ipr, "link0")
                ipr.route("add", dst=f"{other.link_ip}/32", oif=link, scope=253)
                ipr.route("add", dst=str(pod_cidr(other.index)), gateway=other.link_ip, oif=link)

    def _add_pod(self, name: str, node: BenchNode) -> None:
        local = [p for p in self.pods.values() if p.node == node.name]
        ip = str(pod_cidr(node.index).network_address + 10 + len(local))
        pod_ns = f"{self.prefix}{node.name}-{name}"
        host_ifname = f"pfb{name}"[:15]
        wiring.create(pod_ns)
        host = wiring.wire_routed(node.netns, pod_ns, host_ifname, ip, src=node.link_ip)
        self.pods[name] = BenchPod(name, node.name, ip, pod_ns, host_ifname, host)

    def teardown(self) -> None:
        remove_all(self.prefix)


def remove_all(prefix: str = PREFIX) -> None:
    """Delete every namespace and bpffs pin directory whose name starts with `prefix`. Idempotent."""
    wiring.remove_prefixed(prefix)
    for pin_dir in BPF_FS.glob(prefix + "*"):
        shutil.rmtree(pin_dir, ignore_errors=True)
    for state_file in BPF_STATE_DIR.glob(prefix + "*"):  # BpfDataplane's id state beside the pins
        state_file.unlink(missing_ok=True)


in_netns_argv = wiring.argv_in


def run_in(netns_name: str, argv: Sequence[str], timeout: float = 60.0) -> str:
    return wiring.run_in(netns_name, argv, timeout=timeout).stdout


def python_argv(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def child_env() -> dict[str, str]:
    """Environment for child processes so they import this checkout's packages."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env
