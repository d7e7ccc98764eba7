"""Raw Ethernet frames for the hostile-pod tests, run inside a pod's network namespace (no scapy:
AF_PACKET sockets and hand-built headers are all these tests need).

    raw_frames_tool.py send IFACE HEX [HEX ...]        send each frame as is on IFACE
    raw_frames_tool.py sniff IFACE SECONDS MARKER      print "ready", then "seen" or "none": whether
                                                       a frame carrying MARKER (text) arrived on
                                                       IFACE within SECONDS
    raw_frames_tool.py udp SOURCE_PORT HOST PORT MARKER  send one datagram from SOURCE_PORT
    raw_frames_tool.py ip HEX                          send an IPv4 packet (header included) as is
                                                       through a raw socket, routed as usual
"""

from __future__ import annotations

import socket
import sys
import time

ETH_P_ALL = 0x0003


def send(iface: str, frames: list[str]) -> int:
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as sock:
        sock.bind((iface, 0))
        for frame in frames:
            sock.send(bytes.fromhex(frame))
    return 0


def sniff(iface: str, seconds: float, marker: bytes) -> int:
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL)) as sock:
        sock.bind((iface, 0))
        print("ready", flush=True)
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                frame, address = sock.recvfrom(65535)
            except TimeoutError:
                break
            if address[2] != socket.PACKET_OUTGOING and marker in frame:
                print("seen", flush=True)
                return 0
    print("none", flush=True)
    return 0


def udp(source_port: int, host: str, port: int, marker: bytes) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.bind(("", source_port))
        sock.sendto(marker, (host, port))
    return 0


def ip(packet: bytes) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as sock:
        sock.sendto(packet, (socket.inet_ntoa(packet[16:20]), 0))
    return 0


def main(argv: list[str]) -> int:
    command, *args = argv
    if command == "send":
        return send(args[0], args[1:])
    if command == "sniff":
        return sniff(args[0], float(args[1]), args[2].encode())
    if command == "udp":
        return udp(int(args[0]), args[1], int(args[2]), args[3].encode())
    if command == "ip":
        return ip(bytes.fromhex(args[0]))
    raise SystemExit(f"unknown command {command}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
