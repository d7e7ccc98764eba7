"""Frames a hostile pod sends that the kernel drops before the netfilter hooks, and the check that
no "reply" from a peer reaches the pod afterwards (issue 21, item 2); shared by the BPF and
iptables dataplane tests. Unlike bpf_frames, these carry valid checksums where the kernel checks
them: they are sent on real interfaces."""

from __future__ import annotations

import ipaddress
import secrets
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.lab import wiring

TOOL = Path(__file__).with_name("raw_frames_tool.py")
UDP = 17


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ipv4_udp(
    src: str,
    dst: str,
    sport: int,
    dport: int,
    *,
    ttl: int = 64,
    options: bytes = b"",
    bad_sum: bool = False,
    length_delta: int = 0,
) -> bytes:
    """`length_delta`: added to the header's total length (not to the packet)."""
    payload = struct.pack("!HHHH", sport, dport, 8, 0)  # UDP checksum 0: none (IPv4 allows it)
    ihl = 5 + len(options) // 4
    header = (
        struct.pack(
            "!BBHHHBBH4s4s",
            (4 << 4) | ihl,
            0,
            ihl * 4 + len(payload) + length_delta,
            secrets.randbelow(65536),
            0,
            ttl,
            UDP,
            0,
            ipaddress.IPv4Address(src).packed,
            ipaddress.IPv4Address(dst).packed,
        )
        + options
    )
    check = checksum(header) ^ (0xFFFF if bad_sum else 0)
    return header[:10] + struct.pack("!H", check) + header[12:] + payload


def raw_ipv4(src: str, dst: str, protocol: int, payload: bytes) -> bytes:
    """An IPv4 packet of `protocol` (the kernel fills in the header checksum of a raw socket)."""
    source, destination = ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed
    header = struct.pack("!BBHHHBBH", 0x45, 0, 20 + len(payload), 0, 0, 64, protocol, 0)
    return header + source + destination + payload


def ipv6_udp(src: str, dst: str, sport: int, dport: int, *, hop_limit: int = 64) -> bytes:
    source, destination = ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed
    udp = struct.pack("!HHHH", sport, dport, 8, 0)
    pseudo = source + destination + struct.pack("!IxxxB", len(udp), UDP)
    udp = udp[:6] + struct.pack("!H", checksum(pseudo + udp) or 0xFFFF)
    return struct.pack("!IHBB", 6 << 28, len(udp), UDP, hop_limit) + source + destination + udp


def ethernet(destination_mac: str, source_mac: str, packet: bytes) -> bytes:
    ethertype = 0x0800 if packet[0] >> 4 == 4 else 0x86DD
    macs = bytes.fromhex(destination_mac.replace(":", "") + source_mac.replace(":", ""))
    return macs + struct.pack("!H", ethertype) + packet


@dataclass(frozen=True)
class Attack:
    """A UDP packet from the pod (`source`:`sport`) to its peer, as a frame on the pod's eth0
    (`gateway_mac`: the host side of its veth, `pod_mac`: its own)."""

    source: str
    destination: str
    sport: int
    dport: int
    gateway_mac: str
    pod_mac: str

    def ipv4(self, **options: Any) -> bytes:
        return ipv4_udp(self.source, self.destination, self.sport, self.dport, **options)

    def ipv6(self, **options: Any) -> bytes:
        return ipv6_udp(self.source, self.destination, self.sport, self.dport, **options)

    def frame(self, packet: bytes, destination_mac: str | None = None) -> bytes:
        return ethernet(destination_mac or self.gateway_mac, self.pod_mac, packet)


# loose source route (type 131, length 7, pointer 4, one hop) and end of options
def _source_route(attack: Attack) -> bytes:
    return bytes([131, 7, 4]) + ipaddress.IPv4Address(attack.destination).packed + b"\0"


# (name, family, frame): what the kernel drops between tc ingress and the netfilter hooks
DROPPED_BEFORE_THE_HOOK: list[tuple[str, int, Callable[[Attack], bytes]]] = [
    ("ttl 1", 4, lambda a: a.frame(a.ipv4(ttl=1))),
    ("bad ip checksum", 4, lambda a: a.frame(a.ipv4(bad_sum=True))),
    ("foreign destination mac", 4, lambda a: a.frame(a.ipv4(), destination_mac="02:00:5e:00:53:01")),
    ("source route option", 4, lambda a: a.frame(a.ipv4(options=_source_route(a)))),  # accept_source_route 0
    ("hop limit 1", 6, lambda a: a.frame(a.ipv6(hop_limit=1))),
    # longer than the frame: dropped; shorter: cut to the IP header, so the hook sees no ports
    ("total length beyond the frame", 4, lambda a: a.frame(a.ipv4(length_delta=4))),
    ("total length of the ip header alone", 4, lambda a: a.frame(a.ipv4(length_delta=-8))),
]

# A frame the kernel forwards to the hook: the control that shows a reply is seen when a path is open.
FORWARDED: dict[int, Callable[[Attack], bytes]] = {
    4: lambda a: a.frame(a.ipv4()),
    6: lambda a: a.frame(a.ipv6()),
}


def enter(netns: str, *argv: str) -> list[str]:
    return wiring.argv_in(netns, argv)


link_mac = wiring.mac


def reply_reaches(attacker_netns: str, peer_netns: str, attack: Attack, frame: bytes) -> bool:
    """The attacker pod sends `frame` (`attack`'s packet), then the peer sends a datagram back
    from the attack's destination port to its source port: does it reach the attacker's eth0?"""
    marker = f"podfence-{secrets.token_hex(6)}"
    sniffer = subprocess.Popen(
        enter(attacker_netns, sys.executable, str(TOOL), "sniff", "eth0", "1.5", marker),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert sniffer.stdout is not None
        assert sniffer.stdout.readline().strip() == "ready"
        send = enter(attacker_netns, sys.executable, str(TOOL), "send", "eth0", frame.hex())
        subprocess.run(send, check=True, timeout=30)
        answer = ["udp", str(attack.dport), attack.source, str(attack.sport), marker]
        subprocess.run(enter(peer_netns, sys.executable, str(TOOL), *answer), check=True, timeout=30)
        return sniffer.stdout.readline().strip() == "seen"
    finally:
        sniffer.wait(timeout=10)


def answered(
    attacker_netns: str,
    peer_netns: str,
    addresses: dict[int, tuple[str, str]],
    macs: tuple[str, str],
    frames: list[tuple[str, int, Callable[[Attack], bytes]]],
    first_port: int,
) -> list[str]:
    """The names of `frames` (name, family, frame) after which the peer's answer reached the
    attacker. `addresses`: family -> (attacker, peer); `macs`: (gateway, attacker); each frame
    gets ports of its own from `first_port` on."""
    reached = []
    for index, (name, family, build) in enumerate(frames):
        attack = Attack(*addresses[family], first_port + index, first_port + 1000 + index, *macs)
        if reply_reaches(attacker_netns, peer_netns, attack, build(attack)):
            reached.append(name)
    return reached


def forwarded() -> list[tuple[str, int, Callable[[Attack], bytes]]]:
    return [(f"forwarded ipv{family}", family, build) for family, build in FORWARDED.items()]


def raw_reaches(victim_netns: str, sender_netns: str, build: Callable[[bytes], bytes]) -> bool:
    """Does the IPv4 packet `build(marker)`, sent through a raw socket in `sender_netns`, reach
    the victim pod's eth0?"""
    marker = f"podfence-{secrets.token_hex(6)}"
    sniffer = subprocess.Popen(
        enter(victim_netns, sys.executable, str(TOOL), "sniff", "eth0", "1.5", marker),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert sniffer.stdout is not None
        assert sniffer.stdout.readline().strip() == "ready"
        packet = build(marker.encode())
        send = enter(sender_netns, sys.executable, str(TOOL), "ip", packet.hex())
        subprocess.run(send, check=True, timeout=30)
        return sniffer.stdout.readline().strip() == "seen"
    finally:
        sniffer.wait(timeout=10)


def icmp_error(source: str, destination: str, quoted: bytes) -> Callable[[bytes], bytes]:
    """An IPv4 ICMP port unreachable quoting `quoted`, a marker as payload after it."""

    def build(marker: bytes) -> bytes:
        body = bytes([3, 3, 0, 0, 0, 0, 0, 0]) + quoted + marker
        body = body[:2] + checksum(body).to_bytes(2, "big") + body[4:]
        return raw_ipv4(source, destination, 1, body)

    return build


def forged_errors_seen(victim: Any, peer: Any, hostile: Any) -> dict[str, bool]:
    """`victim` (ingress isolated, egress open to `peer` for UDP) and `hostile` (whom the victim's
    ingress denies) each send a datagram to `peer`; then ICMP errors with a payload go to the
    victim. Which reach it? Pods: anything with netns and ip."""
    for pod, sport in ((victim, 45000), (hostile, 45001)):
        flow = ["udp", str(sport), peer.ip, "9999", "hello"]
        subprocess.run(enter(pod.netns, sys.executable, str(TOOL), *flow), check=True, timeout=30)
    sent, hostile_sent = ipv4_udp(victim.ip, peer.ip, 45000, 9999), ipv4_udp(hostile.ip, peer.ip, 45001, 9999)
    cases = {
        "from the peer, about the victim's packet": (peer, sent),
        "from a pod claiming to route the victim's packet": (hostile, sent),
        "from a pod, about its own packet": (hostile, hostile_sent),
        "from the peer, about another pod's packet": (peer, hostile_sent),
    }
    return {
        name: raw_reaches(victim.netns, sender.netns, icmp_error(sender.ip, victim.ip, quoted))
        for name, (sender, quoted) in cases.items()
    }


FORGED_ERRORS_EXPECTED = {
    "from the peer, about the victim's packet": True,  # the control: a related error
    "from a pod claiming to route the victim's packet": False,
    "from a pod, about its own packet": False,
    "from the peer, about another pod's packet": False,
}
