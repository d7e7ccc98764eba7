"""Interface discovery against real network namespaces: a "node" netns with an uplink, pods as
netns behind veths, either routed (/32 via the veth) or bridged (veths enslaved to a bridge)."""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.dataplane.types import NodeState
from agent.lab import wiring
from agent.node.interfaces import InterfaceDiscovery
from agent.node.monitor import NetlinkMonitor
from agent.node.reconcile import Reconciler

RTNH_F_ONLINK = 4  # the gateway is on the link, whatever the pod's addresses say


def sh(*commands: str) -> None:
    for command in commands:
        subprocess.run(command, shell=True, check=True, capture_output=True)


def ifindex(netns: str, name: str) -> int:
    with wiring.ipr(netns) as ipr:
        return wiring.index(ipr, name)


class Lab:
    """Namespaces named pfn-<id>-*; every one is deleted at the end, also after a failure."""

    def __init__(self) -> None:
        self.prefix = f"pfn-{uuid.uuid4().hex[:6]}"
        self.node = f"{self.prefix}-node"
        self.outside = f"{self.prefix}-out"
        self.namespaces: list[str] = []
        for name in (self.node, self.outside):
            self.add_netns(name)

    def add_netns(self, name: str) -> str:
        wiring.create(name)
        self.namespaces.append(name)
        return name

    def pod(self, name: str, host_if: str, ip: str, prefixlen: int, gateway: str | None = None) -> str:
        """A pod's netns and veth; the host end stays down and unaddressed, for the test to shape."""
        netns = self.add_netns(f"{self.prefix}-{name}")
        wiring.add_veth(self.node, host_if, netns, up=False)
        with wiring.ipr(netns) as ipr:
            eth0 = wiring.index(ipr, "eth0")
            ipr.addr("add", index=eth0, address=ip, prefixlen=prefixlen)
            ipr.link("set", index=eth0, state="up")
            if gateway:
                ipr.route("add", dst="0.0.0.0/0", gateway=gateway, oif=eth0, flags=RTNH_F_ONLINK)
        return netns

    def close(self) -> None:
        for name in reversed(self.namespaces):
            wiring.remove(name)


@pytest.fixture
def lab() -> Iterator[Lab]:
    built = Lab()
    try:
        yield built
    finally:
        built.close()


def talk(netns: str, dst: str) -> None:
    """Send one UDP datagram, so the node learns the sender's MAC (neighbour table, FDB)."""
    sh(
        f"ip netns exec {netns} python3 -c "
        f'\'import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", ("{dst}", 9))\''
    )


def routed_uplink(lab: Lab) -> None:
    sh(
        f"ip -n {lab.node} link add up0 type veth peer name eth0 netns {lab.outside}",
        f"ip -n {lab.node} addr add 192.168.50.2/24 dev up0",
        f"ip -n {lab.node} link set up0 up",
        f"ip -n {lab.outside} addr add 192.168.50.1/24 dev eth0",
        f"ip -n {lab.outside} link set eth0 up",
        f"ip -n {lab.node} route add default via 192.168.50.1",
    )


def test_routed_pods_found_by_route_lookup(lab):
    routed_uplink(lab)
    lab.pod("a", "hv-a", "10.244.1.5", 32, gateway="169.254.1.1")
    lab.pod("b", "hv-b", "10.244.1.6", 32, gateway="169.254.1.1")
    # Gateway addresses on host veths: link-local (Calico/lab style) and a /32 (ptp plugin style).
    # A second way out carries no address at all, only a route to a next-hop gateway.
    lab.add_netns(f"{lab.prefix}-out2")
    sh(
        f"ip -n {lab.node} addr add 169.254.1.1/32 dev hv-a scope link",
        f"ip -n {lab.node} addr add 10.244.1.1/32 dev hv-b",
        f"ip -n {lab.node} link set hv-a up",
        f"ip -n {lab.node} link set hv-b up",
        f"ip -n {lab.node} route add 10.244.1.5/32 dev hv-a",
        f"ip -n {lab.node} route add 10.244.1.6/32 dev hv-b",
        f"ip -n {lab.node} link add up1 type veth peer name eth0 netns {lab.prefix}-out2",
        f"ip -n {lab.node} link set up1 up",
        f"ip -n {lab.node} route add 10.99.0.0/16 via 10.98.0.1 dev up1 onlink",
    )
    discovery = InterfaceDiscovery(netns=lab.node)
    try:
        view = discovery.scan()
        hv_a, hv_b = ifindex(lab.node, "hv-a"), ifindex(lab.node, "hv-b")
        assert view.pod_interfaces == {hv_a, hv_b}
        assert {ifindex(lab.node, "up0"), ifindex(lab.node, "up1")} <= view.uplinks
        # The node sends to pod a from 169.254.1.1 (the route's preferred source): node traffic.
        assert set(view.node_ips) == {
            ipaddress.ip_address(ip) for ip in ("192.168.50.2", "169.254.1.1", "10.244.1.1")
        }
        assert discovery.resolve(ipaddress.ip_address("10.244.1.5"), view) == hv_a
        assert discovery.resolve(ipaddress.ip_address("10.244.1.6"), view) == hv_b
        # Not local: the route leads to the uplink, which is never a pod interface.
        assert discovery.resolve(ipaddress.ip_address("10.244.2.9"), view) is None
        # The in-process longest-prefix match agrees with the kernel's own lookup...
        assert view.routes is not None
        for text in ("10.244.1.5", "10.244.1.6", "10.244.2.9", "192.168.50.77", "10.99.3.4", "8.8.8.8"):
            ip = ipaddress.ip_address(text)
            assert view.routes.lookup(ip) == discovery.route_oif(ip), text
        # ...and policy routing makes discovery ask the kernel instead.
        sh(f"ip -n {lab.node} rule add fwmark 7 table 100")
        view = discovery.scan()
        assert view.routes is None
        assert discovery.resolve(ipaddress.ip_address("10.244.1.5"), view) == hv_a
    finally:
        discovery.close()


def test_bridged_pods_found_through_neighbours_and_fdb(lab):
    # The uplink itself is a veth port of the bridge (its peer in another netns, like the pods'):
    # only the default gateway's FDB entry tells it apart.
    sh(
        f"ip -n {lab.node} link add br0 type bridge",
        f"ip -n {lab.node} addr add 10.9.0.1/24 dev br0",
        f"ip -n {lab.node} link set br0 up",
        f"ip -n {lab.node} link add up0 type veth peer name eth0 netns {lab.outside}",
        f"ip -n {lab.node} link set up0 master br0 up",
        f"ip -n {lab.outside} addr add 10.9.0.254/24 dev eth0",
        f"ip -n {lab.outside} link set eth0 up",
        f"ip -n {lab.node} route add default via 10.9.0.254",
    )
    pods = {}
    addresses = {"a": "10.9.0.5", "b": "10.9.0.6", "silent": "10.9.0.7", "mute": "10.9.0.8"}
    addresses |= {"dup1": "10.9.0.9", "dup2": "10.9.0.9"}
    for name, ip in addresses.items():
        pods[name] = lab.pod(name, f"hv-{name}", ip, 24, gateway="10.9.0.1")
        sh(f"ip -n {lab.node} link set hv-{name} master br0 up")
    # What an unknown pod looks like to the node when the dataplane drops its ARP: never learned.
    sh(f"ip -n {pods['mute']} link set eth0 arp off")
    time.sleep(0.2)  # let the bridge ports reach forwarding state
    for name in ("a", "b"):
        talk(pods[name], "10.9.0.1")
    talk(lab.outside, "10.9.0.1")

    discovery = InterfaceDiscovery(netns=lab.node)
    try:
        view = discovery.scan()
        ports = {name: ifindex(lab.node, f"hv-{name}") for name in pods}
        uplink_port, bridge = ifindex(lab.node, "up0"), ifindex(lab.node, "br0")
        assert view.pod_interfaces == set(ports.values())
        assert {uplink_port, bridge} <= view.uplinks
        assert discovery.resolve(ipaddress.ip_address("10.9.0.5"), view) == ports["a"]
        assert discovery.resolve(ipaddress.ip_address("10.9.0.6"), view) == ports["b"]

        # Pods that never spoke are found by the address their end of the veth holds; two pods
        # holding one address are ambiguous and stay unknown (fail-closed).
        assert discovery.resolve(ipaddress.ip_address("10.9.0.7"), view) == ports["silent"]
        assert discovery.resolve(ipaddress.ip_address("10.9.0.8"), view) == ports["mute"]
        assert discovery.resolve(ipaddress.ip_address("10.9.0.9"), view) is None
        # The active probe (NTF_USE) also made the kernel resolve the silent pod's MAC, so the
        # neighbour/FDB path finds it from now on.
        silent = ipaddress.ip_address("10.9.0.7")
        deadline = time.monotonic() + 5
        while (bridge, silent) not in discovery.scan().neighbours:
            assert time.monotonic() < deadline, "the neighbour probe did not resolve the silent pod"
            time.sleep(0.05)
        learned = discovery.scan()
        assert learned.fdb[(bridge, learned.neighbours[(bridge, silent)])] == ports["silent"]
    finally:
        discovery.close()


def test_monitor_reports_a_new_pod_interface_quickly(lab):
    routed_uplink(lab)
    changed = threading.Event()
    monitor = NetlinkMonitor(lambda kinds: changed.set(), netns=lab.node)
    discovery = InterfaceDiscovery(netns=lab.node)
    stop = threading.Event()
    thread = threading.Thread(target=monitor.run, args=(stop,), daemon=True)
    thread.start()
    try:
        assert monitor.subscribed.wait(timeout=5)
        assert changed.wait(timeout=1), "no initial rescan request after subscribing"
        changed.clear()
        netns = lab.add_netns(f"{lab.prefix}-new")
        started = time.monotonic()
        sh(f"ip -n {lab.node} link add hv-new type veth peer name eth0 netns {netns}")
        assert changed.wait(timeout=2), "no netlink notification for the new veth"
        latency = time.monotonic() - started
        assert ifindex(lab.node, "hv-new") in discovery.scan().pod_interfaces
        # `ip` itself takes a few ms to start; the notification follows the link within milliseconds.
        assert latency < 0.5, f"monitor woke after {latency * 1000:.0f} ms"
    finally:
        stop.set()
        thread.join(timeout=5)
        discovery.close()
    assert not thread.is_alive()


def test_monitor_ignores_ipv6_link_local_addresses_and_local_routes(lab):
    """The burst each new interface brings once IPv6 DAD ends changes nothing scan() reads."""
    sh(
        f"ip -n {lab.node} link add d0 type veth peer name d1",
        f"ip -n {lab.node} link set d0 addrgenmode none",
        f"ip -n {lab.node} link set d1 addrgenmode none",
        f"ip -n {lab.node} link set d0 up",
        f"ip -n {lab.node} link set d1 up",
        f"ip -n {lab.node} -6 addr add fe80::1/64 dev d0 nodad",  # the fe80::/64 route exists now
    )
    reports: list[frozenset[str]] = []
    monitor = NetlinkMonitor(reports.append, netns=lab.node)
    stop = threading.Event()
    thread = threading.Thread(target=monitor.run, args=(stop,), daemon=True)
    thread.start()
    try:
        assert monitor.subscribed.wait(timeout=5)
        deadline = time.monotonic() + 2
        while not reports and time.monotonic() < deadline:
            time.sleep(0.01)
        reports.clear()  # the initial "look at everything"
        # RTM_NEWADDR (IPv6 link-local) and RTM_NEWROUTE "local fe80::1234 table local", nothing else.
        sh(f"ip -n {lab.node} -6 addr add fe80::1234/64 dev d0 nodad")
        time.sleep(0.3)
        assert reports == []
        sh(f"ip -n {lab.node} addr add 10.99.0.1/24 dev d0")  # a node address and subnet route
        deadline = time.monotonic() + 2
        while not reports and time.monotonic() < deadline:
            time.sleep(0.01)
        assert reports and "address" in set().union(*reports)
    finally:
        stop.set()
        thread.join(timeout=5)
    assert not thread.is_alive()


class RecordingDataplaneDouble:
    """Records applied states with their arrival time (the kernel side is tested elsewhere)."""

    name = "recording-double"

    def __init__(self) -> None:
        self.applied: list[tuple[float, NodeState]] = []

    def start(self) -> None:
        pass

    def apply(self, state: NodeState) -> None:
        self.applied.append((time.monotonic(), state))

    def counters(self) -> list:
        return []

    def close(self) -> None:
        pass

    def teardown(self) -> None:
        pass


def test_new_pod_interface_reaches_the_dataplane_within_milliseconds(lab):
    """Real netlink monitor + discovery + reconcile loop: `ip link add` -> dataplane.apply."""
    routed_uplink(lab)
    dataplane = RecordingDataplaneDouble()
    discovery = InterfaceDiscovery(netns=lab.node)
    reconciler = Reconciler(dataplane, discovery)
    reconciler.apply(NodeState(version=1))
    monitor = NetlinkMonitor(reconciler.interfaces_changed, netns=lab.node)
    stop = threading.Event()
    threads = [
        threading.Thread(target=monitor.run, args=(stop,), daemon=True),
        threading.Thread(target=reconciler.run, args=(stop,), daemon=True),
    ]
    for thread in threads:
        thread.start()
    latencies: list[tuple[float, float]] = []
    try:
        assert monitor.subscribed.wait(timeout=5)
        for attempt in range(5):
            netns = lab.add_netns(f"{lab.prefix}-p{attempt}")
            before = len(dataplane.applied)
            started = time.monotonic()
            sh(f"ip -n {lab.node} link add hv-p{attempt} type veth peer name eth0 netns {netns}")
            created = time.monotonic()
            new_index = ifindex(lab.node, f"hv-p{attempt}")
            deadline = created + 2
            while time.monotonic() < deadline:
                hits = [t for t, s in dataplane.applied[before:] if new_index in s.pod_interfaces]
                if hits:
                    # Bounded below by `ip` returning and above by `ip` starting: report the upper.
                    latencies.append((hits[0] - started, hits[0] - created))
                    break
                time.sleep(0.001)
            else:
                raise AssertionError(f"hv-p{attempt} never reached the dataplane")
    finally:
        stop.set()
        reconciler.interfaces_changed()
        for thread in threads:
            thread.join(timeout=5)
        discovery.close()
    upper = sorted(upper for upper, _ in latencies)
    lower = sorted(lower for _, lower in latencies)
    print(
        f"new interface -> dataplane.apply: median {lower[2] * 1000:.1f} ms after `ip link add` returned,"
        f" {upper[2] * 1000:.1f} ms after it was started (max {upper[-1] * 1000:.1f} ms)"
    )
    assert upper[2] < 0.25


LINK_COMPARISON = """
import json
from agent.node.interfaces import InterfaceDiscovery
discovery = InterfaceDiscovery()
lean = sorted(map(repr, discovery._links()))
full = sorted(map(repr, discovery._links_pyroute2()))
print(json.dumps({"lean": lean, "full": full}))
"""


def test_lean_link_dump_matches_pyroute2(lab):
    routed_uplink(lab)
    lab.pod("a", "hv-a", "10.244.1.5", 32)
    sh(
        f"ip -n {lab.node} link add br0 type bridge",
        f"ip -n {lab.node} link set hv-a master br0",
        f"ip -n {lab.node} link add hv-b type veth peer name hv-b-peer",  # both ends here: no netnsid
    )
    out = subprocess.run(
        wiring.argv_in(lab.node, [sys.executable, "-c", LINK_COMPARISON]),
        check=True,
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    ).stdout
    dumps = json.loads(out)
    assert dumps["lean"] == dumps["full"]
    assert len(dumps["lean"]) == 6  # lo, up0, hv-a, br0, hv-b, hv-b-peer
    assert any(
        "name='hv-a', kind='veth', peer_netnsid=" in text and "master=None" not in text
        for text in dumps["lean"]
    )
