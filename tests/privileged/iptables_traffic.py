"""Traffic for the iptables dataplane tests, run inside a pod netns (`ip netns exec ... python this`).

    serve --tcp 80,81 --udp 53 [--sctp-log FILE]   echo servers (+ a raw SCTP sink); prints "ready"
    probe tcp|udp|icmp|sctp IP PORT [--bind IP] [--sctp-log FILE]
                                                   one new flow; exit 0 if answered, 1 if not
    probe tcp-refused|udp-refused IP PORT          exit 0 if a RST / ICMP unreachable came back
    stream IP PORT FILE                            one TCP connection, a message every 20 ms;
                                                   FILE holds the number of echoes received so far
    udp-stream IP PORT FILE                        the same over UDP from one source port (one
                                                   conntrack flow); unanswered datagrams are skipped
    flood IP ALLOWED_PORT DENIED_PORT SECONDS [--until FILE]
                                                   a new UDP flow to each port per round; prints
                                                   JSON counts of rounds and echoes per port

Standard library only. This kernel has no SCTP sockets: SCTP is sent and received on raw IP
sockets (protocol 132), and the sink logs each packet's verification tag, which the prober (a
different netns, the same file system) looks for.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import socketserver
import struct
import sys
import threading
import time

SCTP = 132
TIMEOUT = 0.6


def _ports(text: str) -> list[int]:
    return [int(p) for p in text.split(",") if p]


class _TcpEcho(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(4096):
            self.request.sendall(data)


class _UdpEcho(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        data, sock = self.request
        sock.sendto(data, self.client_address)


class _Tcp(socketserver.ThreadingTCPServer):
    # "::" with IPV6_V6ONLY off (Linux's default) serves IPv4 and IPv6 alike.
    address_family = socket.AF_INET6
    allow_reuse_address = True
    daemon_threads = True


class _Udp(socketserver.ThreadingUDPServer):
    address_family = socket.AF_INET6


def _family(ip: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


def serve(args: argparse.Namespace) -> int:
    for port in _ports(args.tcp):
        threading.Thread(target=_Tcp(("::", port), _TcpEcho).serve_forever, daemon=True).start()
    for port in _ports(args.udp):
        udp = _Udp(("::", port), _UdpEcho)
        threading.Thread(target=udp.serve_forever, daemon=True).start()
    if args.sctp_log:
        threading.Thread(target=_sctp_sink, args=(args.sctp_log,), daemon=True).start()
    print("ready", flush=True)
    threading.Event().wait()
    return 0


def _sctp_sink(path: str) -> None:
    raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, SCTP)
    while True:
        packet = raw.recv(65535)
        header_len = (packet[0] & 0x0F) * 4
        _src, _dst, tag = struct.unpack("!HHI", packet[header_len : header_len + 8])
        with open(path, "a") as log:
            log.write(f"{tag:08x}\n")


def _probe_sctp(ip: str, port: int, log_path: str) -> bool:
    tag = int.from_bytes(os.urandom(4), "big") | 1
    # Common header (checksum left 0: nothing on the path verifies it) + an INIT chunk.
    init = struct.pack("!BBHIIHHI", 1, 0, 20, tag, 65535, 1, 1, 1)
    packet = struct.pack("!HHII", 40000 + tag % 1000, port, tag, 0) + init
    raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, SCTP)
    raw.sendto(packet, (ip, 0))
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        try:
            with open(log_path) as log:
                if f"{tag:08x}" in log.read().split():
                    return True
        except FileNotFoundError:
            pass
        time.sleep(0.02)
    return False


def _icmp_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def _probe_icmp(ip: str) -> bool:
    ipv6 = ":" in ip
    raw = socket.socket(_family(ip), socket.SOCK_RAW, socket.IPPROTO_ICMPV6 if ipv6 else socket.IPPROTO_ICMP)
    ident = os.getpid() & 0xFFFF
    request, reply = (128, 129) if ipv6 else (8, 0)
    body = struct.pack("!BBHHH", request, 0, 0, ident, 1) + b"podfence"
    if not ipv6:  # the kernel fills in ICMPv6 checksums itself
        body = body[:2] + struct.pack("!H", _icmp_checksum(body)) + body[4:]
    raw.sendto(body, (ip, 0))
    deadline = time.monotonic() + TIMEOUT
    while (left := deadline - time.monotonic()) > 0:
        if not select.select([raw], [], [], left)[0]:
            break
        packet, address = raw.recvfrom(65535)
        header_len = 0 if ipv6 else (packet[0] & 0x0F) * 4  # IPv6 raw sockets get no IP header
        kind, _code, _sum, reply_id, _seq = struct.unpack("!BBHHH", packet[header_len : header_len + 8])
        if address[0] == ip and kind == reply and reply_id == ident:
            return True
    return False


def _bound(ip: str, kind: int, bind: str | None) -> socket.socket:
    sock = socket.socket(_family(ip), kind)
    if bind:
        sock.bind((bind, 0))
    return sock


def _probe_tcp(ip: str, port: int, bind: str | None) -> bool:
    sock = _bound(ip, socket.SOCK_STREAM, bind)
    sock.settimeout(TIMEOUT)
    try:
        sock.connect((ip, port))
        sock.sendall(b"ping")
        return sock.recv(4) == b"ping"
    except OSError:
        return False
    finally:
        sock.close()


def _probe_udp(ip: str, port: int, bind: str | None) -> bool:
    sock = _bound(ip, socket.SOCK_DGRAM, bind)
    sock.settimeout(TIMEOUT / 2)
    try:
        for _ in range(2):
            sock.sendto(b"ping", (ip, port))
            try:
                if sock.recv(16) == b"ping":
                    return True
            except TimeoutError:
                continue
        return False
    except OSError:
        return False
    finally:
        sock.close()


def _probe_refused(ip: str, port: int, kind: int) -> bool:
    """True if the peer said no: a TCP RST, or an ICMP port unreachable (a connected UDP socket)."""
    sock = socket.socket(_family(ip), kind)
    sock.settimeout(TIMEOUT)
    try:
        sock.connect((ip, port))
        if kind == socket.SOCK_DGRAM:
            sock.send(b"ping")
            sock.recv(16)
        return False
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    finally:
        sock.close()


def probe(args: argparse.Namespace) -> int:
    if args.kind in ("tcp-refused", "udp-refused"):
        kind = socket.SOCK_STREAM if args.kind == "tcp-refused" else socket.SOCK_DGRAM
        return 0 if _probe_refused(args.ip, args.port, kind) else 1
    if args.kind == "tcp":
        answered = _probe_tcp(args.ip, args.port, args.bind)
    elif args.kind == "udp":
        answered = _probe_udp(args.ip, args.port, args.bind)
    elif args.kind == "icmp":
        answered = _probe_icmp(args.ip)
    else:
        answered = _probe_sctp(args.ip, args.port, args.sctp_log)
    return 0 if answered else 1


def stream(args: argparse.Namespace) -> int:
    sock = socket.create_connection((args.ip, args.port), timeout=2)
    sock.settimeout(None)
    echoed = 0
    while True:
        sock.sendall(b"x")
        if sock.recv(1) != b"x":
            return 1
        echoed += 1
        with open(args.file + ".tmp", "w") as out:
            out.write(str(echoed))
        os.replace(args.file + ".tmp", args.file)
        time.sleep(0.02)


def udp_stream(args: argparse.Namespace) -> int:
    sock = socket.socket(_family(args.ip), socket.SOCK_DGRAM)
    sock.connect((args.ip, args.port))  # one source port for the whole run: one flow
    echoed = 0
    while True:
        sock.send(b"x")
        # A dropped datagram is not an error: keep sending on the same flow, count what returns.
        if select.select([sock], [], [], 0.1)[0] and sock.recv(16) == b"x":
            echoed += 1
            with open(args.file + ".tmp", "w") as out:
                out.write(str(echoed))
            os.replace(args.file + ".tmp", args.file)
        time.sleep(0.02)


def flood(args: argparse.Namespace) -> int:
    counts = {"rounds": 0, "allowed_echoed": 0, "denied_echoed": 0}
    deadline = time.monotonic() + args.seconds
    while time.monotonic() < deadline and not (args.until and os.path.exists(args.until)):
        allowed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # a new source port: a new flow
        denied = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        allowed.sendto(b"a", (args.ip, args.allowed_port))
        denied.sendto(b"d", (args.ip, args.denied_port))
        counts["rounds"] += 1
        if select.select([allowed], [], [], 1.0)[0]:
            counts["allowed_echoed"] += 1
        # The allowed echo came back, so a denied echo would have too by now (same path).
        if select.select([denied], [], [], 0.01)[0]:
            counts["denied_echoed"] += 1
        allowed.close()
        denied.close()
    print(json.dumps(counts), flush=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser("serve")
    serve_parser.add_argument("--tcp", default="")
    serve_parser.add_argument("--udp", default="")
    serve_parser.add_argument("--sctp-log")
    probe_parser = commands.add_parser("probe")
    probe_parser.add_argument("kind", choices=["tcp", "udp", "icmp", "sctp", "tcp-refused", "udp-refused"])
    probe_parser.add_argument("ip")
    probe_parser.add_argument("port", type=int)
    probe_parser.add_argument("--bind")
    probe_parser.add_argument("--sctp-log")
    stream_parser = commands.add_parser("stream")
    stream_parser.add_argument("ip")
    stream_parser.add_argument("port", type=int)
    stream_parser.add_argument("file")
    udp_stream_parser = commands.add_parser("udp-stream")
    udp_stream_parser.add_argument("ip")
    udp_stream_parser.add_argument("port", type=int)
    udp_stream_parser.add_argument("file")
    flood_parser = commands.add_parser("flood")
    flood_parser.add_argument("ip")
    flood_parser.add_argument("allowed_port", type=int)
    flood_parser.add_argument("denied_port", type=int)
    flood_parser.add_argument("seconds", type=float)
    flood_parser.add_argument("--until", help="stop early once this file exists")
    args = parser.parse_args()
    handlers = {"serve": serve, "probe": probe, "stream": stream, "udp-stream": udp_stream, "flood": flood}
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
