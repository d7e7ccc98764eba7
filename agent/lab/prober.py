"""The prober: every (source pod, destination, port, protocol) of a scenario, concurrently, from one process.

Network namespaces are per thread, so each worker thread enters its source pod's netns (setns on a
cached /run/netns fd) and opens ordinary sockets there. Verdicts follow the upstream e2e probe
(`agnhost connect`): TCP connects, UDP gets a non-empty reply, SCTP gets an INIT ACK, ICMP gets an
echo reply; anything else within the timeout (refusal included) is "blocked".

Results are truth tables printed as upstream prints them: `.` allowed, `X` blocked, and a comparison
table where `X` marks a cell that differs from the expectation.
"""

from __future__ import annotations

import contextlib
import os
import random
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from pyroute2.netns import setns

from agent.lab import dns
from agent.lab.sctp import CHUNK_INIT_ACK, IPPROTO_SCTP, build_init, parse_sctp, strip_ipv4_header

PROTOCOLS = ("TCP", "UDP", "SCTP", "ICMP")  # what run_probe understands
DEFAULT_TIMEOUT = 1.0  # upstream's `agnhost connect --timeout=1s`
MAX_WORKERS = 96

_netns_fds: dict[str, tuple[int, int]] = {}  # name -> (fd, inode of /run/netns/<name> when opened)
_netns_fds_lock = threading.Lock()
_thread_state = threading.local()


def _netns_fd(netns_name: str) -> int:
    """An fd for the namespace now called `netns_name`; a rebuilt lab reuses names, so check inodes."""
    path = f"/run/netns/{netns_name}"
    inode = os.stat(path).st_ino
    with _netns_fds_lock:
        cached = _netns_fds.get(netns_name)
        if cached is not None and cached[1] == inode:
            return cached[0]
        if cached is not None:
            os.close(cached[0])
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        _netns_fds[netns_name] = (fd, inode)
        return fd


def _enter(netns_name: str) -> None:
    """Move the calling thread (only) into `netns_name`. Worker threads live for one batch of probes."""
    if getattr(_thread_state, "netns", None) == netns_name:
        return
    setns(_netns_fd(netns_name), flags=0)
    _thread_state.netns = netns_name


def forget_namespaces() -> None:
    """Close cached namespace fds (an open fd keeps a deleted netns alive)."""
    with _netns_fds_lock:
        for fd, _ in _netns_fds.values():
            os.close(fd)
        _netns_fds.clear()


@dataclass(frozen=True)
class Probe:
    source: str  # pod key "ns/name", for tables
    source_netns: str
    target: str  # pod key or free text, for tables
    address: str
    port: int
    protocol: str


def _family(address: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def _tcp(address: str, port: int, timeout: float) -> bool:
    with socket.socket(_family(address), socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect((address, port))
        except OSError:
            return False
        return True


def _udp(address: str, port: int, timeout: float) -> bool:
    with socket.socket(_family(address), socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect((address, port))
            sock.send(b"hostname\n")
            return bool(sock.recv(2048))
        except OSError:
            return False


def _sctp(address: str, port: int, timeout: float) -> bool:
    src_port = random.randint(32768, 60999)
    tag = random.getrandbits(32) or 1

    def is_init_ack(payload: bytes, source: str) -> bool:
        chunk = parse_sctp(payload)
        return (
            chunk is not None
            and source == address
            and chunk.chunk_type == CHUNK_INIT_ACK
            and chunk.src_port == port
            and chunk.dst_port == src_port
            and chunk.verification_tag == tag
        )

    with socket.socket(_family(address), socket.SOCK_RAW, IPPROTO_SCTP) as sock:
        sock.sendto(build_init(src_port, port, tag), (address, 0))
        return _await(sock, timeout, is_init_ack)


def _icmp_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def _icmp(address: str, timeout: float) -> bool:
    ident, seq = random.getrandbits(16), 1
    payload = b"podfence-lab"
    v6 = _family(address) == socket.AF_INET6
    request_type, reply_type = (128, 129) if v6 else (8, 0)
    header = struct.pack("!BBHHH", request_type, 0, 0, ident, seq)
    # The kernel fills in the ICMPv6 checksum (it covers the IPv6 pseudo-header); ICMPv4's is ours.
    checksum = 0 if v6 else _icmp_checksum(header + payload)
    request = struct.pack("!BBHHH", request_type, 0, checksum, ident, seq) + payload

    def is_reply(message: bytes, source: str) -> bool:
        if len(message) < 8:
            return False
        icmp_type, _, _, reply_ident, reply_seq = struct.unpack_from("!BBHHH", message)
        return icmp_type == reply_type and (reply_ident, reply_seq) == (ident, seq) and source == address

    protocol = socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP
    with socket.socket(_family(address), socket.SOCK_RAW, protocol) as sock:
        sock.sendto(request, (address, 0))
        return _await(sock, timeout, is_reply)


def _await(sock: socket.socket, timeout: float, matches: Callable[[bytes, str], bool]) -> bool:
    """Read a raw socket until a packet (payload, source address) satisfies `matches`, or time out."""
    deadline = time.monotonic() + timeout
    while (remaining := deadline - time.monotonic()) > 0:
        readable, _, _ = select.select([sock], [], [], remaining)
        if not readable:
            continue
        packet, (source, *_) = sock.recvfrom(65535)
        # Raw IPv4 sockets read the IP header too; raw IPv6 sockets read only the payload.
        payload = strip_ipv4_header(packet) if sock.family == socket.AF_INET else packet
        if payload is not None and matches(payload, source):
            return True
    return False


def run_probe(probe: Probe, timeout: float = DEFAULT_TIMEOUT) -> bool:
    """One probe from inside its source netns (the calling thread moves there)."""
    _enter(probe.source_netns)
    if probe.protocol == "TCP":
        return _tcp(probe.address, probe.port, timeout)
    if probe.protocol == "UDP":
        return _udp(probe.address, probe.port, timeout)
    if probe.protocol == "SCTP":
        return _sctp(probe.address, probe.port, timeout)
    if probe.protocol == "ICMP":
        return _icmp(probe.address, timeout)
    raise ValueError(f"unknown protocol {probe.protocol!r} (known: {', '.join(PROTOCOLS)})")


def run_probes(probes: Sequence[Probe], timeout: float = DEFAULT_TIMEOUT) -> dict[Probe, bool]:
    """All probes concurrently; a full matrix takes about one timeout when anything is blocked."""
    if not probes:
        return {}
    with ThreadPoolExecutor(max_workers=min(MAX_WORKERS, len(probes)), thread_name_prefix="probe") as pool:
        verdicts = list(pool.map(lambda p: run_probe(p, timeout), probes))
    return dict(zip(probes, verdicts, strict=True))


def server_reply(probe: Probe, timeout: float = DEFAULT_TIMEOUT) -> str | None:
    """What the server behind `probe` answers (the pod's name), or None if nothing answered.

    Tells which backend a Service address reached, not only whether something did (TCP and UDP).
    """

    def fetch() -> str | None:
        _enter(probe.source_netns)
        kind = socket.SOCK_STREAM if probe.protocol == "TCP" else socket.SOCK_DGRAM
        with socket.socket(_family(probe.address), kind) as sock:
            sock.settimeout(timeout)
            try:
                sock.connect((probe.address, probe.port))
                if kind == socket.SOCK_DGRAM:
                    sock.send(b"hostname\n")
                return sock.recv(2048).decode(errors="replace").strip() or None
            except OSError:
                return None

    # A helper thread, so the caller's own thread never changes namespace.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="reply") as pool:
        return pool.submit(fetch).result()


def resolve(
    source_netns: str, dns_server: str, name: str, timeout: float = DEFAULT_TIMEOUT
) -> list[str] | None:
    """Ask `dns_server` (UDP 53) from inside `source_netns` for the A or AAAA records of `name`.

    None when no answer came (blocked, or no DNS there); otherwise the addresses, maybe none.
    """

    def lookup() -> list[str] | None:
        _enter(source_netns)
        query_id = random.getrandbits(16)
        qtype = dns.TYPE_AAAA if _family(dns_server) == socket.AF_INET6 else dns.TYPE_A
        with socket.socket(_family(dns_server), socket.SOCK_DGRAM) as sock:
            sock.settimeout(timeout)
            try:
                sock.connect((dns_server, 53))
                sock.send(dns.build_query(query_id, name, qtype))
                return dns.parse_response(sock.recv(4096), query_id)
            except OSError:
                return None

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="dns") as pool:
        return pool.submit(lookup).result()


def send_hello_from(netns_names: Iterable[str]) -> None:
    """Make each namespace emit a frame (an ARP for its gateway), the way CNI plugins announce pods."""

    def hello(name: str) -> None:
        _enter(name)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock, contextlib.suppress(OSError):
            sock.sendto(b"hello", ("10.241.255.254", 9))  # a blackholed Service address: only the ARP matters

    names = list(netns_names)
    if names:
        with ThreadPoolExecutor(max_workers=min(MAX_WORKERS, len(names)), thread_name_prefix="hello") as pool:
            list(pool.map(hello, names))


# --- truth tables ---------------------------------------------------------------------------


@dataclass
class TruthTable:
    """Reachability from each row (source) to each column (destination); loopback is ignored."""

    sources: list[str]
    targets: list[str]
    cells: dict[tuple[str, str], bool] = field(default_factory=dict)
    # Cells not judged besides (pod, same pod), e.g. a pod probing its own port under another label.
    ignored: set[tuple[str, str]] = field(default_factory=set)

    def judged(self, source: str, target: str) -> bool:
        return source != target and (source, target) not in self.ignored

    @classmethod
    def filled(cls, sources: list[str], targets: list[str], allowed: bool = True) -> TruthTable:
        return cls(sources, targets, {(s, t): allowed for s in sources for t in targets})

    def differences(self, observed: TruthTable) -> list[tuple[str, str, bool, bool]]:
        """(source, target, expected, observed) for every non-loopback cell that differs."""
        return [
            (s, t, self.cells[(s, t)], observed.cells[(s, t)])
            for s in self.sources
            for t in self.targets
            if self.judged(s, t) and self.cells[(s, t)] != observed.cells.get((s, t))
        ]

    def render(self, title: str = "", cell_text: dict[bool, str] | None = None) -> str:
        marks = cell_text or {True: ".", False: "X"}
        widths = [max(len(t), 3) + 2 for t in self.targets]
        lead = max([len(s) for s in self.sources] + [3]) + 1
        lines = [title] if title else []
        lines.append(" " * lead + "".join(t.rjust(w) for t, w in zip(self.targets, widths, strict=True)))
        for s in self.sources:
            row = "".join(
                (marks[self.cells[(s, t)]] if self.judged(s, t) else "-").rjust(w)
                for t, w in zip(self.targets, widths, strict=True)
            )
            lines.append(s.rjust(lead) + row)
        return "\n".join(lines)


def comparison(expected: TruthTable, observed: TruthTable) -> str:
    """Expected, observed and the cell-by-cell comparison (`X` = differs), as upstream prints them."""
    same = TruthTable(
        expected.sources,
        expected.targets,
        {cell: expected.cells[cell] == observed.cells.get(cell) for cell in expected.cells},
        expected.ignored,
    )
    return "\n\n".join(
        [
            expected.render("expected:"),
            observed.render("observed:"),
            same.render("comparison (X = differs from expected):"),
        ]
    )


@dataclass(frozen=True)
class Endpoint:
    """Something a probe can start from (a pod's netns) or go to (an address)."""

    key: str
    netns: str
    address: str


def probe_table(
    sources: Sequence[Endpoint],
    targets: Sequence[Endpoint],
    port: int,
    protocol: str,
    timeout: float = DEFAULT_TIMEOUT,
    include_loopback: bool = False,
) -> TruthTable:
    """Probe every source against every target on one port/protocol and return the observed table."""
    probes = [
        Probe(s.key, s.netns, t.key, t.address, port, protocol)
        for s in sources
        for t in targets
        if include_loopback or s.key != t.key
    ]
    verdicts = run_probes(probes, timeout)
    table = TruthTable([s.key for s in sources], [t.key for t in targets])
    for s in sources:
        for t in targets:
            table.cells[(s.key, t.key)] = True
    for probe, allowed in verdicts.items():
        table.cells[(probe.source, probe.target)] = allowed
    return table
