"""The simulated node under the dataplane tests (bpf_netns.py, iptables_netns.py, the adversarial
lab): one node netns holding the host side of every pod veth, pods in netns of their own, built
with agent/lab/wiring.py. The node address lives on lo (no dummy driver in every kernel), next to
the routed pods' gateway: the host veths answer ARP for it by proxy, as Calico's do. The root
namespace's networking is never touched.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from agent.lab import wiring


class NodePod(Protocol):
    netns: str
    host_if: str
    ip: str
    ifindex: int


def sh(*argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=timeout)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")
    return done


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0, interval: float = 0.05) -> bool:
    """Poll until `predicate` holds (True) or `timeout` passes (its last answer)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def in_netns(netns: str, *argv: str) -> list[str]:
    return wiring.argv_in(netns, argv)


@dataclass
class NetnsNode:
    """`prefix`-node and `prefix`-<pod> namespaces; `destroy` removes them and the pins."""

    prefix: str
    processes: list[subprocess.Popen[str]] = field(default_factory=list)
    namespaces: list[str] = field(default_factory=list)

    @property
    def netns(self) -> str:
        return f"{self.prefix}-node"

    @property
    def pin_dir(self) -> str:
        return f"/sys/fs/bpf/{self.prefix}"

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return sh(*in_netns(self.netns, *argv), check=check)

    def create_node(
        self, addresses: tuple[str, ...], service_net: str, sysctls: Mapping[str, int] | None = None
    ) -> None:
        """The node netns, forwarding, `addresses` ("ip/len") on lo and a route for the Service
        range, so that proxy ARP answers for ClusterIPs (DNAT rewrites them first)."""
        self._create(self.netns)
        settings = {"net.ipv4.ip_forward": 1, "net.ipv6.conf.all.forwarding": 1}
        wiring.sysctl(self.netns, {**settings, **(sysctls or {})})
        with wiring.ipr(self.netns) as ipr:
            lo = wiring.index(ipr, "lo")
            for address in (*addresses, f"{wiring.GATEWAY}/32"):
                wiring.add_address(ipr, lo, address)
            ipr.route("add", dst=service_net, oif=lo, scope=wiring.SCOPE_LINK)

    def create_bridge_node(self, bridge: str, addresses: tuple[str, ...]) -> None:
        """A node netns whose pods will be ports of `bridge`, which holds their gateway `addresses`."""
        self._create(self.netns)
        wiring.sysctl(self.netns, {"net.ipv4.ip_forward": 1})
        wiring.add_bridge(self.netns, bridge, *addresses)

    def _create(self, netns: str) -> None:
        wiring.create(netns)
        self.namespaces.append(netns)

    def add_routed(self, pod: NodePod, ip6: str | None, *, no_dad: bool = False) -> None:
        self._create(pod.netns)
        if no_dad:
            wiring.sysctl(pod.netns, {"net.ipv6.conf.default.accept_dad": 0})
        pod.ifindex = wiring.wire_routed(self.netns, pod.netns, pod.host_if, pod.ip, ip6, proxy_arp=True)

    def add_bridged(
        self,
        pod: NodePod,
        bridge: str,
        prefixlen: int,
        gateway: str | None,
        *,
        address6: str | None = None,
        no_dad: bool = False,
    ) -> None:
        self._create(pod.netns)
        if no_dad:
            wiring.sysctl(pod.netns, {"net.ipv6.conf.default.accept_dad": 0})
        address = f"{pod.ip}/{prefixlen}"
        pod.ifindex = wiring.wire_bridged(
            self.netns, pod.netns, pod.host_if, bridge, address, address6, gateway=gateway
        )

    def start(self, netns: str, *argv: str, ready: bool = False) -> subprocess.Popen[str]:
        """`argv` running in `netns` until destroy(); with `ready`, once it printed "ready"."""
        process = subprocess.Popen(
            in_netns(netns, *argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.processes.append(process)
        if ready:
            assert process.stdout is not None
            assert process.stdout.readline().strip() == "ready"
        return process

    def destroy(self) -> None:
        for process in self.processes:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            with contextlib.suppress(Exception):
                process.wait(timeout=5)
        for netns in reversed(self.namespaces):
            wiring.remove(netns)
        shutil.rmtree(self.pin_dir, ignore_errors=True)
