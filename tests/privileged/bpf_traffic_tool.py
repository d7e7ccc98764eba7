"""Traffic endpoints for the BPF dataplane tests, run inside a pod netns (nsenter --net=...).

serve PORT...            TCP and UDP echo servers on every given port (IPv4 and IPv6)
tcp HOST PORT            exit 0 if a TCP connection echoes a line within 1.5 s, 1 otherwise
udp HOST PORT            exit 0 if a UDP datagram is echoed within 1.5 s
ping HOST                exit 0 if an ICMP(v6) echo is answered within 1.5 s
stream HOST PORT SECS    one TCP connection echoing a line every 0.1 s; prints ok/failed count
"""

from __future__ import annotations

import os
import socket
import struct
import sys
import threading
import time

TIMEOUT = 1.5


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def serve(ports: list[int]) -> None:
    def tcp_client(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(4096):
                conn.sendall(data)

    def tcp(port: int, family: socket.AddressFamily) -> None:
        server = socket.socket(family, socket.SOCK_STREAM)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            server.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        server.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
        server.listen(64)
        while True:
            conn, _ = server.accept()
            threading.Thread(target=tcp_client, args=(conn,), daemon=True).start()

    def udp(port: int, family: socket.AddressFamily) -> None:
        server = socket.socket(family, socket.SOCK_DGRAM)
        if family == socket.AF_INET6:
            server.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        server.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
        while True:
            data, peer = server.recvfrom(65535)
            server.sendto(data, peer)

    for port in ports:
        for family in (socket.AF_INET, socket.AF_INET6):
            threading.Thread(target=tcp, args=(port, family), daemon=True).start()
            threading.Thread(target=udp, args=(port, family), daemon=True).start()
    print("ready", flush=True)
    while True:
        time.sleep(3600)


def tcp_once(host: str, port: int) -> int:
    try:
        with socket.create_connection((host, port), timeout=TIMEOUT) as conn:
            conn.sendall(b"ping\n")
            return 0 if conn.recv(16) == b"ping\n" else 1
    except OSError:
        return 1


def udp_once(host: str, port: int) -> int:
    with socket.socket(_family(host), socket.SOCK_DGRAM) as sock:
        sock.settimeout(TIMEOUT)
        try:
            sock.sendto(b"ping", (host, port))
            data, _ = sock.recvfrom(16)
            return 0 if data == b"ping" else 1
        except OSError:
            return 1


def udp_refused(host: str, port: int) -> int:
    """Exit 0 if a datagram to a closed port comes back as ICMP port unreachable (ECONNREFUSED)."""
    with socket.socket(_family(host), socket.SOCK_DGRAM) as sock:
        sock.settimeout(TIMEOUT)
        sock.connect((host, port))
        try:
            sock.send(b"anyone?")
            sock.recv(16)
        except ConnectionRefusedError:
            return 0
        except OSError:
            return 1
    return 1


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ping_once(host: str, ident: int | None = None) -> int:
    """One ICMP/ICMPv6 echo over a raw socket (no ping binary on this machine); `ident` names the
    echo (default: this process's pid)."""
    v6 = ":" in host
    ident = os.getpid() & 0xFFFF if ident is None else ident
    request_type, reply_type = (128, 129) if v6 else (8, 0)
    payload = b"podfence"
    header = struct.pack("!BBHHH", request_type, 0, 0, ident, 1)
    checksum = 0 if v6 else _checksum(header + payload)  # the kernel fills ICMPv6 checksums
    packet = struct.pack("!BBHHH", request_type, 0, checksum, ident, 1) + payload
    family, proto = (socket.AF_INET6, socket.IPPROTO_ICMPV6) if v6 else (socket.AF_INET, socket.IPPROTO_ICMP)
    with socket.socket(family, socket.SOCK_RAW, proto) as sock:
        sock.settimeout(TIMEOUT)
        sock.sendto(packet, (host, 0))
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            try:
                data, _ = sock.recvfrom(2048)
            except OSError:
                return 1
            icmp = data if v6 else data[(data[0] & 0x0F) * 4 :]
            if len(icmp) >= 8 and icmp[0] == reply_type and struct.unpack("!H", icmp[4:6])[0] == ident:
                return 0
    return 1


def stream(host: str, port: int, seconds: float) -> int:
    ok = failed = 0
    try:
        conn = socket.create_connection((host, port), timeout=TIMEOUT)
    except OSError:
        print("ok=0 failed=1 connect=no", flush=True)
        return 1
    print("connected", flush=True)
    deadline = time.monotonic() + seconds
    with conn:
        conn.settimeout(TIMEOUT)
        while time.monotonic() < deadline:
            try:
                conn.sendall(b"tick\n")
                if conn.recv(16) == b"tick\n":
                    ok += 1
                else:
                    failed += 1
            except OSError:
                failed += 1
            time.sleep(0.1)
    print(f"ok={ok} failed={failed} connect=yes", flush=True)
    return 0 if failed == 0 else 1


def probe(host: str, port: int, stop_file: str) -> int:
    """New TCP connections back to back until stop_file exists; prints successes and failures."""
    successes = failures = 0
    errors: dict[str, int] = {}
    while not os.path.exists(stop_file):
        try:
            with socket.create_connection((host, port), timeout=0.5):
                successes += 1
        except OSError as error:
            failures += 1
            errors[str(error)] = errors.get(str(error), 0) + 1
    print(f"successes={successes} failures={failures} errors={errors}", flush=True)
    return 0


def main(argv: list[str]) -> int:
    command, *args = argv
    if command == "serve":
        serve([int(p) for p in args])
        return 0
    if command == "tcp":
        return tcp_once(args[0], int(args[1]))
    if command == "udp":
        return udp_once(args[0], int(args[1]))
    if command == "udp-refused":
        return udp_refused(args[0], int(args[1]))
    if command == "ping":
        return ping_once(args[0])
    if command == "probe":
        return probe(args[0], int(args[1]), args[2])
    if command == "stream":
        return stream(args[0], int(args[1]), float(args[2]))
    raise SystemExit(f"unknown command {command}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
