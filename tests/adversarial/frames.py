"""Hostile frames, built with scapy, and the matchers that recognise them at the receiver.

A builder takes the lab and a fresh marker and returns the frames to send in order; the marker
rides in the payload where there is one, and in the IP identification / fragment id where a frame
has no room for it (a fragment that stops inside the L4 header).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption
from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment
from scapy.layers.l2 import Ether
from scapy.packet import Packet, Raw

from tests.adversarial.harness import Lab, Member

TCP_FLAGS = {"ACK": "A", "FIN": "F", "RST": "R", "NULL": "", "XMAS": "FPU", "SYN+ACK": "SA", "FIN+ACK": "FA"}
SPORT = 40001


def ident16(mark: bytes) -> int:
    """An IPv4 identification drawn from the marker (the marker's random part)."""
    return int(mark[-4:], 16) or 1


def ident32(mark: bytes) -> int:
    """An IPv6 fragment id drawn from the marker."""
    return int(mark[-8:], 16) or 1


def frame(
    lab: Lab,
    l3: Packet,
    sender: Member | None = None,
    receiver: Member | None = None,
    *,
    to_node: bool = False,
) -> bytes:
    """`l3` on the wire from `sender` (the attacker) towards `receiver` (the victim), or to the
    node itself (its gateway address)."""
    sender = sender or lab.attacker
    receiver = receiver or lab.victim
    destination = sender.gateway_mac if to_node else lab.next_hop_mac(sender, receiver)
    return bytes(Ether(src=sender.mac, dst=destination) / l3)


def ip4(lab: Lab, src: str | None = None, dst: str | None = None, **kw: Any) -> IP:
    return IP(src=src or lab.attacker.ip, dst=dst or lab.victim.ip, **kw)


def ip6(lab: Lab, src: str | None = None, dst: str | None = None, **kw: Any) -> IPv6:
    return IPv6(src=src or lab.attacker.ip6, dst=dst or lab.victim.ip6, **kw)


def tcp(dport: int, flags: str = "S") -> TCP:
    return TCP(sport=SPORT, dport=dport, flags=flags, seq=1000, ack=(1 if "A" in flags else 0))


def udp(dport: int) -> UDP:
    return UDP(sport=SPORT, dport=dport)


def raw_options(data: bytes) -> list[IPOption]:
    return [IPOption(data)]


# ---- matchers ------------------------------------------------------------------------------------


def ipv4_fragment_with(ident: int, offset: int, dport: int | None = None) -> Callable[[bytes], bool]:
    """An IPv4 packet with this id and fragment offset (8-byte units); with `dport`, its L4
    destination port (a first fragment) must be that port."""

    def match(data: bytes) -> bool:
        packet = Ether(data)
        if IP not in packet:
            return False
        ip = packet[IP]
        if ip.id != ident or ip.frag != offset:
            return False
        if dport is None:
            return True
        body = bytes(ip.payload)
        return len(body) >= 4 and struct.unpack("!H", body[2:4])[0] == dport

    return match


def ipv6_fragment_with(ident: int, offset: int) -> Callable[[bytes], bool]:
    def match(data: bytes) -> bool:
        packet = Ether(data)
        return IPv6ExtHdrFragment in packet and (
            packet[IPv6ExtHdrFragment].id == ident and packet[IPv6ExtHdrFragment].offset == offset
        )

    return match


def fragments4(lab: Lab, mark: bytes, dport: int, *, first_l4: int | None = None) -> list[bytes]:
    """A TCP datagram to `dport` cut in two at the 8-byte boundary after `first_l4` L4 bytes
    (default: after the TCP header); the marker is the payload, and the id."""
    whole = bytes(tcp(dport) / Raw(mark + b"." * 16))
    cut = first_l4 if first_l4 is not None else 24
    first = ip4(lab, id=ident16(mark), flags="MF", frag=0, proto=6) / Raw(whole[:cut])
    later = ip4(lab, id=ident16(mark), frag=cut // 8, proto=6) / Raw(whole[cut:])
    return [frame(lab, first), frame(lab, later)]


def echo4(lab: Lab, mark: bytes, **kw: Any) -> bytes:
    return frame(lab, ip4(lab, **kw) / ICMP(type=8, id=7, seq=1) / Raw(mark))
