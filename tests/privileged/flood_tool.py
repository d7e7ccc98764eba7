"""Conntrack flood helpers, run inside a pod netns (nsenter --net=...). Issue 21, item 10.

flood HOST FIRST_PORT COUNT   UDP datagrams to each of COUNT ports of HOST: COUNT new flows, each
                              used twice in a row (a flow seen once only is the first an LRU
                              evicts: the kernel's BPF LRU moves an entry looked up again to its
                              active list), split among every CPU in turn (each CPU keeps a list
                              of the entries it inserted last, which only its own inserts
                              flush to where they can be evicted); exits at once
answer BIND_HOST PORT         prints "ready" once bound to (BIND_HOST, PORT), "got" when a datagram
                              arrives within 10 s ("nothing" otherwise), then on a line of stdin
                              sends "answer" back to its sender and exits
ask BIND_HOST PORT HOST PEER_PORT  sends one datagram from (BIND_HOST, PORT) to (HOST, PEER_PORT),
                              prints "sent", then prints "answered" when the answer arrives
                              within 60 s ("silent" otherwise)
"""

from __future__ import annotations

import os
import socket
import sys


def _socket(host: str) -> socket.socket:
    return socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)


def flood(host: str, first_port: int, count: int) -> None:
    chunk = 64
    cpus = sorted(os.sched_getaffinity(0))
    share = -(-count // len(cpus))
    with _socket(host) as sock:
        for index, cpu in enumerate(cpus):
            os.sched_setaffinity(0, {cpu})
            last = min(first_port + (index + 1) * share, first_port + count)
            for start in range(first_port + index * share, last, chunk):
                ports = range(start, min(start + chunk, last))
                for _ in range(2):
                    for port in ports:
                        sock.sendto(b"x", (host, port))


def answer(bind_host: str, port: int) -> None:
    with _socket(bind_host) as sock:
        sock.bind((bind_host, port))
        print("ready", flush=True)
        sock.settimeout(10)
        try:
            _, sender = sock.recvfrom(64)
        except TimeoutError:
            print("nothing", flush=True)
            return
        print("got", flush=True)
        sys.stdin.readline()
        sock.sendto(b"answer", sender)


def ask(bind_host: str, port: int, host: str, peer_port: int) -> None:
    with _socket(host) as sock:
        sock.bind((bind_host, port))
        sock.sendto(b"ask", (host, peer_port))
        print("sent", flush=True)
        sock.settimeout(60)
        try:
            sock.recvfrom(64)
        except TimeoutError:
            print("silent", flush=True)
            return
        print("answered", flush=True)


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    if command == "flood":
        flood(args[0], int(args[1]), int(args[2]))
    elif command == "answer":
        answer(args[0], int(args[1]))
    elif command == "ask":
        ask(args[0], int(args[1]), args[2], int(args[3]))
    else:
        sys.exit(f"unknown command {command}")
