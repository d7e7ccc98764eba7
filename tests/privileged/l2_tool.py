"""Raw frames in and out of a pod's interface, run inside the pod's netns (nsenter): a hostile pod
that puts any frame on its veth, and a victim that sees what arrives.

    l2_tool.py send IFACE HEX [HEX...]       send each frame as is (AF_PACKET)
    l2_tool.py sniff IFACE SECONDS MARKER    print "ready", then after SECONDS the number of
                                             frames received that contain MARKER (hex)
"""

from __future__ import annotations

import socket
import sys
import time

ETH_P_ALL = 0x0003


def send(interface: str, frames: list[bytes]) -> None:
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as sock:
        sock.bind((interface, 0))
        for frame in frames:
            sock.send(frame)


def sniff(interface: str, seconds: float, marker: bytes) -> int:
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL)) as sock:
        sock.bind((interface, 0))
        sock.settimeout(0.05)
        print("ready", flush=True)
        seen = 0
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                frame, address = sock.recvfrom(65535)
            except TimeoutError:
                continue
            if address[2] != socket.PACKET_OUTGOING and marker in frame:
                seen += 1
        return seen


def main(argv: list[str]) -> int:
    if argv[0] == "send":
        send(argv[1], [bytes.fromhex(h) for h in argv[2:]])
        return 0
    if argv[0] == "sniff":
        print(sniff(argv[1], float(argv[2]), bytes.fromhex(argv[3])), flush=True)
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
