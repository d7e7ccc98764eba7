"""Packet tables through BPF_PROG_TEST_RUN: {policy, allowed packets, dropped packets}.

The local pod sits behind ifindex 1 (test runs use the loopback device, whose skb->ifindex is 1);
its tc filters are attached only inside a private "pfb-" netns. Each row applies one NodeState
and runs frames through the program of the hook that judges them:
  to_pod   tc egress  (ingress verdict of the pod)
  from_pod tc ingress (anti-spoofing, malformed, orphan fragments)
  egress   the netfilter socket filter (egress verdict, non-zero = drop)
"""

from __future__ import annotations

import ipaddress
import secrets
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from agent.dataplane.base import PermanentDataplaneError
from agent.dataplane.bpf import loader, structs
from agent.dataplane.bpf.dataplane import BpfDataplane
from agent.dataplane.bpf.settings import BpfSettings
from agent.dataplane.bpf.telemetry import count_entries
from agent.dataplane.bpf.testrun import TC_ACT_OK, TC_ACT_SHOT, run_program
from agent.dataplane.types import Allow, CidrPeer, DirectionPolicy, Endpoint, IdentityPeer, NodeState
from agent.lab import wiring
from tests.privileged import bpf_frames as f

pytestmark = pytest.mark.needs("bpffs")

POD, POD6 = "10.0.0.1", "fd00::1"
PEER7, PEER7_6, PEER8 = "10.0.1.7", "fd00:1::7", "10.0.1.8"
NODE, NODE6 = "10.0.9.1", "fd00:9::1"
IDENTITIES = {
    7: (ipaddress.ip_address(PEER7), ipaddress.ip_address(PEER7_6)),
    8: (ipaddress.ip_address(PEER8),),
}


@dataclass(frozen=True)
class Row:
    name: str
    ingress: DirectionPolicy | None
    egress: DirectionPolicy | None
    allowed: tuple[tuple[str, bytes], ...]
    dropped: tuple[tuple[str, bytes], ...]
    mac: str | None = None  # the MAC bound to the pod (frames come from f.MAC_B)


MAC_B = f.MAC_B.hex(":")
ROUTER_ALERT = b"\x94\x04\x00\x00"
# loose source route (type 131, length 7, pointer 4) naming PEER7 as the next hop, and a NOP
LSRR_VIA_PEER7 = b"\x83\x07\x04" + ipaddress.IPv4Address(PEER7).packed + b"\x01"


def with_source(frame: bytes, mac: bytes) -> bytes:
    return frame[:6] + mac + frame[12:]


def iso(*allows: Allow) -> DirectionPolicy:
    return DirectionPolicy(isolated=True, allows=allows)


def ident(identity: int, protocol: int = 0, first: int = 0, last: int = 65535) -> Allow:
    return Allow(IdentityPeer(identity), protocol, first, last)


def advert(source: str, target: str) -> bytes:
    """ICMPv6 neighbour advertisement for `target` (the address the host's cache will learn)."""
    return f.neighbour_advertisement(source, "fe80::1", target)


def udp4(source: str, destination: str, dport: int, payload: bytes) -> bytes:
    return f.eth(f.ETH_IP, f.ipv4(source, destination, f.UDP, f.l4(f.UDP, 40000, dport) + payload))


def short_data_offset(frame: bytes) -> bytes:
    """An IPv4 TCP frame whose header claims 4 words (less than TCP's 20-byte minimum)."""
    at = 14 + 20 + 12
    return frame[:at] + bytes([4 << 4]) + frame[at + 1 :]


def frag_first(dport: int, ident_: int) -> bytes:
    return f.eth(
        f.ETH_IP, f.ipv4(PEER7, POD, f.TCP, f.l4(f.TCP, 40000, dport), frag_id=ident_, more_fragments=True)
    )


def frag_later(ident_: int, src: str = PEER7) -> bytes:
    return f.eth(f.ETH_IP, f.ipv4(src, POD, f.TCP, b"x" * 16, frag_id=ident_, frag_offset=24))


def frag6(dport: int, ident_: int, later: bool) -> bytes:
    body = b"y" * 16 if later else f.l4(f.TCP, 40000, dport)
    header = f.frag6_header(f.TCP, 24 if later else 0, not later, ident_)
    return f.eth(f.ETH_IP6, f.ipv6(PEER7_6, POD6, 44, header + body))


def cidr(text: str, *excepts: str, protocol: int = 0, first: int = 0, last: int = 65535) -> Allow:
    peer = CidrPeer(ipaddress.ip_network(text), tuple(ipaddress.ip_network(e) for e in excepts))
    return Allow(peer, protocol, first, last)


ROWS = [
    Row(
        "host prefixes (the pf_cidr_host hash) beside a real prefix whose except is a host",
        iso(
            cidr("10.0.1.7/32", protocol=f.TCP, first=80, last=80),
            cidr("fd00:1::7/128", protocol=f.TCP, first=80, last=80),
            cidr("10.0.2.0/24", "10.0.2.5/32", protocol=f.TCP, first=80, last=80),
        ),
        None,
        allowed=(
            ("to_pod", f.tcp4(PEER7, POD)),
            ("to_pod", f.tcp6(PEER7_6, POD6)),
            ("to_pod", f.tcp4("10.0.2.9", POD)),
        ),
        dropped=(
            ("to_pod", f.tcp4("10.0.2.5", POD)),  # the except's class 0 in the hash shadows the /24
            ("to_pod", f.tcp4(PEER8, POD)),
            ("to_pod", f.tcp4(PEER7, POD, dport=81)),
            ("to_pod", f.tcp6("fd00:1::8", POD6)),
        ),
    ),
    Row(
        "identity ingress tcp/80 from 7",
        iso(ident(7, f.TCP, 80, 80)),
        None,
        allowed=(("to_pod", f.tcp4(PEER7, POD)), ("to_pod", f.tcp6(PEER7_6, POD6))),
        dropped=(
            ("to_pod", f.tcp4(PEER8, POD)),
            ("to_pod", f.tcp4(PEER7, POD, dport=81)),
            ("to_pod", f.packet4(PEER7, POD, f.UDP)),
            ("to_pod", f.tcp4("192.0.2.1", POD)),
        ),
    ),
    Row(
        "cidr with except, egress",
        None,
        iso(
            Allow(
                CidrPeer(ipaddress.ip_network("10.1.0.0/16"), (ipaddress.ip_network("10.1.5.0/24"),)),
                f.TCP,
                0,
                65535,
            )
        ),
        allowed=(
            ("egress", f.tcp4(POD, "10.1.2.3", dport=443)),
            ("egress", f.tcp4(POD, "10.1.6.3", dport=1)),
        ),
        dropped=(
            ("egress", f.tcp4(POD, "10.1.5.9", dport=443)),
            ("egress", f.tcp4(POD, "10.2.0.1", dport=443)),
            ("egress", f.packet4(POD, "10.1.2.3", f.UDP, dport=53)),
        ),
    ),
    Row(
        "an ipv6 cidr covering ::ffff:0:0/96 (where ipv4 is kept) does not open ipv4",
        None,
        iso(Allow(CidrPeer(ipaddress.ip_network("::/0")))),
        allowed=(("egress", f.tcp6(POD6, "2001:db8::1")),),
        dropped=(("egress", f.tcp4(POD, "192.0.2.1")), ("egress", f.packet4(POD, PEER8, f.UDP))),
    ),
    Row(
        "port range 1000-2000",
        iso(ident(7, f.TCP, 1000, 2000)),
        None,
        allowed=tuple(("to_pod", f.tcp4(PEER7, POD, dport=p)) for p in (1000, 1023, 1024, 1500, 2000)),
        dropped=tuple(("to_pod", f.tcp4(PEER7, POD, dport=p)) for p in (999, 2001, 80, 65535)),
    ),
    Row(
        "sctp-only rule does not open tcp",
        iso(ident(7, f.SCTP, 5000, 5000)),
        None,
        allowed=(("to_pod", f.packet4(PEER7, POD, f.SCTP, dport=5000)),),
        dropped=(
            ("to_pod", f.tcp4(PEER7, POD, dport=5000)),
            ("to_pod", f.packet4(PEER7, POD, f.UDP, dport=5000)),
        ),
    ),
    Row(
        "protocol-0 rule allows icmp and every port",
        iso(ident(7)),
        None,
        allowed=(
            ("to_pod", f.packet4(PEER7, POD, f.ICMP)),
            ("to_pod", f.tcp4(PEER7, POD, dport=12345)),
            ("to_pod", f.packet4(PEER7, POD, 47)),
        ),
        dropped=(("to_pod", f.packet4(PEER8, POD, f.ICMP)),),
    ),
    Row(
        "ipv4 options are skipped before l4",
        iso(ident(7, f.TCP, 80, 80)),
        None,
        allowed=(
            ("to_pod", f.tcp4(PEER7, POD, options=b"\x01\x01\x01\x00")),
            ("to_pod", f.tcp4(PEER7, POD, options=b"\x01" * 40)),
        ),
        dropped=(("to_pod", f.tcp4(PEER7, POD, dport=81, options=b"\x01\x01\x01\x00")),),
    ),
    Row(
        # pf_parse reads the first 14 bytes of L4 with the IP header when the packet has them, and
        # apart from it when it is shorter (a UDP or ICMP header with little or no payload)
        "ports are the same whether l4 is read with the ip header or apart from it",
        iso(ident(7, f.UDP, 53, 53), ident(7, f.ICMP)),
        None,
        allowed=(
            ("to_pod", udp4(PEER7, POD, 53, b"")),
            ("to_pod", udp4(PEER7, POD, 53, b"payload!")),
            ("to_pod", f.eth(f.ETH_IP6, f.ipv6(PEER7_6, POD6, f.UDP, f.l4(f.UDP, 40000, 53)))),
            ("to_pod", f.eth(f.ETH_IP6, f.ipv6(PEER7_6, POD6, f.UDP, f.l4(f.UDP, 40000, 53) + b"payload!"))),
            ("to_pod", f.eth(f.ETH_IP, f.ipv4(PEER7, POD, f.ICMP, f.l4(f.ICMP) + b"ping" * 4))),
        ),
        dropped=(
            ("to_pod", udp4(PEER7, POD, 54, b"")),
            ("to_pod", udp4(PEER7, POD, 54, b"payload!")),
            ("to_pod", udp4(PEER8, POD, 53, b"payload!")),
            ("to_pod", f.eth(f.ETH_IP6, f.ipv6(PEER7_6, POD6, f.UDP, f.l4(f.UDP, 40000, 54) + b"payload!"))),
            ("to_pod", f.eth(f.ETH_IP, f.ipv4(PEER7, POD, f.TCP, f.l4(f.TCP, 40000, 53)))),
        ),
    ),
    Row(
        "ipv6 extension headers are walked",
        iso(ident(7, f.TCP, 80, 80)),
        None,
        allowed=(
            ("to_pod", f.tcp6(PEER7_6, POD6, extensions=(0,))),
            ("to_pod", f.tcp6(PEER7_6, POD6, extensions=(0, 60))),
            ("to_pod", f.tcp6(PEER7_6, POD6, extensions=(60,) * 8)),  # as many as we walk (was dropped)
        ),
        dropped=(
            ("to_pod", f.tcp6(PEER7_6, POD6, dport=81, extensions=(0, 60))),
            ("to_pod", f.tcp6(PEER7_6, POD6, extensions=(60,) * 9)),
        ),  # more than we walk
    ),
    Row(
        "fragments follow their first fragment; orphans dropped",
        iso(ident(7, f.TCP, 80, 80)),
        None,
        allowed=(
            ("to_pod", frag_first(80, 11)),
            ("to_pod", frag_later(11)),
            ("to_pod", frag6(80, 21, later=False)),
            ("to_pod", frag6(80, 21, later=True)),
        ),
        dropped=(
            ("to_pod", frag_first(81, 12)),
            ("to_pod", frag_later(12)),
            ("to_pod", frag_later(13)),
            ("to_pod", frag6(80, 22, later=True)),
        ),
    ),
    Row(
        "truncated headers dropped for isolated pods",
        iso(ident(7)),
        iso(ident(7)),
        allowed=(("to_pod", f.tcp4(PEER7, POD)),),
        dropped=(
            ("to_pod", f.tcp4(PEER7, POD)[: 14 + 20 + 2]),  # tcp header cut
            ("to_pod", f.tcp4(PEER7, POD)[: 14 + 20 + 13]),  # data offset there, flags not
            ("to_pod", short_data_offset(f.tcp4(PEER7, POD))),  # claims a 16-byte TCP header
            # (a cut IP header cannot be test-run: the kernel refuses it before the program)
            ("to_pod", f.eth(f.ETH_IP, f.ipv4(PEER7, POD, f.TCP, b"")[:20].replace(b"\x45", b"\x44", 1))),
            ("from_pod", f.tcp4(POD, PEER7)[: 14 + 20 + 2]),
        ),
    ),
    Row(
        "anti-spoofing on tc ingress",
        None,
        None,
        allowed=(
            ("from_pod", f.tcp4(POD, PEER7)),
            ("from_pod", f.tcp6(POD6, PEER7_6)),
            ("from_pod", f.arp(POD, "10.0.0.254")),
            ("from_pod", f.arp("0.0.0.0", POD)),
            ("from_pod", f.neighbour_solicitation("fe80::2", "ff02::1:ff00:1", "fe80::1")),
            ("from_pod", advert("fe80::2", POD6)),
            ("from_pod", advert("fe80::2", "fe80::2")),
        ),
        dropped=(
            ("from_pod", f.tcp4("10.0.0.99", PEER7)),
            ("from_pod", f.tcp6("fd00::99", PEER7_6)),
            ("from_pod", f.tcp4(PEER7, POD)),
            ("from_pod", f.arp("10.0.0.99", "10.0.0.254")),
            ("from_pod", f.eth(0x88CC, b"\0" * 46)),
            ("from_pod", advert("fe80::2", PEER7_6)),  # neighbour-cache poisoning for another address
        ),
    ),
    Row(
        "neighbour discovery passes an isolated pod only from its own link",
        iso(),
        None,
        allowed=(
            ("to_pod", f.eth(f.ETH_IP6, f.ipv6("fe80::1", POD6, f.ICMP6, f.l4(f.ICMP6, icmp_type=135), 255))),
            ("to_pod", f.eth(f.ETH_IP6, f.ipv6(PEER7_6, POD6, f.ICMP6, f.l4(f.ICMP6, icmp_type=136), 255))),
        ),
        dropped=(  # routed (hop limit decremented): not link plumbing, so judged like any ICMPv6
            ("to_pod", f.eth(f.ETH_IP6, f.ipv6(PEER7_6, POD6, f.ICMP6, f.l4(f.ICMP6, icmp_type=135), 63))),
            ("to_pod", f.eth(f.ETH_IP6, f.ipv6(PEER7_6, POD6, f.ICMP6, f.l4(f.ICMP6, icmp_type=130), 64))),
        ),
    ),
    Row(
        "link-local sources of an egress-isolated pod are judged at tc (nf_egress cannot tie them to it)",
        None,
        iso(Allow(CidrPeer(ipaddress.ip_network("fe80::/64")), f.TCP, 22, 22)),
        allowed=(
            ("from_pod", f.tcp6("fe80::2", "fe80::1", dport=22)),
            ("from_pod", f.neighbour_solicitation("fe80::2", "ff02::1:ff00:1", "fe80::1")),
            ("from_pod", f.neighbour_solicitation("::", "ff02::1:ff00:1", POD6)),  # DAD
        ),
        dropped=(
            ("from_pod", f.tcp6("fe80::2", "fe80::1", dport=23)),
            ("from_pod", f.tcp6("fe80::2", "fd00::1", dport=22)),
            ("from_pod", f.tcp6("::", "fe80::1", dport=80)),
            ("from_pod", f.eth(f.ETH_IP6, f.ipv6("fe80::2", "fe80::1", f.UDP, f.l4(f.UDP, 40000, 53)))),
        ),
    ),
    Row(
        "a pod's frames carry its MAC and no VLAN tag",
        None,
        None,
        mac=MAC_B,
        allowed=(
            ("from_pod", f.tcp4(POD, PEER7)),
            ("from_pod", f.tcp6(POD6, PEER7_6)),
        ),
        dropped=(
            (
                "from_pod",
                f.eth(f.ETH_IP, f.ipv4(POD, PEER7, f.TCP, f.l4(f.TCP)), f.MAC_A),
            ),  # another pod's MAC
            ("from_pod", f.eth(f.ETH_IP6, f.strip_eth(f.tcp6(POD6, PEER7_6)), f.MAC_A)),
            ("from_pod", f.vlan_tagged(f.tcp4(POD, PEER7))),  # VLAN 0: a priority tag
            ("from_pod", f.vlan_tagged(f.tcp4(POD, PEER7), vid=7)),
            ("from_pod", f.vlan_tagged(f.vlan_tagged(f.tcp4(POD, PEER7), vid=7), vid=9, tpid=0x88A8)),
            ("from_pod", f.vlan_tagged(f.arp(POD, "10.0.0.254"), vid=7)),
        ),
    ),
    Row(
        "ARP from a pod: Ethernet/IPv4 of the pod's MAC and address, 42 bytes or 60 zero-padded",
        None,
        None,
        mac=MAC_B,
        allowed=(
            ("from_pod", f.arp(POD, "10.0.0.254")),
            ("from_pod", f.arp(POD, "10.0.0.254", op=2)),
            ("from_pod", f.arp("0.0.0.0", POD)),  # probe
            ("from_pod", f.arp(POD, "10.0.0.254", trailer=bytes(18))),  # padded to 60 by the sender
        ),
        dropped=(
            ("from_pod", with_source(f.arp(POD, "10.0.0.254", sender_mac=f.MAC_A), f.MAC_B)),  # sender MAC
            ("from_pod", f.arp(POD, "10.0.0.254", trailer=b"secret message 18b")),  # padding not zero
            ("from_pod", f.arp(POD, "10.0.0.254", trailer=bytes(19))),  # longer than the minimum frame
            ("from_pod", f.arp(POD, "10.0.0.254", trailer=bytes(400))),
            ("from_pod", f.arp(POD, "10.0.0.254", trailer=bytes(1))),
            ("from_pod", f.arp(POD, "10.0.0.254", op=3)),  # RARP
            ("from_pod", f.arp(POD, "10.0.0.254", hardware=6)),  # not Ethernet
            ("from_pod", f.arp(POD, "10.0.0.254")[:40]),  # cut short
        ),
    ),
    Row(
        "NDP and MLD from a pod: address resolution only, options only, no router messages",
        iso(),
        iso(),
        mac=MAC_B,
        allowed=(
            (
                "from_pod",
                f.neighbour_solicitation("fe80::2", "ff02::1:ff00:1", "fe80::1", f.nd_option(1, f.MAC_B)),
            ),
            (
                "from_pod",
                f.neighbour_solicitation(POD6, "fe80::1", "fe80::1", f.nd_option(1, f.MAC_B)),
            ),  # NUD
            ("from_pod", f.neighbour_solicitation("::", "ff02::1:ff00:1", POD6, f.nd_option(14, b"nonce!"))),
            ("from_pod", f.neighbour_advertisement(POD6, "fe80::1", POD6, f.nd_option(2, f.MAC_B))),
            ("from_pod", f.neighbour_advertisement("fe80::2", "fe80::1", "fe80::2")),
            ("from_pod", f.icmp6("fe80::2", "ff02::2", 133, bytes(4) + f.nd_option(1, f.MAC_B))),  # RS
            ("from_pod", f.mld_report("fe80::2", ("ff02::1:ff00:1", "ff02::1:ff00:2"))),
        ),
        dropped=(
            ("from_pod", f.router_advertisement("fe80::2")),  # would set every neighbour's hop limit to 1
            ("from_pod", f.icmp6("fe80::2", POD6, 137, bytes(36))),  # redirect
            ("from_pod", f.icmp6("fe80::2", "ff02::1", 130, bytes(20), hop_limit=1)),  # MLD query (no HBH)
            # a payload after, or instead of, the options
            ("from_pod", f.neighbour_solicitation("fe80::2", "ff02::1:ff00:1", "fe80::1", b"payload!")),
            (
                "from_pod",
                f.neighbour_solicitation("fe80::2", "ff02::1:ff00:1", "fe80::1", f.nd_option(200, b"data")),
            ),
            (
                "from_pod",
                f.neighbour_solicitation("fe80::2", "ff02::1:ff00:1", "fe80::1", f.nd_option(1, f.MAC_B) * 2),
            ),
            ("from_pod", f.neighbour_solicitation("fe80::2", "ff02::1:ff00:1", "fe80::1") + b"trailing"),
            (
                "from_pod",
                f.neighbour_solicitation("fe80::2", "ff02::1:ff00:1", "fd00:77::1"),
            ),  # free-form target
            (
                "from_pod",
                f.neighbour_solicitation(POD6, "ff02::1:ff00:1", "fe80::1", f.nd_option(1, f.MAC_A)),
            ),
            (
                "from_pod",
                f.neighbour_solicitation(POD6, "ff02::1:ff00:1", "fe80::1", f.nd_option(14, b"nonce!")),
            ),
            ("from_pod", f.neighbour_advertisement(POD6, "fe80::1", POD6, f.nd_option(2, f.MAC_A))),
            ("from_pod", f.neighbour_advertisement(POD6, "fe80::1", PEER7_6)),  # another's address
            ("from_pod", f.mld_report("fe80::2", ("ff05::1234",))),  # not a solicited-node group
            ("from_pod", f.mld_report("fe80::2", ("ff02::1:ff00:1",), sources=2)),  # 32 bytes of sources
            ("from_pod", f.mld_report("fe80::2", ("ff02::1:ff00:1",) * 5)),
        ),
    ),
    Row(
        "node addresses always reach the pod",
        iso(),
        None,
        allowed=(("to_pod", f.tcp4(NODE, POD, dport=10250)), ("to_pod", f.packet4(NODE, POD, f.ICMP))),
        dropped=(("to_pod", f.tcp4(PEER7, POD)),),
    ),
    Row(
        # a source route would reach the node's forwarding after the egress verdict judged a
        # packet to the node; only a lone Router Alert (IGMP) passes, even with egress open
        "ipv4 options from a pod",
        None,
        None,
        allowed=(
            ("from_pod", f.tcp4(POD, PEER7)),
            ("from_pod", f.tcp4(POD, PEER7, options=ROUTER_ALERT)),
        ),
        dropped=(
            ("from_pod", f.tcp4(POD, NODE, options=LSRR_VIA_PEER7)),
            ("from_pod", f.tcp4(POD, PEER7, options=b"\x01\x01\x01\x00")),  # NOPs and end of list
            ("from_pod", f.tcp4(POD, PEER7, options=ROUTER_ALERT + b"\x01\x01\x01\x00")),
            ("from_pod", f.tcp4(POD, PEER7, options=b"\x94\x04\x00\x01")),  # Router Alert value 1
        ),
    ),
]


def started_plane(established_on_change: str, **overrides: Any) -> Iterator[BpfDataplane]:
    """A started dataplane in a netns of its own with its own pins; torn down afterwards.
    `overrides`: other BpfSettings fields."""
    prefix = f"pfb-{secrets.token_hex(3)}"
    netns = f"{prefix}-pkt"
    wiring.create(netns, loopback_up=False)
    dataplane = BpfDataplane(
        BpfSettings(
            pin_dir=f"/sys/fs/bpf/{prefix}",
            netns=netns,
            established_on_change=established_on_change,
            state_file=f"/run/podfence-tests/{prefix}.json",
            **overrides,
        )
    )
    try:
        dataplane.start()
        yield dataplane
    finally:
        dataplane.teardown()
        wiring.remove(netns)


@pytest.fixture(scope="module")
def plane() -> Iterator[BpfDataplane]:
    # "reset": each row changes the pod's policy, so flows admitted by an earlier row are forgotten
    yield from started_plane("reset")


def apply(
    plane: BpfDataplane,
    ingress: DirectionPolicy | None,
    egress: DirectionPolicy | None,
    version: int = 1,
    with_endpoint: bool = True,
    mac: str | None = None,
) -> None:
    pod = Endpoint(
        "ns/pod",
        (ipaddress.ip_address(POD), ipaddress.ip_address(POD6)),
        ingress or DirectionPolicy(),
        egress or DirectionPolicy(),
        ifindex=1,
        mac=mac,
    )
    plane.apply(
        NodeState(
            version,
            {pod.key: pod} if with_endpoint else {},
            IDENTITIES,
            (ipaddress.ip_address(NODE), ipaddress.ip_address(NODE6)),
            frozenset({1}),
        )
    )


def verdict(plane: BpfDataplane, hook: str, frame: bytes, ingress_ifindex: int = 0) -> bool:
    """True if the hook lets the frame pass. `ingress_ifindex`: the device the packet entered the
    node on (0: the node sent it)."""
    frame = frame.ljust(14, b"\0")  # test runs need at least an Ethernet header
    programs = plane._programs  # the loaded programs: exactly what the tc filters run
    if hook == "egress":
        return run_program(programs[loader.PROGRAM_NF_EGRESS].fd, frame) == 0
    name = loader.PROGRAM_TO_POD if hook == "to_pod" else loader.PROGRAM_FROM_POD
    result = run_program(programs[name].fd, frame, ingress_ifindex=ingress_ifindex)
    assert result in (TC_ACT_OK, TC_ACT_SHOT)
    return result == TC_ACT_OK


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_packet_table(plane: BpfDataplane, row: Row) -> None:
    apply(plane, row.ingress, row.egress, mac=row.mac)
    for hook, frame in row.allowed:
        assert verdict(plane, hook, frame), f"{row.name}: {hook} should pass {frame.hex()}"
    for hook, frame in row.dropped:
        assert not verdict(plane, hook, frame), f"{row.name}: {hook} should drop {frame.hex()}"


def test_node_addresses_pass_an_isolated_ingress_only_where_none_can_forge_them(plane: BpfDataplane) -> None:
    # IPv4: Linux drops a packet that enters with a local source, so the source alone suffices.
    # IPv6 has no such check: the node's IPv6 address counts only on what the node itself sent.
    apply(plane, iso(), None)
    uplink = 1  # any device the packet entered the node on
    assert verdict(plane, "to_pod", f.tcp4(NODE, POD, dport=10250))
    assert verdict(plane, "to_pod", f.tcp4(NODE, POD, dport=10250), ingress_ifindex=uplink)
    assert verdict(plane, "to_pod", f.tcp6(NODE6, POD6, dport=10250))
    assert not verdict(plane, "to_pod", f.tcp6(NODE6, POD6, sport=40002, dport=10250), ingress_ifindex=uplink)
    assert not verdict(plane, "to_pod", f.tcp6(PEER7_6, POD6, sport=40003, dport=10250))


def test_a_first_fragment_seen_only_at_tc_admits_no_later_fragment_at_the_egress_verdict(
    plane: BpfDataplane,
) -> None:
    # the kernel may discard a first fragment between tc_from_pod and the egress hook (TTL 1);
    # where nothing reassembles, the later fragments then meet the verdict alone
    apply(plane, None, iso(ident(7, f.TCP, 80, 80)))
    first = f.eth(
        f.ETH_IP, f.ipv4(POD, PEER7, f.TCP, f.l4(f.TCP, 40000, 22), frag_id=21, more_fragments=True)
    )
    later = f.eth(f.ETH_IP, f.ipv4(POD, PEER7, f.TCP, b"x" * 16, frag_id=21, frag_offset=24))
    assert verdict(plane, "from_pod", first)  # tc passes it on to the verdict
    assert verdict(plane, "from_pod", later)  # and knows the datagram
    assert not verdict(plane, "egress", later)  # no verdict was given to the datagram
    assert not verdict(plane, "egress", first)  # judged: port 22 is not allowed
    assert not verdict(plane, "egress", later)  # and the later fragments take that verdict


def test_replies_and_related_icmp_errors_of_allowed_flows(plane: BpfDataplane) -> None:
    apply(plane, iso(), iso(ident(7, f.TCP, 80, 80)))
    request = f.tcp4(POD, PEER7, sport=40001, dport=80)
    reply = f.tcp4(PEER7, POD, sport=80, dport=40001)
    unrelated = f.tcp4(PEER7, POD, sport=80, dport=40002)
    assert not verdict(plane, "to_pod", reply)  # no flow yet
    assert verdict(plane, "from_pod", request)
    assert verdict(plane, "egress", request)
    assert verdict(plane, "to_pod", reply)
    assert not verdict(plane, "to_pod", unrelated)
    error = f.icmp4_error("10.0.3.3", POD, f.strip_eth(request))
    assert verdict(plane, "to_pod", error)
    stray_error = f.icmp4_error("10.0.3.3", POD, f.strip_eth(f.tcp4(POD, PEER7, sport=40009, dport=80)))
    assert not verdict(plane, "to_pod", stray_error)
    # a pod's own packet that its egress denies does not open its ingress for the "reply"
    denied_request = f.tcp4(POD, PEER7, sport=40003, dport=81)
    assert verdict(plane, "from_pod", denied_request)
    assert not verdict(plane, "egress", denied_request)
    assert not verdict(plane, "to_pod", f.tcp4(PEER7, POD, sport=81, dport=40003))
    # ICMP echo: the reply's reversed tuple is the request's
    ping = f.packet4(POD, PEER8, f.ICMP, icmp_type=8, icmp_id=99)
    pong = f.packet4(PEER8, POD, f.ICMP, icmp_type=0, icmp_id=99)
    assert not verdict(plane, "egress", ping)  # egress only allows tcp/80 to identity 7
    apply(plane, iso(), iso(ident(8)), version=2)
    assert verdict(plane, "egress", ping)
    assert verdict(plane, "to_pod", pong)
    assert not verdict(plane, "to_pod", f.packet4(PEER8, POD, f.ICMP, icmp_type=0, icmp_id=98))


def test_unknown_endpoint_is_dropped(plane: BpfDataplane) -> None:
    apply(plane, None, None, with_endpoint=False)
    assert not verdict(plane, "to_pod", f.tcp4(PEER7, POD))
    assert not verdict(plane, "from_pod", f.tcp4(POD, PEER7))
    assert plane.drop_reason_counts()["unknown_endpoint"] >= 2
    apply(plane, None, None, version=2)
    assert verdict(plane, "to_pod", f.tcp4(PEER7, POD))


def test_flow_records_are_rate_limited_in_the_kernel_and_every_record_is_either_sent_or_lost(
    plane: BpfDataplane,
) -> None:
    apply(plane, iso(), None)
    plane.poll_flows(0)  # drain what earlier tests produced
    lost_before = plane.flows_lost()
    denies = 2500  # far above the default bucket (1,000 per CPU and second) when sent back to back
    for port in range(denies):  # each a flow of its own: each owes its first record
        assert not verdict(plane, "to_pod", f.tcp4(PEER7, POD, sport=50000, dport=1000 + port))
    received = plane.poll_flows(100)
    lost = plane.flows_lost() - lost_before
    assert len(received) + lost == denies
    assert lost > 0
    assert all(r.reason == "policy" and r.direction == "ingress" and r.endpoint == "ns/pod" for r in received)
    assert {r.destination_port for r in received} <= set(range(1000, 1000 + denies))


@pytest.fixture(scope="module")
def keep_plane() -> Iterator[BpfDataplane]:
    """established_on_change="keep" (the default): flows outlive policy changes."""
    yield from started_plane("keep")


def test_a_new_connection_on_a_closed_connections_tuple_gets_the_policy_of_now(
    keep_plane: BpfDataplane,
) -> None:
    plane = keep_plane
    apply(plane, iso(ident(7, f.TCP, 80, 80)), None)
    syn = f.tcp4(PEER7, POD, sport=45000, dport=80)
    ack = f.packet4(PEER7, POD, f.TCP, sport=45000, dport=80, tcp_flags=0x10)
    rst = f.packet4(PEER7, POD, f.TCP, sport=45000, dport=80, tcp_flags=0x14)
    other_syn = f.tcp4(PEER7, POD, sport=45001, dport=80)
    other_ack = f.packet4(PEER7, POD, f.TCP, sport=45001, dport=80, tcp_flags=0x10)
    assert verdict(plane, "to_pod", syn) and verdict(plane, "to_pod", ack)
    assert verdict(plane, "to_pod", other_syn)
    assert verdict(plane, "to_pod", rst)  # the first connection ends
    apply(plane, iso(ident(7, f.TCP, 443, 443)), None, version=2)  # port 80 no longer allowed
    assert verdict(plane, "to_pod", other_ack)  # keep: the open connection carries on
    assert not verdict(plane, "to_pod", syn)  # a new connection on the closed one's tuple: denied
    assert not verdict(plane, "to_pod", ack)  # and nothing of the old admission is left
    apply(plane, iso(ident(7, f.TCP, 80, 80)), None, version=3)
    assert verdict(plane, "to_pod", syn)  # allowed again: admitted afresh


def test_a_syn_does_not_restart_a_connection_closed_one_way_only(keep_plane: BpfDataplane) -> None:
    """Half closed, a connection may still carry data the other way: a SYN someone sends on its
    tuple must not wipe its admission. Once it is closed both ways, a SYN is a new connection."""
    plane = keep_plane
    apply(plane, iso(ident(7, f.TCP, 80, 80)), None, version=10)
    syn = f.tcp4(PEER7, POD, sport=46000, dport=80)
    peer_fin = f.packet4(PEER7, POD, f.TCP, sport=46000, dport=80, tcp_flags=0x11)
    pod_fin = f.packet4(POD, PEER7, f.TCP, sport=80, dport=46000, tcp_flags=0x11)
    assert verdict(plane, "to_pod", syn) and verdict(plane, "to_pod", peer_fin)
    _, value, way = flow_entry(plane, f.TCP, (PEER7, 46000), (POD, 80))
    assert value.closing == (structs.CT_FIN_AB if way == structs.WAY_AB else structs.CT_FIN_BA)
    assert verdict(plane, "to_pod", syn)
    _, value, _ = flow_entry(plane, f.TCP, (PEER7, 46000), (POD, 80))
    assert value.flags[way] == structs.CT_INGRESS_OK and value.closing  # not restarted
    assert verdict(plane, "egress", pod_fin)  # the pod's reply, and its own FIN
    _, value, _ = flow_entry(plane, f.TCP, (PEER7, 46000), (POD, 80))
    assert value.closing == structs.CT_FIN_AB | structs.CT_FIN_BA
    assert verdict(plane, "to_pod", syn)  # a new connection: judged (allowed) and admitted afresh
    _, value, _ = flow_entry(plane, f.TCP, (PEER7, 46000), (POD, 80))
    assert value.closing == 0 and value.flags[way] == structs.CT_INGRESS_OK


def flow_entry(
    plane: BpfDataplane, protocol: int, source: tuple[str, int], destination: tuple[str, int]
) -> tuple[structs.CtKey, structs.CtValue, int]:
    """The one conntrack entry of a flow, whichever way its packets ran, and the way
    (structs.WAY_*) that runs from `source` to `destination` ((address, port) pairs)."""

    def end(address: str, port: int) -> tuple[bytes, int]:
        return structs.addr_bytes(ipaddress.ip_address(address)), socket.htons(port)

    matches = []
    for key, value in plane._module[b"pf_ct"].items():
        a = (bytes(key.addr_a.bytes), int(key.port_a_be))
        b = (bytes(key.addr_b.bytes), int(key.port_b_be))
        if key.protocol == protocol and {a, b} == {end(*source), end(*destination)}:
            matches.append((key, value, structs.WAY_AB if a == end(*source) else structs.WAY_BA))
    assert len(matches) == 1, f"{len(matches)} entries for one flow"
    return matches[0]


def test_a_flow_and_its_replies_share_one_conntrack_entry_in_canonical_order(plane: BpfDataplane) -> None:
    apply(plane, iso(ident(7, f.TCP, 80, 80)), None)
    assert verdict(plane, "to_pod", f.tcp4(PEER7, POD, sport=41500, dport=80))
    reply = f.packet4(POD, PEER7, f.TCP, sport=80, dport=41500, tcp_flags=0x12)  # SYN+ACK
    assert verdict(plane, "from_pod", reply)
    assert verdict(plane, "egress", reply)
    key, value, way = flow_entry(plane, f.TCP, (PEER7, 41500), (POD, 80))
    assert value.flags[way] == structs.CT_INGRESS_OK  # the peer's way, admitted by the pod's ingress
    assert value.flags[1 - way] == 0  # the pod's replies opened nothing of their own
    assert value.slot[1 - way] != 0  # but their egress counters are known
    ends = [(bytes(key.addr_a.bytes), key.port_a_be), (bytes(key.addr_b.bytes), key.port_b_be)]
    words = [(*struct.unpack("=QQ", address), port) for address, port in ends]
    assert words[0] < words[1]  # end a sorts first: 64-bit words in host order, then the port


def test_tcp_fin_or_rst_moves_the_flow_to_the_closing_timeout_and_a_new_syn_back(plane: BpfDataplane) -> None:
    apply(plane, iso(ident(7, f.TCP, 80, 80)), None)
    syn = f.tcp4(PEER7, POD, sport=41000, dport=80)
    rst = f.eth(f.ETH_IP, f.ipv4(PEER7, POD, f.TCP, f.l4(f.TCP, 41000, 80, tcp_flags=0x14)))
    assert verdict(plane, "to_pod", syn)

    def flow() -> tuple[bool, int]:
        """(closing, flags of the way peer -> pod) of the one entry of the flow."""
        _, value, way = flow_entry(plane, f.TCP, (PEER7, 41000), (POD, 80))
        return bool(value.closing), int(value.flags[way])

    assert flow() == (False, structs.CT_INGRESS_OK)
    assert verdict(plane, "to_pod", rst)  # part of the flow: passes, and marks it closing
    assert flow() == (True, structs.CT_INGRESS_OK)
    assert verdict(plane, "to_pod", syn)  # the tuple reused by a new connection
    assert flow() == (False, structs.CT_INGRESS_OK)


def test_a_flow_entry_is_rewritten_only_once_its_timestamp_is_a_share_of_the_timeout_old(
    plane: BpfDataplane,
) -> None:
    apply(plane, iso(ident(7, f.UDP, 53, 53)), None)
    datagram = f.packet4(PEER7, POD, f.UDP, sport=42000, dport=53)
    assert verdict(plane, "to_pod", datagram)
    table = plane._module[b"pf_ct"]
    key, _, way = flow_entry(plane, f.UDP, (PEER7, 42000), (POD, 53))

    def age_by(seconds: float) -> int:
        value = table[key]
        value.last_seen_ns = time.monotonic_ns() - int(seconds * 1e9)  # pf_now()'s clock, finer
        table[key] = value
        return int(value.last_seen_ns)

    # UDP's timeout is 120 s: refreshed only when older than 120/64 = 1.875 s.
    stamp = age_by(1.0)
    assert verdict(plane, "to_pod", datagram)
    assert table[key].last_seen_ns == stamp
    before = time.monotonic_ns() - 50_000_000  # the datapath's coarse clock lags by up to a tick
    age_by(60.0)
    assert verdict(plane, "to_pod", datagram)
    assert table[key].last_seen_ns >= before
    assert table[key].flags[way] & structs.CT_INGRESS_OK


def egress_allowed_packets(plane: BpfDataplane) -> int:
    (counters,) = [c for c in plane.counters() if c.key == "ns/pod" and c.direction == "egress"]
    return counters.allowed_packets


def test_egress_fast_path_passes_known_flows_only_and_counts_them_for_the_pod(plane: BpfDataplane) -> None:
    apply(plane, None, iso(ident(7, f.TCP, 80, 80)))  # the pod may open TCP 80 to PEER7 only
    out = f.tcp4(POD, PEER7, sport=43000, dport=80)
    assert verdict(plane, "from_pod", out)  # records the tuple and the pod's counter slot
    assert verdict(plane, "egress", out)  # judged in full, admitted
    before = egress_allowed_packets(plane)
    assert verdict(plane, "egress", out)  # the fast path: known flow, counted for the pod
    assert egress_allowed_packets(plane) == before + 1
    # It is the fast path: without the pod's address entry the full judgement would pass the
    # packet uncounted ("not sent by a local pod"); the flow's entry alone names the pod.
    addresses = plane._module[b"pf_endpoint_ips"]
    (pod_key,) = [k for k in addresses if bytes(k.bytes)[12:] == socket.inet_aton(POD)]
    saved = addresses[pod_key]
    del addresses[pod_key]
    try:
        assert verdict(plane, "egress", out)
        assert egress_allowed_packets(plane) == before + 2
    finally:
        addresses[pod_key] = saved

    # What tc_from_pod records is no admission: a port the policy refuses stays refused.
    refused = f.tcp4(POD, PEER7, sport=43001, dport=81)
    for _ in range(2):
        assert verdict(plane, "from_pod", refused)
        assert not verdict(plane, "egress", refused)

    # A reply to what the pod's (open) ingress admitted passes without an egress rule for it.
    assert verdict(plane, "to_pod", f.tcp4(PEER8, POD, sport=44000, dport=8080))
    reply = f.eth(f.ETH_IP, f.ipv4(POD, PEER8, f.TCP, f.l4(f.TCP, 8080, 44000, tcp_flags=0x12)))  # SYN-ACK
    assert verdict(plane, "from_pod", reply)
    before = egress_allowed_packets(plane)
    assert verdict(plane, "egress", reply)
    assert verdict(plane, "egress", reply)
    assert egress_allowed_packets(plane) == before + 2
    # ... but not a packet of the pod's own to PEER8 on another tuple.
    assert verdict(plane, "from_pod", f.tcp4(POD, PEER8, sport=8080, dport=44001))
    assert not verdict(plane, "egress", f.tcp4(POD, PEER8, sport=8080, dport=44001))


def test_reset_mode_admits_a_new_tcp_flow_only_from_a_syn(plane: BpfDataplane) -> None:
    # The module plane runs with established_on_change="reset": after its conntrack entry is
    # deleted, a flow's mid-stream segment from either side must not start a flow of its own.
    apply(plane, None, None)  # not isolated: only the SYN rule can drop here
    ack_in = f.eth(f.ETH_IP, f.ipv4(PEER7, POD, f.TCP, f.l4(f.TCP, 42000, 80, tcp_flags=0x10)))
    ack_out = f.eth(f.ETH_IP, f.ipv4(POD, PEER7, f.TCP, f.l4(f.TCP, 80, 42000, tcp_flags=0x18)))
    syn_ack = f.eth(f.ETH_IP, f.ipv4(PEER7, POD, f.TCP, f.l4(f.TCP, 42001, 80, tcp_flags=0x12)))
    assert not verdict(plane, "to_pod", ack_in)
    assert not verdict(plane, "egress", ack_out)
    assert not verdict(plane, "to_pod", syn_ack)  # a SYN-ACK only answers a tracked SYN
    assert verdict(plane, "to_pod", f.tcp4(PEER7, POD, sport=42000, dport=80))  # a SYN starts it
    assert verdict(plane, "to_pod", ack_in)  # ... and the flow then continues
    assert verdict(plane, "egress", ack_out)  # with its replies
    assert verdict(plane, "to_pod", f.packet4(PEER7, POD, f.UDP, sport=42002, dport=53))  # TCP only


def test_a_half_written_update_is_finished_by_the_retry_without_id_reuse(
    plane: BpfDataplane, monkeypatch: pytest.MonkeyPatch
) -> None:
    apply(plane, iso(ident(7, f.TCP, 80, 80)), None)
    pod = Endpoint("ns/pod", (ipaddress.ip_address(POD),), iso(ident(8, f.TCP, 443, 443)), ifindex=1)
    failing = NodeState(2, {pod.key: pod}, IDENTITIES, (ipaddress.ip_address(NODE),), frozenset({1, 77}))

    def attach_fails(_sock: object, ifindex: int) -> None:
        # stands in for a netlink failure on the new interface, which a test cannot provoke
        raise PermanentDataplaneError(f"injected failure attaching {ifindex}")

    with monkeypatch.context() as patch:
        patch.setattr(plane, "_attach", attach_fails)
        with pytest.raises(PermanentDataplaneError, match="injected"):
            plane.apply(failing)
    # the endpoint flip happened before the failure: the new policy is already in force
    assert verdict(plane, "to_pod", f.tcp4(PEER8, POD, dport=443))
    assert not verdict(plane, "to_pod", f.tcp4(PEER7, POD, dport=80, sport=40100))
    # a retry with yet another content must not reuse an id that is live in the maps
    apply(plane, iso(ident(7, f.UDP, 53, 53)), None, version=3)
    assert verdict(plane, "to_pod", f.packet4(PEER7, POD, f.UDP, dport=53))
    assert not verdict(plane, "to_pod", f.tcp4(PEER8, POD, dport=443, sport=40101))
    assert not verdict(plane, "to_pod", f.tcp4(PEER7, POD, dport=80, sport=40102))
    usage = plane.map_usage()
    assert (usage["policy_exact"][0], usage["policy"][0]) == (1, 0)  # UDP 53: one port, the hash


def test_conntrack_usage_counts_what_the_kernel_holds(plane: BpfDataplane) -> None:
    apply(plane, iso(ident(7, f.UDP, 53, 53)), None)
    plane._module[b"pf_ct"].clear()
    for sport in range(43000, 43000 + 300):  # one flow each
        assert verdict(plane, "to_pod", f.packet4(PEER7, POD, f.UDP, sport=sport, dport=53))
    held = sum(1 for _ in plane._module[b"pf_ct"])  # one get_next_key per entry
    assert held >= 300
    assert plane.map_usage()["ct"][0] == held  # batched lookups, a few syscalls
    assert count_entries(plane._module[b"pf_ct"], chunk=7) == held  # many batches, same answer


def test_single_port_entries_an_older_version_left_in_the_lpm_trie_move_to_the_hash(
    plane: BpfDataplane,
) -> None:
    """After an upgrade no single-port allow may stay behind in the trie, where the writer would
    never delete it: the new agent moves them at start, and the verdicts never change."""
    apply(plane, iso(ident(7, f.TCP, 80, 80), ident(7, f.TCP, 1000, 1003)), None)
    trie, exact = plane._module[b"pf_policy"], plane._module[b"pf_policy_exact"]
    (single,) = list(exact.keys())
    assert {k.prefixlen for k in trie} == {structs.POLICY_PREFIX_FULL - 2}  # 1000-1003
    # what the previous version kept: the single port in the trie, none in the hash
    key = trie.Key(
        single.prefixlen,
        single.policy_id,
        single.peer_class,
        single.peer_kind,
        single.protocol,
        single.dport_be,
    )
    trie[key] = trie.Leaf(1, 0)
    del exact[single]
    assert verdict(plane, "to_pod", f.tcp4(PEER7, POD, sport=44000, dport=80))  # the trie allows
    plane.close()
    plane.start()
    exact, trie = plane._module[b"pf_policy_exact"], plane._module[b"pf_policy"]
    assert len(list(exact.keys())) == 1
    assert {k.prefixlen for k in trie} == {structs.POLICY_PREFIX_FULL - 2}
    assert verdict(plane, "to_pod", f.tcp4(PEER7, POD, sport=44001, dport=80))
    apply(plane, iso(ident(7, f.TCP, 1000, 1003)), None, version=2)  # the port-80 rule goes
    assert not verdict(plane, "to_pod", f.tcp4(PEER7, POD, sport=44002, dport=80))
    assert verdict(plane, "to_pod", f.tcp4(PEER7, POD, sport=44003, dport=1002))


def test_layer_2_drops_are_counted_under_their_own_reasons(plane: BpfDataplane) -> None:
    apply(plane, None, None, mac=MAC_B)
    before = plane.drop_reason_counts()
    cases = {
        "vlan_tagged": f.vlan_tagged(f.tcp4(POD, PEER7)),
        "spoofed_mac": with_source(f.tcp4(POD, PEER7), f.MAC_A),
        "spoofed_arp": with_source(f.arp(POD, "10.0.0.254", sender_mac=f.MAC_A), f.MAC_B),
        "rogue_ndp": f.router_advertisement("fe80::2"),
        "spoofed_ndp": f.neighbour_advertisement(POD6, "fe80::1", POD6, f.nd_option(2, f.MAC_A)),
        "malformed": f.arp(POD, "10.0.0.254", trailer=bytes(19)),
        "ip_options": f.tcp4(POD, NODE, options=LSRR_VIA_PEER7),
    }
    for frame in cases.values():
        assert not verdict(plane, "from_pod", frame)
    after = plane.drop_reason_counts()
    assert {reason: after[reason] - before.get(reason, 0) for reason in cases} == dict.fromkeys(cases, 1)


def test_host_prefixes_live_in_the_hash_and_an_older_versions_move_there(plane: BpfDataplane) -> None:
    """Host prefixes are looked up in pf_cidr_host; one an older version left in the trie is
    moved at start (the writer would never find it there), and verdicts never change."""
    apply(plane, iso(cidr("10.0.1.7/32", protocol=f.TCP, first=80, last=80), cidr("10.0.3.0/24")), None)
    trie, host = plane._module[b"pf_cidr"], plane._module[b"pf_cidr_host"]
    (entry,) = list(host.items())
    assert {k.prefixlen - structs.GENERATION_PREFIX for k in trie} == {96 + 24}
    # what the previous version kept: the /32 in the trie, nothing in the hash
    key = trie.Key()
    key.prefixlen = structs.GENERATION_PREFIX + structs.HOST_PREFIX
    key.generation = entry[0].generation
    key.addr.bytes[:] = entry[0].addr.bytes[:]
    trie[key] = trie.Leaf(entry[1].class_id, 0)
    del host[entry[0]]
    assert verdict(plane, "to_pod", f.tcp4(PEER7, POD, sport=45000, dport=80))  # the trie allows
    plane.close()
    plane.start()
    trie, host = plane._module[b"pf_cidr"], plane._module[b"pf_cidr_host"]
    assert len(list(host.keys())) == 1
    assert {k.prefixlen - structs.GENERATION_PREFIX for k in trie} == {96 + 24}
    assert verdict(plane, "to_pod", f.tcp4(PEER7, POD, sport=45001, dport=80))
    apply(plane, iso(cidr("10.0.3.0/24")), None, version=2)  # the host peer goes
    assert not verdict(plane, "to_pod", f.tcp4(PEER7, POD, sport=45002, dport=80))
    assert not list(plane._module[b"pf_cidr_host"].keys())
