"""Hand-built Ethernet frames for the BPF packet tables (no scapy here). Checksums are left at
zero: the programs never verify them, the kernel does that elsewhere."""

from __future__ import annotations

import ipaddress
import struct

ETH_IP, ETH_IP6, ETH_ARP = 0x0800, 0x86DD, 0x0806
TCP, UDP, ICMP, ICMP6, SCTP = 6, 17, 1, 58, 132
MAC_A, MAC_B = bytes.fromhex("020000000001"), bytes.fromhex("020000000002")


def eth(ethertype: int, payload: bytes) -> bytes:
    return MAC_A + MAC_B + struct.pack("!H", ethertype) + payload


def l4(
    protocol: int,
    sport: int = 40000,
    dport: int = 80,
    icmp_type: int = 8,
    icmp_id: int = 7,
    tcp_flags: int = 0x02,
) -> bytes:
    if protocol == TCP:
        return struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, tcp_flags, 65535, 0, 0)
    if protocol == UDP:
        return struct.pack("!HHHH", sport, dport, 8, 0)
    if protocol == SCTP:
        return struct.pack("!HHII", sport, dport, 1, 0)
    if protocol in (ICMP, ICMP6):
        return struct.pack("!BBHHH", icmp_type, 0, 0, icmp_id, 1)
    return b"\0" * 8


def ipv4(
    src: str,
    dst: str,
    protocol: int,
    payload: bytes,
    *,
    options: bytes = b"",
    frag_id: int = 1,
    more_fragments: bool = False,
    frag_offset: int = 0,
) -> bytes:
    ihl = 5 + len(options) // 4
    flags = (0x2000 if more_fragments else 0) | (frag_offset // 8)
    header = struct.pack(
        "!BBHHHBBH4s4s",
        (4 << 4) | ihl,
        0,
        ihl * 4 + len(payload),
        frag_id,
        flags,
        64,
        protocol,
        0,
        ipaddress.IPv4Address(src).packed,
        ipaddress.IPv4Address(dst).packed,
    )
    return header + options + payload


def ipv6(src: str, dst: str, next_header: int, payload: bytes, hop_limit: int = 64) -> bytes:
    header = struct.pack(
        "!IHBB16s16s",
        6 << 28,
        len(payload),
        next_header,
        hop_limit,
        ipaddress.IPv6Address(src).packed,
        ipaddress.IPv6Address(dst).packed,
    )
    return header + payload


def ext_header(next_header: int, length_units: int = 0) -> bytes:
    """Hop-by-hop / destination options header of (length_units + 1) * 8 bytes (PadN filled)."""
    size = (length_units + 1) * 8
    return struct.pack("!BB", next_header, length_units) + b"\x01" + bytes([size - 3]) + b"\0" * (size - 4)


def frag6_header(next_header: int, offset: int, more: bool, ident: int) -> bytes:
    return struct.pack("!BBHI", next_header, 0, (offset // 8) << 3 | int(more), ident)


def tcp4(src: str, dst: str, sport: int = 40000, dport: int = 80, **ip_options: object) -> bytes:
    return eth(ETH_IP, ipv4(src, dst, TCP, l4(TCP, sport, dport), **ip_options))  # type: ignore[arg-type]


def packet4(src: str, dst: str, protocol: int, sport: int = 40000, dport: int = 80, **kw: object) -> bytes:
    return eth(ETH_IP, ipv4(src, dst, protocol, l4(protocol, sport, dport, **kw)))  # type: ignore[arg-type]


def tcp6(src: str, dst: str, sport: int = 40000, dport: int = 80, extensions: tuple[int, ...] = ()) -> bytes:
    """IPv6 TCP with the given extension header types (0 hop-by-hop, 60 dest options) in front."""
    payload = l4(TCP, sport, dport)
    chain = [*extensions, TCP]
    headers = b""
    for index in range(len(extensions)):
        headers += ext_header(chain[index + 1])
    return eth(ETH_IP6, ipv6(src, dst, chain[0], headers + payload))


def icmp4_error(src: str, dst: str, embedded: bytes, icmp_type: int = 3) -> bytes:
    """ICMP error (default: destination unreachable) quoting an IPv4 packet (header + 8 bytes)."""
    quoted = embedded[: (embedded[0] & 0x0F) * 4 + 8]
    return eth(ETH_IP, ipv4(src, dst, ICMP, struct.pack("!BBHI", icmp_type, 1, 0, 0) + quoted))


def arp(sender_ip: str, target_ip: str) -> bytes:
    body = struct.pack(
        "!HHBBH6s4s6s4s",
        1,
        ETH_IP,
        6,
        4,
        1,
        MAC_A,
        ipaddress.IPv4Address(sender_ip).packed,
        b"\0" * 6,
        ipaddress.IPv4Address(target_ip).packed,
    )
    return eth(ETH_ARP, body)


def strip_eth(frame: bytes) -> bytes:
    return frame[14:]
