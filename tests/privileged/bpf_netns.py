"""A simulated node for the BPF dataplane tests: network namespaces, veths, real traffic.

A "node" netns holds the host side of every pod veth (routed /32 and /128 per pod, proxy ARP,
a link-local gateway for IPv6, as routed CNIs do), the node address on lo and a fake
ClusterIP DNAT in nat PREROUTING. Every namespace starts with "pfb-", every pin directory with
/sys/fs/bpf/pfb-; the root namespace's networking is never touched.
"""

from __future__ import annotations

import contextlib
import ipaddress
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.dataplane.bpf.settings import BpfSettings

TOOL = Path(__file__).with_name("bpf_traffic_tool.py")
PYTHON = sys.executable
NODE_IP = "10.98.0.1"
NODE_IP6 = "fd00:98::1"
CLUSTER_IP = "10.97.0.10"
CLUSTER_PORT = 80


def sh(*argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=timeout)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")
    return done


def in_netns(netns: str, *argv: str) -> list[str]:
    # nsenter (not `ip netns exec`): keeps the host's /sys, where bpffs is mounted
    return ["nsenter", f"--net=/var/run/netns/{netns}", *argv]


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

    def tcp(self, host: str, port: int) -> bool:
        return self.run(PYTHON, str(TOOL), "tcp", host, str(port), check=False).returncode == 0

    def udp(self, host: str, port: int) -> bool:
        return self.run(PYTHON, str(TOOL), "udp", host, str(port), check=False).returncode == 0

    def ping(self, host: str) -> bool:
        return self.run(PYTHON, str(TOOL), "ping", host, check=False).returncode == 0


@dataclass
class Node:
    prefix: str = field(default_factory=lambda: f"pfb-{secrets.token_hex(3)}")
    pods: list[Pod] = field(default_factory=list)
    processes: list[subprocess.Popen[str]] = field(default_factory=list)

    @property
    def netns(self) -> str:
        return f"{self.prefix}-node"

    @property
    def pin_dir(self) -> str:
        return f"/sys/fs/bpf/{self.prefix}"

    @property
    def state_file(self) -> str:
        return f"/run/podfence-tests/{self.prefix}.json"

    def settings(self, **overrides: Any) -> BpfSettings:
        """The bpf dataplane's settings for this node: its pins, namespace and state file."""
        return BpfSettings(pin_dir=self.pin_dir, netns=self.netns, state_file=self.state_file, **overrides)

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return sh(*in_netns(self.netns, *argv), check=check)

    def create(self, pod_count: int, service_backend: int = 2, service_port: int = 8080) -> Node:
        sh("ip", "netns", "add", self.netns)
        self.run("ip", "link", "set", "lo", "up")
        self.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
        self.run("sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
        self.run("ip", "addr", "add", f"{NODE_IP}/32", "dev", "lo")
        self.run("ip", "-6", "addr", "add", f"{NODE_IP6}/128", "dev", "lo")
        # every pod's IPv4 gateway: a local address answers ARP on any interface
        self.run("ip", "addr", "add", "169.254.1.1/32", "dev", "lo")
        # the service range needs a route so proxy ARP answers for the ClusterIP
        self.run("ip", "route", "add", "10.97.0.0/16", "dev", "lo")
        for index in range(1, pod_count + 1):
            self.add_pod(index)
        backend = self.pods[service_backend - 1]
        self.run(
            "iptables",
            "-t",
            "nat",
            "-A",
            "PREROUTING",
            "-d",
            CLUSTER_IP,
            "-p",
            "tcp",
            "--dport",
            str(CLUSTER_PORT),
            "-j",
            "DNAT",
            "--to-destination",
            f"{backend.ip}:{service_port}",
        )
        return self

    def add_pod(self, index: int) -> Pod:
        pod = Pod(
            index, f"{self.prefix}-p{index}", f"pfbv{index}", f"10.2.0.{index + 1}", f"fd00:2::{index + 1}"
        )
        sh("ip", "netns", "add", pod.netns)
        self.run("ip", "link", "add", pod.host_if, "type", "veth", "peer", "name", "eth0", "netns", pod.netns)
        self.run("sysctl", "-qw", f"net.ipv4.conf.{pod.host_if}.proxy_arp=1")
        self.run("sysctl", "-qw", f"net.ipv4.neigh.{pod.host_if}.proxy_delay=0")
        self.run("ip", "link", "set", pod.host_if, "up")
        self.run("ip", "-6", "addr", "add", "fe80::1/64", "dev", pod.host_if, "nodad")
        self.run("ip", "route", "add", f"{pod.ip}/32", "dev", pod.host_if)
        self.run("ip", "-6", "route", "add", f"{pod.ip6}/128", "dev", pod.host_if)
        pod.run("ip", "link", "set", "lo", "up")
        pod.run("ip", "addr", "add", f"{pod.ip}/32", "dev", "eth0")
        pod.run("ip", "-6", "addr", "add", f"{pod.ip6}/128", "dev", "eth0", "nodad")
        pod.run("ip", "link", "set", "eth0", "up")
        pod.run("ip", "route", "add", "169.254.1.1", "dev", "eth0")
        pod.run("ip", "route", "add", "default", "via", "169.254.1.1", "dev", "eth0")
        pod.run("ip", "-6", "route", "add", "default", "via", "fe80::1", "dev", "eth0")
        # /sys/class/net shows the caller's namespace; ask iproute2 inside the node netns instead
        link = self.run("ip", "-o", "link", "show", "dev", pod.host_if).stdout
        pod.ifindex = int(link.split(":", 1)[0])
        self.pods.append(pod)
        return pod

    def serve(self, pod: Pod, *ports: int) -> None:
        process = subprocess.Popen(
            in_netns(pod.netns, PYTHON, str(TOOL), "serve", *map(str, ports)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "ready"
        self.processes.append(process)

    def destroy(self) -> None:
        for process in self.processes:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            with contextlib.suppress(Exception):
                process.wait(timeout=5)
        for pod in self.pods:
            sh("ip", "netns", "del", pod.netns, check=False)
        sh("ip", "netns", "del", self.netns, check=False)
        sh("rm", "-rf", self.pin_dir, check=False)
        with contextlib.suppress(FileNotFoundError):
            Path(self.state_file).unlink()


def wait_until(predicate, timeout: float = 5.0, interval: float = 0.1) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)
