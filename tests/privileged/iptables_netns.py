"""A simulated node for the iptables dataplane tests: network namespaces, veths, real traffic.

One "node" netns (netns_node.py) with the node IP on its loopback, and "pod" netns attached by
veth pairs (host side in the node, /32 routes, proxy ARP, as routed CNIs such as Calico do), plus a
fake ClusterIP DNAT in the node's nat PREROUTING. The dataplane itself runs in a forked worker
that entered the node netns (python-iptables programs the netns of the calling process).
Every name starts with "pfi-" (namespaces) or "pfv" (interfaces inside them); nothing here
touches the root namespace's networking.
"""

from __future__ import annotations

import contextlib
import gc
import ipaddress
import multiprocessing
import os
import secrets
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from agent.lab import wiring
from tests.privileged.netns_node import NetnsNode, in_netns, sh, wait_until

TRAFFIC = Path(__file__).with_name("iptables_traffic.py")
PYTHON = sys.executable
NODE_IP = "10.99.0.1"
NODE_IP6 = "fd99::1"
BRIDGE = "pfvbr"
BRIDGE_GATEWAY = "10.2.0.254"
CLUSTER_IP = "10.96.0.10"


@dataclass
class Pod:
    netns: str
    host_if: str
    ip: str
    ifindex: int = 0
    ip6: str | None = None


@dataclass
class Node(NetnsNode):
    prefix: str = field(default_factory=lambda: f"pfi-{secrets.token_hex(3)}")
    pods: list[Pod] = field(default_factory=list)

    def create(self, pod_count: int) -> Node:
        sysctls = {"net.ipv6.conf.default.accept_dad": 0}
        self.create_node((f"{NODE_IP6}/128", f"{NODE_IP}/32"), "10.96.0.0/12", sysctls)
        for index in range(1, pod_count + 1):
            self.add_pod(index)
        return self

    def add_pod(self, index: int) -> Pod:
        """A routed pod (ptp/Calico style): 10.1.0.<index>/32 and fd00::<index>/128."""
        pod = Pod(f"{self.prefix}-p{index}", f"pfv{index}", f"10.1.0.{index}", ip6=f"fd00::{index}")
        self.add_routed(pod, pod.ip6, no_dad=True)
        self.pods.append(pod)
        return pod

    def add_bridged_pod(self, index: int) -> Pod:
        """A pod on the node's bridge (bridge/flannel style): 10.2.0.<index>/24 via the bridge."""
        if not any(p.host_if.startswith("pfvb") for p in self.pods):
            wiring.add_bridge(self.netns, BRIDGE, f"{BRIDGE_GATEWAY}/24")
        pod = Pod(f"{self.prefix}-b{index}", f"pfvb{index}", f"10.2.0.{index}")
        self.add_bridged(pod, BRIDGE, 24, BRIDGE_GATEWAY, no_dad=True)
        self.pods.append(pod)
        return pod

    def in_node(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run(*argv, check=check)

    def in_pod(self, pod: Pod, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return sh(*in_netns(pod.netns, *argv), check=check)

    def add_cluster_ip(self, port: int, backend: Pod, backend_port: int) -> None:
        self.in_node(
            "iptables-legacy", "-t", "nat", "-A", "PREROUTING", "-d", CLUSTER_IP, "-p", "tcp",
            "--dport", str(port), "-j", "DNAT", "--to-destination", f"{backend.ip}:{backend_port}",
        )  # fmt: skip

    def serve(
        self, pod: Pod, *, tcp: tuple[int, ...] = (), udp: tuple[int, ...] = (), sctp_log: str | None = None
    ) -> None:
        """Echo servers in the pod (TCP and UDP) and a raw SCTP sink, until destroy()."""
        argv = ["--tcp", ",".join(map(str, tcp)), "--udp", ",".join(map(str, udp))]
        if sctp_log:
            argv += ["--sctp-log", sctp_log]
        self.start(pod.netns, PYTHON, str(TRAFFIC), "serve", *argv, ready=True)

    def probe(self, pod: Pod | None, kind: str, ip: str, port: int = 0, *extra: str) -> bool:
        """One new connection (or ping) from `pod` (None: from the node); True if answered."""
        netns = self.netns if pod is None else pod.netns
        argv = [PYTHON, str(TRAFFIC), "probe", kind, ip, str(port), *extra]
        done = sh(*in_netns(netns, *argv), check=False)
        if done.returncode not in (0, 1):
            raise RuntimeError(f"probe failed: {done.stderr}")
        return done.returncode == 0

    def spawn(self, pod: Pod, *args: str) -> subprocess.Popen[str]:
        return self.start(pod.netns, PYTHON, str(TRAFFIC), *args)

    def legacy_save(self, family: int = 4) -> str:
        return self.in_node("iptables-legacy-save" if family == 4 else "ip6tables-legacy-save").stdout


# What each pod of the usual lab serves (three_pods): enough for every module's probes.
LAB_TCP = (80, 8080)
LAB_UDP = (53, 54)


@contextlib.contextmanager
def three_pods(sctp_dir: Path) -> Iterator[Node]:
    """The usual lab of the iptables tests: a node with pods 1..3 (10.1.0.<n>, fd00::<n>), each
    echoing TCP LAB_TCP and UDP LAB_UDP and logging the SCTP it receives to
    `sctp_dir`/<netns>.sctp; destroyed after (conftest.py's `node` fixture)."""
    lab = Node()
    try:
        lab.create(3)
        for pod in lab.pods:
            lab.serve(pod, tcp=LAB_TCP, udp=LAB_UDP, sctp_log=str(sctp_dir / f"{pod.netns}.sctp"))
        yield lab
    finally:
        lab.destroy()


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


def _serve_worker(netns: str, conn: Connection, factory: Callable[[], Any]) -> None:
    from pyroute2 import netns as pyroute2_netns

    # Forked from the test process, which may hold gRPC's objects (its threads are not copied):
    # collecting them here crashed a worker once (CI, 2026-12-08, "Segmentation fault" while
    # garbage-collecting). What the fork copied is never collected in the worker.
    gc.freeze()
    pyroute2_netns.setns(netns)
    dataplane = factory()
    while True:
        method, args = conn.recv()
        if method == "exit":
            conn.send(("ok", None))
            return
        try:
            conn.send(("ok", getattr(dataplane, method)(*args)))
        except Exception as exc:
            conn.send(("error", exc))


class DataplaneWorker:
    """An IptablesDataplane living in a forked process inside the node netns.

    Calls are forwarded over a pipe; killing the process is "the agent died" (no teardown)."""

    def __init__(self, netns: str, factory: Callable[[], Any]) -> None:
        context = multiprocessing.get_context("fork")
        self._conn, child = context.Pipe()
        self.process = context.Process(target=_serve_worker, args=(netns, child, factory), daemon=True)
        self.process.start()

    def call(self, method: str, *args: Any) -> Any:
        self._conn.send((method, args))
        if not self._conn.poll(120):
            raise TimeoutError(f"dataplane worker did not answer {method}")
        status, value = self._conn.recv()
        if status == "error":
            raise value
        return value

    def kill(self) -> None:
        if self.process.is_alive() and self.process.pid is not None:
            os.kill(self.process.pid, 9)
        self.process.join(10)

    def stop(self) -> None:
        if self.process.is_alive():
            with contextlib.suppress(OSError, EOFError, TimeoutError):
                self.call("exit")
        self.kill()


@contextlib.contextmanager
def running(netns: str, factory: Callable[[], Any]) -> Iterator[DataplaneWorker]:
    """A started dataplane in a worker inside `netns`, torn down (its kernel state removed) after."""
    worker = DataplaneWorker(netns, factory)
    try:
        worker.call("start")
        yield worker
    finally:
        try:
            worker.call("teardown")
        finally:
            worker.stop()


wait_for = wait_until
