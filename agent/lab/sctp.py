"""Just enough SCTP (RFC 9260) to judge a probe on a kernel without SCTP sockets.

The lab kernel has no SCTP stack but conntrack and the dataplanes understand SCTP, so a probe
is an INIT sent over a raw IP socket (protocol 132) and an answer is the INIT ACK that the pod's
server crafts on its own raw socket. The association never completes; a probe only needs to know
whether the INIT got through and its reply came back, as `agnhost connect --protocol=sctp` does.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

IPPROTO_SCTP = 132
CHUNK_INIT = 1
CHUNK_INIT_ACK = 2
PARAM_STATE_COOKIE = 7
_COMMON_HEADER = struct.Struct("!HHI4s")  # src port, dst port, verification tag, checksum
_INIT_BODY = struct.Struct("!BBHIIHHI")  # type, flags, length, initiate tag, a_rwnd, OS, MIS, TSN
_ADVERTISED_WINDOW = 65535
_STREAMS = 10


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), the SCTP checksum; no declared dependency provides it."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _with_checksum(packet: bytes) -> bytes:
    # The checksum field is zero while computing it and is stored least significant byte first.
    zeroed = packet[:8] + b"\0\0\0\0" + packet[12:]
    return zeroed[:8] + struct.pack("<I", crc32c(zeroed)) + zeroed[12:]


@dataclass(frozen=True)
class InitChunk:
    """The fields of an INIT or INIT ACK that a probe cares about, plus the ports around it."""

    src_port: int
    dst_port: int
    verification_tag: int  # from the common header
    chunk_type: int
    initiate_tag: int


def build_init(src_port: int, dst_port: int, initiate_tag: int) -> bytes:
    chunk = _INIT_BODY.pack(
        CHUNK_INIT, 0, _INIT_BODY.size, initiate_tag, _ADVERTISED_WINDOW, _STREAMS, _STREAMS, 1
    )
    return _with_checksum(_COMMON_HEADER.pack(src_port, dst_port, 0, b"\0\0\0\0") + chunk)


def build_init_ack(init: InitChunk, initiate_tag: int) -> bytes:
    """The answer to `init`; it travels with the peer's initiate tag as its verification tag."""
    cookie = b"podfence-lab-cookie\0"  # padded to 4 bytes; never checked since no COOKIE ECHO follows
    cookie_param = struct.pack("!HH", PARAM_STATE_COOKIE, 4 + len(cookie)) + cookie
    length = _INIT_BODY.size + len(cookie_param)
    chunk = (
        _INIT_BODY.pack(CHUNK_INIT_ACK, 0, length, initiate_tag, _ADVERTISED_WINDOW, _STREAMS, _STREAMS, 1)
        + cookie_param
    )
    header = _COMMON_HEADER.pack(init.dst_port, init.src_port, init.initiate_tag, b"\0\0\0\0")
    return _with_checksum(header + chunk)


def parse_sctp(sctp: bytes) -> InitChunk | None:
    """The first chunk of an SCTP packet, if it is a well-formed INIT or INIT ACK with a valid checksum."""
    if len(sctp) < _COMMON_HEADER.size + _INIT_BODY.size:
        return None
    src_port, dst_port, vtag, checksum = _COMMON_HEADER.unpack_from(sctp)
    if struct.unpack("<I", checksum)[0] != crc32c(sctp[:8] + b"\0\0\0\0" + sctp[12:]):
        return None
    chunk_type, _flags, _length, initiate_tag, *_ = _INIT_BODY.unpack_from(sctp, _COMMON_HEADER.size)
    if chunk_type not in (CHUNK_INIT, CHUNK_INIT_ACK):
        return None
    return InitChunk(src_port, dst_port, vtag, chunk_type, initiate_tag)


def strip_ipv4_header(packet: bytes) -> bytes | None:
    """The payload of an IPv4 datagram as a raw IPv4 socket reads it (raw IPv6 sockets get no header)."""
    if len(packet) < 20 or packet[0] >> 4 != 4:
        return None
    return packet[(packet[0] & 0x0F) * 4 :]


def parse_ip_packet(packet: bytes) -> tuple[str, InitChunk] | None:
    """Source address and first chunk of an IPv4 datagram read from a raw SCTP socket."""
    if len(packet) < 20 or packet[9] != IPPROTO_SCTP:
        return None
    payload = strip_ipv4_header(packet)
    chunk = parse_sctp(payload) if payload is not None else None
    if chunk is None:
        return None
    return ".".join(str(b) for b in packet[12:16]), chunk
