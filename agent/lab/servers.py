"""The pods' servers: one process serving every lab pod's TCP, UDP and SCTP ports.

Like agnhost in the upstream e2e pods, each server answers with the pod's name: TCP sends it and
closes, UDP replies to each datagram, SCTP answers INIT with INIT ACK (see agent.lab.sctp). A socket
belongs to the netns it was created in, so this process enters each pod's netns in turn, opens that
pod's sockets there, and then serves them all from one selector loop.

Run as `python -m agent.lab.servers CONFIG READY_FILE`; READY_FILE appears once every socket is bound.
The lab starts it with `start(pods)`, which writes CONFIG and waits for READY_FILE.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyroute2.netns import setns

from agent.lab import dns
from agent.lab.machine import RUN_DIR, LabError, child_environment
from agent.lab.sctp import CHUNK_INIT, IPPROTO_SCTP, build_init_ack, parse_sctp, strip_ipv4_header

if TYPE_CHECKING:
    from agent.lab.topology import LabPod

log = logging.getLogger(__name__)
Handler = Callable[[socket.socket], None]
DNS_PORT = 53


def _tcp_handler(reply: bytes) -> Handler:
    def accept(listener: socket.socket) -> None:
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            return
        # The client only needs the handshake; the reply is a courtesy, as agnhost sends the hostname.
        with conn, contextlib.suppress(OSError):
            conn.setblocking(False)
            conn.send(reply)

    return accept


def _udp_handler(reply: bytes, dns_records: dict[str, list[str]] | None = None) -> Handler:
    """Echo the pod's name; on a DNS port, answer well-formed DNS queries from `dns_records`."""

    def answer(sock: socket.socket) -> None:
        with contextlib.suppress(OSError):
            datagram, peer = sock.recvfrom(2048)
            dns_answer = dns.answer(datagram, dns_records) if dns_records is not None else None
            sock.sendto(dns_answer or reply, peer)

    return answer


def _sctp_handler(ports: set[int]) -> Handler:
    def answer(sock: socket.socket) -> None:
        try:
            packet, (source, *_) = sock.recvfrom(65535)
        except OSError:
            return
        # Raw IPv4 sockets read the IP header too; raw IPv6 sockets read only the payload.
        payload = strip_ipv4_header(packet) if sock.family == socket.AF_INET else packet
        chunk = parse_sctp(payload) if payload is not None else None
        if chunk is not None and chunk.chunk_type == CHUNK_INIT and chunk.dst_port in ports:
            with contextlib.suppress(OSError):
                sock.sendto(build_init_ack(chunk, random.getrandbits(32) or 1), (source, 0))

    return answer


def open_pod_sockets(
    netns_path: str, name: str, ports: list[tuple[int, str]], dns_records: dict[str, list[str]] | None = None
) -> list[tuple[socket.socket, Handler]]:
    """Enter the pod's netns and bind its servers there."""
    setns(netns_path, flags=0)
    reply = (name + "\n").encode()
    opened: list[tuple[socket.socket, Handler]] = []
    sctp_ports = {port for port, proto in ports if proto == "SCTP"}
    for port, proto in ports:
        # One dual-stack socket per port serves IPv4 (as mapped addresses) and IPv6 alike.
        if proto == "TCP":
            sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("::", port))
            sock.listen(128)
            opened.append((sock, _tcp_handler(reply)))
        elif proto == "UDP":
            sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind(("::", port))
            opened.append((sock, _udp_handler(reply, dns_records if port == DNS_PORT else None)))
    if sctp_ports:
        for family in (socket.AF_INET, socket.AF_INET6):
            opened.append((socket.socket(family, socket.SOCK_RAW, IPPROTO_SCTP), _sctp_handler(sctp_ports)))
    for sock, _ in opened:
        sock.setblocking(False)
    return opened


def serve(config: dict[str, Any], ready_file: Path) -> None:
    selector = selectors.DefaultSelector()
    for pod in config["pods"]:
        ports = [(int(port), str(proto)) for port, proto in pod["ports"]]
        netns_path = f"/run/netns/{pod['netns']}"
        for sock, handler in open_pod_sockets(netns_path, str(pod["name"]), ports, config["dns_records"]):
            selector.register(sock, selectors.EVENT_READ, handler)
    ready_file.write_text(str(os.getpid()))
    while True:
        for key, _ in selector.select():
            key.data(key.fileobj)


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s servers %(levelname)s %(message)s")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    config_path, ready_path = argv
    serve(json.loads(Path(config_path).read_text()), Path(ready_path))
    return 0


SERVERS_PID = "servers.pid"


def start(pods: Iterable[LabPod]) -> None:
    """Start the one process that serves every pod's ports, and wait until all are bound.

    A pod serving UDP 53 is the cluster DNS: it resolves every pod's Service name (agent.lab.dns).
    """
    pods = list(pods)
    records = {
        dns.service_name(p.spec.namespace, p.spec.name): [a for a in (p.service_ip, p.service_ip6) if a]
        for p in pods
    }
    config = {
        "pods": [
            {
                "netns": p.netns,
                "name": p.spec.name,
                "ports": [[sp.port, sp.protocol.value] for sp in p.spec.ports],
            }
            for p in pods
        ],
        "dns_records": records,
    }
    config_path = RUN_DIR / "servers.json"
    ready_path = RUN_DIR / "servers.ready"
    config_path.write_text(json.dumps(config))
    ready_path.unlink(missing_ok=True)
    log_file = (RUN_DIR / "servers.log").open("ab")
    process = subprocess.Popen(
        [sys.executable, "-m", "agent.lab.servers", str(config_path), str(ready_path)],
        stdout=log_file,
        stderr=log_file,
        env=child_environment(),
        start_new_session=True,  # a Ctrl-C in the terminal reaches the lab's cleanup, not the servers
    )
    (RUN_DIR / SERVERS_PID).write_text(str(process.pid))
    deadline = time.monotonic() + 15
    while not ready_path.exists():
        if process.poll() is not None:
            raise LabError(f"pod servers exited with {process.returncode}; see {RUN_DIR / 'servers.log'}")
        if time.monotonic() > deadline:
            raise LabError("pod servers did not become ready within 15 s")
        time.sleep(0.05)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
