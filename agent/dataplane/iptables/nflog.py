"""An NFLOG reader: the netlink socket of nfnetlink_log, bound to one group, decoded by hand.

No maintained Python library reads NFLOG: pyroute2 (0.9) has no nfnetlink_log messages, and
the PyPI bindings (nflog, nflogr) are C extensions around libnetfilter_log, one last released
in 2016, the other calling itself beta and possibly unsafe. The protocol is small and stable
(linux/netfilter/nfnetlink_log.h): a config message binds the group, then each logged packet
arrives as one NFULNL_MSG_PACKET of attributes (prefix, interfaces, payload, sequence number).

Losses are counted exactly: the group runs with NFULNL_CFG_F_SEQ, so every message carries the
instance's sequence number and a gap is the number of messages the kernel could not queue to a
full socket (it never waits for the reader: logging costs the datapath the same, read or not).
"""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

NETLINK_NETFILTER = 12
NFNL_SUBSYS_ULOG = 4
NFULNL_MSG_PACKET = 0
NFULNL_MSG_CONFIG = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4

# config attributes and values
NFULA_CFG_CMD = 1
NFULA_CFG_MODE = 2
NFULA_CFG_NLBUFSIZ = 3
NFULA_CFG_TIMEOUT = 4
NFULA_CFG_QTHRESH = 5
NFULA_CFG_FLAGS = 6
NFULNL_CFG_CMD_BIND = 1
NFULNL_CFG_CMD_UNBIND = 2
NFULNL_COPY_PACKET = 2
NFULNL_CFG_F_SEQ = 0x1

# packet attributes
NFULA_PACKET_HDR = 1
NFULA_TIMESTAMP = 3
NFULA_IFINDEX_INDEV = 4
NFULA_IFINDEX_OUTDEV = 5
NFULA_IFINDEX_PHYSINDEV = 6
NFULA_IFINDEX_PHYSOUTDEV = 7
NFULA_PAYLOAD = 9
NFULA_PREFIX = 10
NFULA_SEQ = 12

_NLMSGHDR = struct.Struct("=IHHII")
_NFGENMSG = struct.Struct("=BBH")  # family, version, res_id (big-endian, packed by hand)
_NLATTR = struct.Struct("=HH")
_NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED / NLA_F_NET_BYTEORDER
_BE32 = struct.Struct(">I")

# Bytes of each packet copied to user space: the IPv4/IPv6 header, a few extension headers and
# the ports. Records need no more, and a small copy keeps a flood cheap to queue.
COPY_BYTES = 128
# Kernel-side batching: a message waits at most this long (1/100 s) before it is sent. A lone
# flow waits it in full (no batch fills), so it is part of every quiet flow's delay to `observe`.
_FLUSH_TIMEOUT_CS = 1
# Messages the kernel gathers into one netlink packet before sending (or the page-sized buffer
# fills, or the timeout passes): a new-connection storm costs the reader one wake-up and one
# recv per batch instead of per flow.
_BATCH = 32
RECEIVE_BUFFER = 4 << 20  # socket receive buffer: what queues while the reader is busy (~20k messages)


class NflogError(OSError):
    """The group could not be bound (taken by another listener, no nfnetlink_log, no rights)."""


@dataclass(frozen=True)
class NflogPacket:
    """One logged packet: the rule's prefix, where the packet was, and its first bytes."""

    prefix: str
    indev: int
    outdev: int
    physindev: int
    physoutdev: int
    payload: bytes  # from the network header on, at most COPY_BYTES
    length: int  # the packet's full length (IPv4 total length or IPv6 header + payload length)
    time_ns: int  # the kernel's timestamp when it has one, else 0


def _attribute(kind: int, value: bytes) -> bytes:
    length = _NLATTR.size + len(value)
    return _NLATTR.pack(length, kind) + value + b"\0" * (-length % 4)


def _config_message(group: int, sequence: int, attributes: bytes) -> bytes:
    body = _NFGENMSG.pack(socket.AF_UNSPEC, 0, socket.htons(group)) + attributes
    kind = (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, NLM_F_REQUEST | NLM_F_ACK, sequence, 0) + body


def _attributes(data: bytes, offset: int) -> dict[int, bytes]:
    found: dict[int, bytes] = {}
    while offset + _NLATTR.size <= len(data):
        length, kind = _NLATTR.unpack_from(data, offset)
        if length < _NLATTR.size or offset + length > len(data):
            break  # truncated: keep what was whole
        found[kind & _NLA_TYPE_MASK] = data[offset + _NLATTR.size : offset + length]
        offset += (length + 3) & ~3
    return found


def _be32(attributes: dict[int, bytes], kind: int) -> int:
    value = attributes.get(kind)
    return _BE32.unpack(value[:4])[0] if value is not None and len(value) >= 4 else 0


def _packet_length(payload: bytes) -> int:
    if len(payload) >= 4 and payload[0] >> 4 == 4:
        return int.from_bytes(payload[2:4], "big")
    if len(payload) >= 6 and payload[0] >> 4 == 6:
        return 40 + int.from_bytes(payload[4:6], "big")
    return len(payload)


def decode_packet(attributes: dict[int, bytes]) -> NflogPacket:
    prefix = attributes.get(NFULA_PREFIX, b"").split(b"\0", 1)[0].decode("ascii", "replace")
    payload = attributes.get(NFULA_PAYLOAD, b"")
    stamp = attributes.get(NFULA_TIMESTAMP)
    time_ns = 0
    if stamp is not None and len(stamp) >= 16:
        seconds, micros = struct.unpack(">QQ", stamp[:16])
        time_ns = seconds * 1_000_000_000 + micros * 1000
    return NflogPacket(
        prefix,
        _be32(attributes, NFULA_IFINDEX_INDEV),
        _be32(attributes, NFULA_IFINDEX_OUTDEV),
        _be32(attributes, NFULA_IFINDEX_PHYSINDEV),
        _be32(attributes, NFULA_IFINDEX_PHYSOUTDEV),
        payload,
        _packet_length(payload),
        time_ns,
    )


class NflogReader:
    """A socket bound to one NFLOG group in the calling thread's network namespace.

    `lost` counts messages the kernel dropped (sequence gaps, plus a receive-buffer overrun the
    sequence cannot see yet); `malformed` counts messages that could not be decoded."""

    def __init__(self, group: int, receive_buffer: int = RECEIVE_BUFFER) -> None:
        if not 0 <= group <= 0xFFFF:
            raise ValueError(f"an NFLOG group is 0..65535, not {group}")
        self.group = group
        self.lost = 0
        self.malformed = 0
        self._next_seq: int | None = None
        self._sequence = 0
        self._sock = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER
        )
        try:
            try:  # beyond rmem_max: root may (SO_RCVBUFFORCE); else the plain option's ceiling
                self._sock.setsockopt(socket.SOL_SOCKET, 33, receive_buffer)  # SO_RCVBUFFORCE
            except OSError:
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
            self._sock.bind((0, 0))
            self._configure(_attribute(NFULA_CFG_CMD, bytes([NFULNL_CFG_CMD_BIND])))
            self._configure(
                _attribute(NFULA_CFG_MODE, struct.pack(">IBx", COPY_BYTES, NFULNL_COPY_PACKET))
                + _attribute(NFULA_CFG_TIMEOUT, _BE32.pack(_FLUSH_TIMEOUT_CS))
                + _attribute(NFULA_CFG_QTHRESH, _BE32.pack(_BATCH))
                + _attribute(NFULA_CFG_FLAGS, struct.pack(">H", NFULNL_CFG_F_SEQ) + b"\0\0")
            )
        except OSError as exc:
            self._sock.close()
            if exc.errno == errno.EBUSY:
                raise NflogError(exc.errno, f"NFLOG group {group} is bound by another listener") from exc
            if exc.errno == errno.EPERM:  # the kernel's answer when another socket owns the group
                message = f"NFLOG group {group} is bound by another listener (or no CAP_NET_ADMIN)"
                raise NflogError(exc.errno, message) from exc
            raise NflogError(exc.errno, f"cannot bind NFLOG group {group}: {exc.strerror}") from exc
        self._sock.setblocking(False)

    def _configure(self, attributes: bytes) -> None:
        self._sequence += 1
        self._sock.send(_config_message(self.group, self._sequence, attributes))
        reply = self._sock.recv(65536)
        if len(reply) >= _NLMSGHDR.size + 4:
            _, kind, _, _, _ = _NLMSGHDR.unpack_from(reply)
            if kind == NLMSG_ERROR:
                code = -struct.unpack_from("=i", reply, _NLMSGHDR.size)[0]
                if code:
                    raise OSError(code, os.strerror(code))

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        if self._sock.fileno() < 0:
            return
        try:  # the kernel unbinds on close too; asking first frees the group at once
            self._sock.setblocking(True)
            self._configure(_attribute(NFULA_CFG_CMD, bytes([NFULNL_CFG_CMD_UNBIND])))
        except OSError:
            pass
        self._sock.close()

    def read(self, timeout_ms: int, limit: int = 4096) -> list[NflogPacket]:
        """The packets queued now (at most `limit`), waiting up to timeout_ms for the first."""
        packets: list[NflogPacket] = []
        if not select.select([self._sock], [], [], max(timeout_ms, 0) / 1000)[0]:
            return packets
        while len(packets) < limit:
            try:
                data = self._sock.recv(1 << 17)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:  # overrun: the sequence gap tells how many
                    continue
                raise
            packets.extend(self._decode(data))
        return packets

    def _decode(self, data: bytes) -> Iterator[NflogPacket]:
        offset = 0
        while offset + _NLMSGHDR.size <= len(data):
            length, kind, _, _, _ = _NLMSGHDR.unpack_from(data, offset)
            if length < _NLMSGHDR.size or offset + length > len(data):
                self.malformed += 1
                return
            if kind == (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET:
                attributes = _attributes(data[offset : offset + length], _NLMSGHDR.size + _NFGENMSG.size)
                self._count_sequence(attributes)
                if NFULA_PAYLOAD in attributes:
                    yield decode_packet(attributes)
                else:
                    self.malformed += 1
            offset += (length + 3) & ~3

    def _count_sequence(self, attributes: dict[int, bytes]) -> None:
        if NFULA_SEQ not in attributes:
            return
        sequence = _be32(attributes, NFULA_SEQ)
        if self._next_seq is not None and sequence != self._next_seq:
            self.lost += (sequence - self._next_seq) & 0xFFFFFFFF
        self._next_seq = (sequence + 1) & 0xFFFFFFFF
