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

import contextlib
import ipaddress
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pyroute2 import IPRoute, netns
from pyroute2.netlink.exceptions import NetlinkError

PREFIX = "pfbench-"
BPF_FS = Path("/sys/fs/bpf")
BPF_STATE_DIR = Path("/run/podfence")
GATEWAY = "169.254.1.1"
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
        netns.create(node.netns)
        run_in(
            node.netns,
            ["sysctl", "-q", "-w", "net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=0",
             "net.ipv4.conf.default.rp_filter=0"],
        )
        with IPRoute(netns=node.netns) as ipr:
            loopback = ipr.link_lookup(ifname="lo")[0]
            ipr.link("set", index=loopback, state="up")
            # The node address lives on lo, so a node without a link to another node still has one.
            ipr.addr("add", index=loopback, address=node.link_ip, prefixlen=32)
        self.nodes[name] = node

    def _link_nodes(self) -> None:
        first, second = self.nodes["n1"], self.nodes["n2"]
        with IPRoute(netns=first.netns) as ipr:
            ipr.link("add", ifname="link0", kind="veth", peer={"ifname": "link0", "net_ns_fd": second.netns})
        for node, other in ((first, second), (second, first)):
            with IPRoute(netns=node.netns) as ipr:
                link = ipr.link_lookup(ifname="link0")[0]
                ipr.link("set", index=link, state="up")
                ipr.route("add", dst=f"{other.link_ip}/32", oif=link, scope=253)
                ipr.route("add", dst=str(pod_cidr(other.index)), gateway=other.link_ip, oif=link)

    def _add_pod(self, name: str, node: BenchNode) -> None:
        local = [p for p in self.pods.values() if p.node == node.name]
        ip = str(pod_cidr(node.index).network_address + 10 + len(local))
        pod_ns = f"{self.prefix}{node.name}-{name}"
        host_ifname = f"pfb{name}"[:15]
        netns.create(pod_ns)
        with IPRoute(netns=node.netns) as ipr:
            ipr.link("add", ifname=host_ifname, kind="veth", peer={"ifname": "eth0", "net_ns_fd": pod_ns})
            host = ipr.link_lookup(ifname=host_ifname)[0]
            ipr.addr("add", index=host, address=GATEWAY, prefixlen=32, scope=253)
            ipr.link("set", index=host, state="up")
            ipr.route("add", dst=f"{ip}/32", oif=host, scope=253, prefsrc=node.link_ip)
        with IPRoute(netns=pod_ns) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            eth0 = ipr.link_lookup(ifname="eth0")[0]
            ipr.addr("add", index=eth0, address=ip, prefixlen=32)
            ipr.link("set", index=eth0, state="up")
            ipr.route("add", dst=f"{GATEWAY}/32", oif=eth0, scope=253)
            ipr.route("add", dst="0.0.0.0/0", gateway=GATEWAY, oif=eth0)
        self.pods[name] = BenchPod(name, node.name, ip, pod_ns, host_ifname, int(host))

    def teardown(self) -> None:
        remove_all(self.prefix)


def remove_all(prefix: str = PREFIX) -> None:
    """Delete every namespace and bpffs pin directory whose name starts with `prefix`. Idempotent."""
    for name in netns.listnetns():
        if name.startswith(prefix):
            with contextlib.suppress(OSError, NetlinkError):
                netns.remove(name)
    for pin_dir in BPF_FS.glob(prefix + "*"):
        shutil.rmtree(pin_dir, ignore_errors=True)
    for state_file in BPF_STATE_DIR.glob(prefix + "*"):  # BpfDataplane's id state beside the pins
        state_file.unlink(missing_ok=True)


def in_netns_argv(netns_name: str, argv: Sequence[str]) -> list[str]:
    return ["nsenter", f"--net=/run/netns/{netns_name}", "--", *argv]


def run_in(netns_name: str, argv: Sequence[str], timeout: float = 60.0) -> str:
    result = subprocess.run(
        in_netns_argv(netns_name, argv), capture_output=True, text=True, timeout=timeout, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} in {netns_name} failed: {result.stderr.strip()}")
    return result.stdout


def python_argv(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def child_env() -> dict[str, str]:
    """Environment for child processes so they import this checkout's packages."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env
