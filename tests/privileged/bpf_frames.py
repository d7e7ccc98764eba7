"""Hand-built Ethernet frames for the BPF packet tables (no scapy here). Checksums are left at
zero: the programs never verify them, the kernel does that elsewhere."""

from __future__ import annotations

import ipaddress
import struct

ETH_IP, ETH_IP6, ETH_ARP = 0x0800, 0x86DD, 0x0806
TCP, UDP, ICMP, ICMP6, SCTP = 6, 17, 1, 58, 132
MAC_A, MAC_B = bytes.fromhex("020000000001"), bytes.fromhex("020000000002")


def eth(ethertype: int, payload: bytes, source: bytes = MAC_B) -> bytes:
    return MAC_A + source + struct.pack("!H", ethertype) + payload


def vlan_tagged(frame: bytes, vid: int = 0, tpid: int = 0x8100) -> bytes:
    """`frame` with a VLAN tag inserted after its MAC addresses. A test run does not move the
    tag into skb metadata as a receiving device does: the tag stays in the frame and its TPID is
    what the program sees as skb->protocol (as for a double-tagged frame's inner tag)."""
    return frame[:12] + struct.pack("!HH", tpid, vid) + frame[12:]


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


def arp(
    sender_ip: str,
    target_ip: str,
    sender_mac: bytes = MAC_B,
    op: int = 1,
    trailer: bytes = b"",
    hardware: int = 1,
) -> bytes:
    """Ethernet/IPv4 ARP sent from `sender_mac`, `trailer` after its 28 bytes."""
    body = struct.pack(
        "!HHBBH6s4s6s4s",
        hardware,
        ETH_IP,
        6,
        4,
        op,
        sender_mac,
        ipaddress.IPv4Address(sender_ip).packed,
        b"\0" * 6,
        ipaddress.IPv4Address(target_ip).packed,
    )
    return eth(ETH_ARP, body + trailer, sender_mac)


def nd_option(kind: int, value: bytes) -> bytes:
    """An NDP option of one 8-byte unit (link-layer address 1/2, nonce 14)."""
    return struct.pack("!BB", kind, 1) + value.ljust(6, b"\0")


def icmp6(
    src: str, dst: str, icmp_type: int, body: bytes, hop_limit: int = 255, source_mac: bytes = MAC_B
) -> bytes:
    """ICMPv6 message `icmp_type` with `body` after its 4-byte header (checksum left at zero)."""
    return eth(
        ETH_IP6, ipv6(src, dst, ICMP6, struct.pack("!BBH", icmp_type, 0, 0) + body, hop_limit), source_mac
    )


def neighbour_solicitation(src: str, dst: str, target: str, options: bytes = b"", **kw: object) -> bytes:
    return icmp6(src, dst, 135, b"\0" * 4 + ipaddress.IPv6Address(target).packed + options, **kw)  # type: ignore[arg-type]


def neighbour_advertisement(src: str, dst: str, target: str, options: bytes = b"", **kw: object) -> bytes:
    body = struct.pack("!I", 0x60000000) + ipaddress.IPv6Address(target).packed + options
    return icmp6(src, dst, 136, body, **kw)  # type: ignore[arg-type]


def router_advertisement(src: str, hop_limit_advertised: int = 1) -> bytes:
    """A router advertisement telling every host on the link to use `hop_limit_advertised`."""
    body = struct.pack("!BBHII", hop_limit_advertised, 0, 1800, 0, 0)
    return icmp6(src, "ff02::1", 134, body)


def mld_report(src: str, groups: tuple[str, ...], record_type: int = 4, sources: int = 0) -> bytes:
    """MLDv2 report (with the hop-by-hop router alert MLD carries) of one record per group."""
    records = b"".join(
        struct.pack("!BBH16s", record_type, 0, sources, ipaddress.IPv6Address(g).packed)
        + b"\0" * 16 * sources
        for g in groups
    )
    report = struct.pack("!BBHHH", 143, 0, 0, 0, len(groups)) + records
    router_alert = struct.pack("!BBBBHBB", ICMP6, 0, 5, 2, 0, 1, 0)
    return eth(ETH_IP6, ipv6(src, "ff02::16", 0, router_alert + report, hop_limit=1))


def strip_eth(frame: bytes) -> bytes:
    return frame[14:]
