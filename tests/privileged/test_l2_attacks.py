"""Layer-2 attacks from a hostile pod on a bridged node (flannel / bridge plugin style), with real
frames: the attacker (root in its netns) writes raw frames onto its veth, the victim's own
interface (or the kernel state the frame would change) says what arrived. Each case runs first
without podfence, where the attack must work (else the case proves nothing), then with it.

The eBPF dataplane drops these frames at tc ingress of the attacker's veth (lib/neigh.h); the
iptables dataplane drops them in the bridge family's PREROUTING (ebtables-nft chains,
agent/dataplane/iptables/bridge.py: tags, foreign source MACs, ARP from other senders) and
narrows the NDP exemption. ARP length and NDP link-layer options are checked by the eBPF
dataplane only (see test_bpf_packets.py for the tables).
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import pytest

from agent.dataplane.types import DirectionPolicy, Endpoint, NodeState
from agent.lab import wiring
from tests.privileged.bpf_netns import PYTHON, Node, Pod, in_netns, ip, sh

scapy = pytest.importorskip("scapy.all", reason="needs scapy (the test extra)")

pytestmark = pytest.mark.needs("bpffs")

TOOL = Path(__file__).with_name("l2_tool.py")
BRIDGE = "pfbbr1"
GATEWAY, GATEWAY6 = "10.4.0.1", "fd00:4::1"
MARKER = b"podfence-l2-marker"
DENY_ALL = DirectionPolicy(isolated=True)


class Plane(Protocol):
    def apply(self, state: NodeState) -> None: ...
    def teardown(self) -> None: ...


@pytest.fixture
def bridged() -> Iterator[Node]:
    """Three pods as ports of one bridge; IPv4 /24 and IPv6 /64 on the bridge's subnet."""
    node = Node()
    try:
        node.create_bridge_node(BRIDGE, (f"{GATEWAY}/24", f"{GATEWAY6}/64"))
        for index in (1, 2, 3):
            pod = Pod(
                index,
                f"{node.prefix}-p{index}",
                f"pfbl{index}",
                f"10.4.0.{index + 1}",
                f"fd00:4::{index + 1}",
            )
            node.add_bridged(pod, BRIDGE, 24, None, address6=f"{pod.ip6}/64")
            node.pods.append(pod)
        yield node
    finally:
        node.destroy()


def link_mac(pod: Pod) -> str:
    return wiring.mac(pod.netns, "eth0")


def state(node: Node, plane_kind: str, open_ingress: bool = False) -> NodeState:
    """Every pod isolated both ways with nothing allowed (`open_ingress`: egress only), each bound
    to the MAC the agent's own discovery reads from its veth."""
    from agent.node.interfaces import InterfaceDiscovery

    discovery = InterfaceDiscovery(netns=node.netns, active_probe=False)
    try:
        view = discovery.scan()
        endpoints = {
            f"ns/p{pod.index}": Endpoint(
                f"ns/p{pod.index}",
                (ip(pod.ip), ip(pod.ip6)),
                DirectionPolicy() if open_ingress else DENY_ALL,
                DENY_ALL,
                ifindex=pod.ifindex,
                mac=discovery.mac_of(pod.ifindex, view),
            )
            for pod in node.pods
        }
    finally:
        discovery.close()
    assert {e.mac for e in endpoints.values()} == {link_mac(pod) for pod in node.pods}
    return NodeState(1, endpoints, {}, (ip(GATEWAY), ip(GATEWAY6)), frozenset(p.ifindex for p in node.pods))


@contextlib.contextmanager
def podfence(node: Node, kind: str, open_ingress: bool = False) -> Iterator[Any]:
    if kind == "bpf":
        from agent.dataplane.bpf.dataplane import BpfDataplane

        plane = BpfDataplane(node.settings())
        plane.start()
        try:
            plane.apply(state(node, kind, open_ingress))
            yield plane
        finally:
            plane.teardown()
        return
    from agent.dataplane.iptables.dataplane import IptablesDataplane
    from tests.privileged.iptables_netns import DataplaneWorker

    worker = DataplaneWorker(node.netns, IptablesDataplane)
    try:
        worker.call("start")
        worker.call("apply", state(node, kind, open_ingress))
        yield worker
    finally:
        worker.call("teardown")
        worker.stop()


def egress_denials(plane: Any, key: str) -> int:
    """What the iptables dataplane `plane` (a DataplaneWorker) counts as `key`'s egress denials."""
    return sum(c.denied_packets for c in plane.call("counters") if (c.key, c.direction) == (key, "egress"))


def send(pod: Pod, *frames: Any) -> None:
    sh(*in_netns(pod.netns, PYTHON, str(TOOL), "send", "eth0", *(bytes(f).hex() for f in frames)))


def delivered(sender: Pod, receiver: Pod, *frames: Any) -> int:
    """How many frames carrying MARKER the receiver's interface saw while `sender` sent `frames`."""
    sniffer = subprocess.Popen(
        in_netns(receiver.netns, PYTHON, str(TOOL), "sniff", "eth0", "2.0", MARKER.hex()),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert sniffer.stdout is not None and sniffer.stdout.readline().strip() == "ready"
    send(sender, *frames)
    out, _ = sniffer.communicate(timeout=10)
    return int(out.strip())


def both_ways(node: Node, kind: str, attack: Any, open_ingress: bool = False) -> tuple[Any, Any]:
    without = attack()
    with podfence(node, kind, open_ingress):
        with_it = attack()
    return without, with_it


# ---- item 3: VLAN tags ---------------------------------------------------------------------------


@pytest.mark.parametrize("tags", ["vlan0", "vlan7", "qinq"])
@pytest.mark.parametrize("kind", ["bpf", "iptables"])
def test_vlan_tagged_frames_do_not_bypass_the_egress_verdict(bridged: Node, kind: str, tags: str) -> None:
    a, b, _ = bridged.pods
    s = scapy
    ip_part = s.IP(src=a.ip, dst=b.ip) / s.UDP(sport=4000, dport=5000) / MARKER
    ether = s.Ether(src=link_mac(a), dst=link_mac(b))
    frame = {
        "vlan0": ether / s.Dot1Q(vlan=0) / ip_part,  # a priority tag: the victim's kernel takes it
        "vlan7": ether / s.Dot1Q(vlan=7) / ip_part,
        "qinq": ether / s.Dot1AD(vlan=7) / s.Dot1Q(vlan=9) / ip_part,
    }[tags]
    # the victim's ingress is open: only the sender's egress verdict stands in the way
    without, with_it = both_ways(bridged, kind, lambda: delivered(a, b, frame), open_ingress=True)
    assert without >= 1, "without podfence the tagged frame must cross the bridge"
    assert with_it == 0


@pytest.mark.parametrize("ethertype", ["local-experimental", "802.3-llc"])
@pytest.mark.parametrize("kind", ["bpf", "iptables"])
def test_other_ethertypes_do_not_cross_the_bridge(bridged: Node, kind: str, ethertype: str) -> None:
    """Pods speak IPv4, IPv6 and ARP; a frame of any other type (or an 802.3 length frame) never
    meets an IP verdict, so it would be a channel between pods whose policies deny everything."""
    a, b, _ = bridged.pods
    s = scapy
    ether = {
        "local-experimental": s.Ether(src=link_mac(a), dst=link_mac(b), type=0x88B5) / MARKER,
        "802.3-llc": s.Dot3(src=link_mac(a), dst=link_mac(b)) / s.LLC(dsap=0x42, ssap=0x42, ctrl=3) / MARKER,
    }[ethertype]
    without, with_it = both_ways(bridged, kind, lambda: delivered(a, b, ether))
    assert without >= 1, "without podfence the frame crosses the bridge"
    assert with_it == 0


# ---- item 4: MAC binding -------------------------------------------------------------------------


def fdb_port_of(node: Node, mac: str) -> str | None:
    for line in node.run("bridge", "fdb", "show", "br", BRIDGE).stdout.splitlines():
        fields = line.split()
        if fields and fields[0] == mac and "permanent" not in fields:
            return fields[fields.index("dev") + 1]
    return None


@pytest.mark.parametrize("kind", ["bpf", "iptables"])
def test_a_pod_cannot_take_another_pods_mac_on_the_bridge(bridged: Node, kind: str) -> None:
    a, b, c = bridged.pods
    s = scapy
    victim_mac = link_mac(b)
    # the victim's own frames would move its MAC back to its port: a freshly up IPv6 link sends
    # router solicitations and MLD reports for seconds, which raced the attack on a loaded machine
    b.run("sysctl", "-qw", "net.ipv6.conf.eth0.disable_ipv6=1")

    def steal() -> tuple[int, str | None]:
        # the victim speaks first, so the bridge knows where its MAC lives
        send(
            b,
            s.Ether(src=victim_mac, dst="ff:ff:ff:ff:ff:ff")
            / s.ARP(op=1, hwsrc=victim_mac, psrc=b.ip, pdst=GATEWAY),
        )
        sniffer = subprocess.Popen(
            in_netns(a.netns, PYTHON, str(TOOL), "sniff", "eth0", "2.0", MARKER.hex()),
            stdout=subprocess.PIPE,
            text=True,
        )
        assert sniffer.stdout is not None and sniffer.stdout.readline().strip() == "ready"
        # the attacker claims the victim's MAC; the victim's traffic is then bridged to it
        send(
            a, s.Ether(src=victim_mac, dst="ff:ff:ff:ff:ff:ff") / s.IP(src=a.ip, dst=GATEWAY) / s.UDP(dport=9)
        )
        # where the bridge now sends the victim's frames: the proof on either dataplane (under
        # the iptables one, c's deny-all egress would stop c's frame wherever it went)
        port = fdb_port_of(bridged, victim_mac)
        send(
            c,
            s.Ether(src=link_mac(c), dst=victim_mac) / s.IP(src=c.ip, dst=b.ip) / s.UDP(dport=5000) / MARKER,
        )
        out, _ = sniffer.communicate(timeout=10)
        return int(out.strip()), port

    # unguarded, the theft must work (else the case proves nothing); a frame of the victim's own
    # between the attacker's and the probe moves the MAC back, so it gets three tries
    stolen_without = steal()
    for _ in range(2):
        if stolen_without == (1, a.host_if):
            break
        stolen_without = steal()
    assert stolen_without == (1, a.host_if), "without podfence the victim's traffic goes to the attacker"
    with podfence(bridged, kind):
        stolen_with = steal()
    assert stolen_with == (0, b.host_if)


# ---- item 5: neighbour discovery and ARP as a channel, rogue router advertisements ---------------


def hop_limit(pod: Pod) -> int:
    return int(pod.run("sysctl", "-n", "net.ipv6.conf.eth0.hop_limit").stdout)


@pytest.mark.parametrize("kind", ["bpf", "iptables"])
def test_a_pod_cannot_send_router_advertisements_to_its_neighbours(bridged: Node, kind: str) -> None:
    a, b, _ = bridged.pods
    s = scapy
    ra = (
        s.Ether(src=link_mac(a), dst="33:33:00:00:00:01")
        / s.IPv6(src="fe80::bad", dst="ff02::1", hlim=255)
        / s.ICMPv6ND_RA(chlim=1, routerlifetime=0)
    )

    def attack() -> int:
        b.run("sysctl", "-qw", "net.ipv6.conf.eth0.hop_limit=64")
        send(a, ra)
        return hop_limit(b)

    without, with_it = both_ways(bridged, kind, attack)
    assert without == 1, "without podfence the victim takes the rogue hop limit"
    assert with_it == 64


def node_neighbour_mac(node: Node, address: str) -> str | None:
    """The MAC the node's neighbour cache holds for `address` on the bridge, if any."""
    fields = node.run("ip", "-6", "neigh", "show", address, "dev", BRIDGE).stdout.split()
    return fields[fields.index("lladdr") + 1] if "lladdr" in fields else None


@pytest.mark.parametrize("source", ["link-local", "own address"])
@pytest.mark.parametrize("kind", ["bpf", "iptables"])
def test_a_pod_cannot_advertise_another_pods_address(bridged: Node, kind: str, source: str) -> None:
    """An unsolicited neighbour advertisement (override) naming the victim's IPv6 address with the
    attacker's MAC: the node's cache would send the victim's traffic to the attacker."""
    a, b, _ = bridged.pods
    s = scapy
    attacker_mac = link_mac(a)
    sender = "fe80::" + s.in6_mactoifaceid(attacker_mac) if source == "link-local" else a.ip6
    advert = (
        s.Ether(src=attacker_mac, dst="33:33:00:00:00:01")
        / s.IPv6(src=sender, dst="ff02::1", hlim=255)
        / s.ICMPv6ND_NA(tgt=b.ip6, R=0, S=0, O=1)
        / s.ICMPv6NDOptDstLLAddr(lladdr=attacker_mac)
    )

    def attack() -> str | None:
        # the node knows the victim, as after any exchange with it
        known = ("lladdr", link_mac(b), "dev", BRIDGE, "nud", "stale")
        bridged.run("ip", "-6", "neigh", "replace", b.ip6, *known)
        send(a, advert)
        return node_neighbour_mac(bridged, b.ip6)

    without, with_it = both_ways(bridged, kind, attack)
    assert without == attacker_mac, "without podfence the node's cache takes the attacker's MAC"
    assert with_it == link_mac(b)


def test_iptables_holds_neighbour_discovery_to_address_resolution_with_egress_open(bridged: Node) -> None:
    """A pod whose egress no policy isolates still sends only what address resolution needs:
    each hostile message is dropped and counted as its egress denial, the legitimate ones pass."""
    from dataclasses import replace

    a, b, _ = bridged.pods
    s = scapy
    for pod in bridged.pods:  # their own router solicitations and MLD reports stay out of the counts
        pod.run("sysctl", "-qw", "net.ipv6.conf.eth0.disable_ipv6=1")
    mine, theirs = link_mac(a), link_mac(b)
    own_link_local = "fe80::" + s.in6_mactoifaceid(mine)

    node_mac = wiring.mac(bridged.netns, BRIDGE)

    def nd(source: str, message: Any) -> bytes:
        """To the node only (a multicast frame would be judged once per bridge port it floods to)."""
        return bytes(s.Ether(src=mine, dst=node_mac) / s.IPv6(src=source, dst=GATEWAY6, hlim=255) / message)

    hostile = [
        nd(a.ip6, s.ICMPv6ND_NA(tgt=b.ip6, O=1) / s.ICMPv6NDOptDstLLAddr(lladdr=mine)),  # another's address
        nd(a.ip6, s.ICMPv6ND_NA(tgt=a.ip6, O=1) / s.ICMPv6NDOptDstLLAddr(lladdr=theirs)),  # another's MAC
        nd(own_link_local, s.ICMPv6ND_NS(tgt=b.ip6) / s.ICMPv6NDOptSrcLLAddr(lladdr=theirs)),
        nd(a.ip6, s.ICMPv6ND_RA(chlim=1, routerlifetime=0)),  # a router advertisement
        nd(a.ip6, s.ICMPv6ND_NA(tgt=a.ip6) / s.ICMPv6NDOptDstLLAddr(lladdr=mine) / s.ICMPv6NDOptMTU()),
        bytes(  # behind a hop-by-hop header, where fixed offsets would read the wrong bytes
            s.Ether(src=mine, dst=node_mac) / s.IPv6(src=a.ip6, dst=GATEWAY6, hlim=255)
            / s.IPv6ExtHdrHopByHop() / s.ICMPv6ND_NA(tgt=b.ip6, O=1) / s.ICMPv6NDOptDstLLAddr(lladdr=mine)
        ),
    ]
    legitimate = [
        nd(a.ip6, s.ICMPv6ND_NA(tgt=a.ip6, O=1) / s.ICMPv6NDOptDstLLAddr(lladdr=mine)),
        nd(own_link_local, s.ICMPv6ND_NA(tgt=own_link_local)),
        nd(a.ip6, s.ICMPv6ND_NS(tgt=b.ip6) / s.ICMPv6NDOptSrcLLAddr(lladdr=mine)),
        nd("::", s.ICMPv6ND_NS(tgt=a.ip6) / s.ICMPv6NDOptUnknown(type=14, len=1, data=b"\x01" * 6)),
        nd(own_link_local, s.ICMPv6ND_RS() / s.ICMPv6NDOptSrcLLAddr(lladdr=mine)),
    ]
    opened = state(bridged, "iptables", open_ingress=True)
    endpoints = {key: replace(e, egress=DirectionPolicy()) for key, e in opened.endpoints.items()}
    opened = replace(opened, endpoints=endpoints)
    with podfence(bridged, "iptables") as plane:
        plane.call("apply", opened)

        def denied() -> int:
            return egress_denials(plane, "ns/p1")

        before = denied()
        sh(*in_netns(a.netns, PYTHON, str(TOOL), "send", "eth0", *(f.hex() for f in legitimate)))
        assert denied() == before, "address resolution's own messages pass"
        sh(*in_netns(a.netns, PYTHON, str(TOOL), "send", "eth0", *(f.hex() for f in hostile)))
        assert denied() - before == len(hostile)
        # a spoofed source, dropped in PF-FROM; then another pod's chains are replaced: what
        # was counted stays counted once
        send(a, s.Ether(src=mine, dst=node_mac) / s.IP(src="10.4.0.99", dst=GATEWAY) / s.UDP(dport=9))
        assert denied() - before == len(hostile) + 1
        endpoints["ns/p2"] = replace(endpoints["ns/p2"], egress=DENY_ALL)
        plane.call("apply", replace(opened, version=opened.version + 1, endpoints=endpoints))
        assert denied() - before == len(hostile) + 1


def solicited_node(address: str) -> tuple[str, str]:
    """(group address, its multicast MAC) of an IPv6 address."""
    import ipaddress

    low = ipaddress.IPv6Address(address).packed[-3:]
    group = ipaddress.IPv6Address(bytes.fromhex("ff0200000000000000000001ff") + low)
    return str(group), "33:33:ff:" + low.hex(":")


@pytest.mark.parametrize("kind", ["bpf", "iptables"])
def test_neighbour_solicitations_carry_no_payload_between_isolated_pods(bridged: Node, kind: str) -> None:
    a, b, _ = bridged.pods
    s = scapy
    group, group_mac = solicited_node(b.ip6)
    ns = (
        s.Ether(src=link_mac(a), dst=group_mac)
        / s.IPv6(src=a.ip6, dst=group, hlim=255)
        / s.ICMPv6ND_NS(tgt=b.ip6)
        / s.ICMPv6NDOptSrcLLAddr(lladdr=link_mac(a))
        / s.ICMPv6NDOptUnknown(type=200, len=4, data=MARKER.ljust(30, b"."))
    )
    without, with_it = both_ways(bridged, kind, lambda: delivered(a, b, ns))
    assert without >= 1, "without podfence the solicitation and its payload reach the victim"
    assert with_it == 0


@pytest.mark.parametrize("claim", ["sender ip", "sender mac"])
@pytest.mark.parametrize("kind", ["bpf", "iptables"])
def test_arp_claiming_another_pods_address_is_dropped(bridged: Node, kind: str, claim: str) -> None:
    """An ARP reply from the attacker's own Ethernet source that claims the victim's IP (or its MAC)."""
    a, b, c = bridged.pods
    hwsrc, psrc = (link_mac(a), b.ip) if claim == "sender ip" else (link_mac(b), a.ip)
    arp = (
        s_ether(a, c)
        / scapy.ARP(op=2, hwsrc=hwsrc, psrc=psrc, hwdst=link_mac(c), pdst=c.ip)
        / scapy.Raw(MARKER)  # only so that the sniffer can tell this frame
    )
    without, with_it = both_ways(bridged, kind, lambda: delivered(a, c, arp))
    assert without >= 1, "without podfence the forged ARP reaches the neighbour"
    assert with_it == 0


def s_ether(sender: Pod, receiver: Pod) -> Any:
    return scapy.Ether(src=link_mac(sender), dst=link_mac(receiver))


# Trailing bytes: a payload, or the 18 bytes that pad ARP to 60 on the wire, not zero. On the
# iptables dataplane nft's ARP guard marks them and the pod port's ebtables chain drops them.
ARP_TRAILERS = {"payload": MARKER * 20, "non-zero padding": MARKER}  # MARKER: 18 bytes


@pytest.mark.parametrize("trailer", sorted(ARP_TRAILERS))
@pytest.mark.parametrize("kind", ["bpf", "iptables"])
def test_arp_carries_no_payload_between_isolated_pods(bridged: Node, kind: str, trailer: str) -> None:
    a, b, _ = bridged.pods
    s = scapy
    arp = (
        s.Ether(src=link_mac(a), dst="ff:ff:ff:ff:ff:ff")
        / s.ARP(op=1, hwsrc=link_mac(a), psrc=a.ip, pdst=b.ip)
        / s.Raw(ARP_TRAILERS[trailer])
    )
    without, with_it = both_ways(bridged, kind, lambda: delivered(a, b, arp))
    assert without >= 1, "without podfence the ARP trailer reaches the victim"
    assert with_it == 0


@pytest.mark.parametrize("kind", ["bpf", "iptables"])
def test_address_resolution_between_bridged_pods_keeps_working(bridged: Node, kind: str) -> None:
    """Legit neighbour traffic under a policy that allows the flow: ARP and NDP still resolve."""
    a, b, _ = bridged.pods
    with podfence(bridged, kind) as plane:
        allowed = state(bridged, kind)
        endpoints = {
            k: Endpoint(e.key, e.ips, ifindex=e.ifindex, mac=e.mac) for k, e in allowed.endpoints.items()
        }
        plane_apply = plane.apply if kind == "bpf" else (lambda st: plane.call("apply", st))
        plane_apply(NodeState(2, endpoints, {}, allowed.node_ips, allowed.pod_interfaces))
        for pod in (a, b):
            pod.run("ip", "neigh", "flush", "dev", "eth0")
        assert a.ping(b.ip) and a.ping(b.ip6) and a.ping(GATEWAY) and a.ping(GATEWAY6)


# ---- the iptables dataplane's bridge-family chains ----------------------------------------------


def bridge_nat(node: Node) -> str:
    return node.run("ebtables-nft-save", "-t", "nat").stdout


def test_iptables_layer2_chains_count_their_drops_and_leave_with_teardown(bridged: Node) -> None:
    a, b, _ = bridged.pods
    # a freshly up IPv6 link sends router solicitations and MLD reports for seconds, which the
    # pods' egress chains drop and count too: silenced, so that the counters below count the frames
    for pod in bridged.pods:
        pod.run("sysctl", "-qw", "net.ipv6.conf.eth0.disable_ipv6=1")
    # another tool's rule in the same table: podfence must leave it alone
    bridged.run("ebtables-nft", "-t", "nat", "-A", "PREROUTING", "-i", "pfother0", "-j", "ACCEPT")
    qinq = s_ether(a, b) / scapy.Dot1AD(vlan=7) / scapy.Dot1Q(vlan=9) / scapy.IP(src=a.ip, dst=b.ip)
    with podfence(bridged, "iptables", open_ingress=True) as plane:
        saved = bridge_nat(bridged)
        prerouting = [line for line in saved.splitlines() if line.startswith("-A PREROUTING ")]
        assert prerouting[0] == "-A PREROUTING -j PF-L2"
        assert len([line for line in saved.splitlines() if line.startswith(":PF-L2-")]) == 3
        for pod in bridged.pods:
            assert f"-i {pod.host_if} -j PF-L2-" in saved
        before = {(c.key, c.direction): c.denied_packets for c in plane.call("counters")}
        send(a, qinq, qinq, qinq)
        after = {(c.key, c.direction): c.denied_packets for c in plane.call("counters")}
        assert after[("ns/p1", "egress")] - before.get(("ns/p1", "egress"), 0) == 3
        assert after.get(("ns/p2", "egress"), 0) == before.get(("ns/p2", "egress"), 0)
        # ARP with trailing bytes: marked by the nft guard, dropped (and counted) by p1's chain
        trailer = s_ether(a, b) / scapy.ARP(op=1, hwsrc=link_mac(a), psrc=a.ip, pdst=b.ip) / scapy.Raw(MARKER)
        send(a, trailer, trailer)
        counted = {(c.key, c.direction): c.denied_packets for c in plane.call("counters")}
        assert counted[("ns/p1", "egress")] - after[("ns/p1", "egress")] == 2
        # another tool removes the jump: the agent's hook check puts it back first
        bridged.run("ebtables-nft", "-t", "nat", "-D", "PREROUTING", "-j", "PF-L2")
        assert plane.call("repair_hooks") == ["bridge PREROUTING"]
        assert bridge_nat(bridged).split("-A PREROUTING ", 2)[1].strip() == "-j PF-L2"
        # or the ARP guard's table: put back too
        bridged.run("nft", "delete", "table", "bridge", "podfence")
        assert plane.call("repair_hooks") == ["bridge podfence"]
        assert "chain arp-length" in bridged.run("nft", "list", "table", "bridge", "podfence").stdout
    left = bridge_nat(bridged)
    assert "PF-L2" not in left
    assert "-A PREROUTING -i pfother0 -j ACCEPT" in left
    assert "podfence" not in bridged.run("nft", "list", "tables").stdout


def test_podfence_teardown_removes_the_layer2_chains_of_a_stopped_agent(bridged: Node) -> None:
    from agent.dataplane.iptables.dataplane import IptablesDataplane
    from tests.privileged.iptables_netns import DataplaneWorker

    bridged.run("ebtables-nft", "-t", "nat", "-A", "PREROUTING", "-i", "pfother0", "-j", "ACCEPT")
    worker = DataplaneWorker(bridged.netns, IptablesDataplane)
    try:
        worker.call("start")
        worker.call("apply", state(bridged, "iptables"))
    finally:
        worker.stop()  # the agent exits: its rules stay in force
    assert "-A PREROUTING -j PF-L2" in bridge_nat(bridged)
    assert "bridge podfence" in bridged.run("nft", "list", "tables").stdout
    sh(*in_netns(bridged.netns, PYTHON, "-m", "agent.cli", "teardown", "--dataplane", "iptables"))
    left = bridge_nat(bridged)
    assert "PF-L2" not in left
    assert "-A PREROUTING -i pfother0 -j ACCEPT" in left


def test_iptables_layer2_chain_flushed_by_hand_is_rewritten(bridged: Node) -> None:
    """The state check (repair_state) puts back a bridged pod's layer-2 chain someone emptied. Not
    defended in between: the empty chain RETURNs, so the pod's tagged frames pass it until the repair."""
    a, b, _ = bridged.pods
    qinq = s_ether(a, b) / scapy.Dot1AD(vlan=7) / scapy.Dot1Q(vlan=9) / scapy.IP(src=a.ip, dst=b.ip)
    with podfence(bridged, "iptables", open_ingress=True) as plane:

        def dropped_of_twenty() -> int:
            """How far a's egress drop counter moves while a sends twenty tagged frames (another
            drop of a's, say a router solicitation, may count too)."""
            before = egress_denials(plane, "ns/p1")
            send(a, *[qinq] * 20)
            return egress_denials(plane, "ns/p1") - before

        assert plane.call("repair_state") == []
        assert dropped_of_twenty() >= 20
        (chain,) = [line.split()[-1] for line in bridge_nat(bridged).splitlines()
                    if line.startswith(f"-A PF-L2 -i {a.host_if} ")]
        bridged.run("ebtables-nft", "-t", "nat", "-F", chain)
        assert dropped_of_twenty() < 20, "the lab must show the chain is what drops"
        found = plane.call("repair_state")
        assert [kind for kind, _ in found] == ["bridge_chain"] and chain in found[0][1], found
        assert dropped_of_twenty() >= 20
        assert plane.call("repair_state") == []
    assert "podfence" not in bridged.run("nft", "list", "tables").stdout
