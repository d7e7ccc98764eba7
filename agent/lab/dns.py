"""A tiny DNS (RFC 1035) for the lab's cluster DNS pod: A/AAAA answers for Service names.

The lab has no kube-dns; a pod that serves UDP 53 answers `<pod>.<namespace>.svc.cluster.local`
with that pod's Service ClusterIP (one Service per pod, as in the lab), so the demo can show name
resolution working through the DNS policy and a probe can check real DNS rather than an echo.
"""

from __future__ import annotations

import ipaddress
import struct

CLUSTER_DOMAIN = "svc.cluster.local"
TYPE_A, TYPE_AAAA, CLASS_IN = 1, 28, 1
_HEADER = struct.Struct("!HHHHHH")  # id, flags, qdcount, ancount, nscount, arcount
_FLAGS_QUERY = 0x0100  # recursion desired
_FLAGS_ANSWER = 0x8400  # response, authoritative
_RCODE_NXDOMAIN = 3
_TTL = 30


def service_name(namespace: str, pod: str) -> str:
    return f"{pod}.{namespace}.{CLUSTER_DOMAIN}"


def _encode_name(name: str) -> bytes:
    return b"".join(bytes([len(label)]) + label.encode() for label in name.rstrip(".").split(".")) + b"\0"


def _decode_name(message: bytes, offset: int) -> tuple[str, int]:
    """A name without compression (queries never compress) and the offset after it."""
    labels: list[str] = []
    while True:
        if offset >= len(message):
            raise ValueError("name runs past the message")
        length = message[offset]
        offset += 1
        if length == 0:
            return ".".join(labels), offset
        if length & 0xC0:
            raise ValueError("compressed name in a question")
        labels.append(message[offset : offset + length].decode("ascii", errors="replace"))
        offset += length


def build_query(query_id: int, name: str, qtype: int = TYPE_A) -> bytes:
    return (
        _HEADER.pack(query_id, _FLAGS_QUERY, 1, 0, 0, 0)
        + _encode_name(name)
        + struct.pack("!HH", qtype, CLASS_IN)
    )


def answer(query: bytes, records: dict[str, list[str]]) -> bytes | None:
    """The response to `query` from `records` (name -> addresses), or None if it is not a DNS query."""
    if len(query) < _HEADER.size + 5:
        return None
    query_id, flags, qdcount, *_ = _HEADER.unpack_from(query)
    if flags & 0x8000 or qdcount != 1:
        return None
    try:
        name, end = _decode_name(query, _HEADER.size)
    except ValueError:
        return None
    if end + 4 > len(query):
        return None
    qtype, _qclass = struct.unpack_from("!HH", query, end)
    question = query[_HEADER.size : end + 4]
    addresses = [
        ipaddress.ip_address(a)
        for a in records.get(name.lower().rstrip("."), [])
        if ipaddress.ip_address(a).version == (6 if qtype == TYPE_AAAA else 4)
    ]
    rcode = 0 if name.lower().rstrip(".") in records else _RCODE_NXDOMAIN
    header = _HEADER.pack(query_id, _FLAGS_ANSWER | (flags & 0x0100) | rcode, 1, len(addresses), 0, 0)
    answers = b"".join(
        struct.pack("!HHHIH", 0xC000 | _HEADER.size, qtype, CLASS_IN, _TTL, len(a.packed)) + a.packed
        for a in addresses
    )
    return header + question + answers


def parse_response(response: bytes, query_id: int) -> list[str] | None:
    """Addresses in the answer to query `query_id`; None if this is not that answer or it failed."""
    if len(response) < _HEADER.size:
        return None
    response_id, flags, qdcount, ancount, *_ = _HEADER.unpack_from(response)
    if response_id != query_id or not flags & 0x8000 or flags & 0x000F:
        return None
    offset = _HEADER.size
    try:
        for _ in range(qdcount):
            _, offset = _decode_name(response, offset)
            offset += 4
        addresses = []
        for _ in range(ancount):
            if response[offset] & 0xC0 == 0xC0:
                offset += 2
            else:
                _, offset = _decode_name(response, offset)
            rtype, _rclass, _ttl, length = struct.unpack_from("!HHIH", response, offset)
            offset += 10
            if rtype in (TYPE_A, TYPE_AAAA):
                addresses.append(str(ipaddress.ip_address(response[offset : offset + length])))
            offset += length
    except (ValueError, IndexError, struct.error):
        return None
    return addresses
