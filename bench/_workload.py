"""Traffic generators the datapath benchmark runs inside pod namespaces (`python -m bench._workload`).

* `crr-server PORT` / `crr-client IP PORT SECONDS WORKERS`: TCP connect, one-byte request,
  one-byte response, close. The client runs a fixed number of closed-loop worker processes, so
  every variant gets the same CPU budget and a slower datapath shows up as fewer connections per
  second. Clients close with SO_LINGER 0 (RST) so TIME_WAIT never exhausts the ephemeral ports.
* `udp-sink PORT`: a bound socket that is never read (the kernel counts and drops what overflows);
  the benchmark counts packets delivered to the pod on its interface instead, which costs the
  receiver no CPU.
* `udp-blast IP PORT SECONDS FLOWS`: round-robin over FLOWS sockets, each its own source port,
  so the dataplane sees that many distinct 5-tuples. Prints packets sent.
Servers print "ready" once listening, so the benchmark can wait for them.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import struct
import sys
import time

REQUEST = b"q"
RESPONSE = b"r"
LINGER_RESET = struct.pack("ii", 1, 0)


def crr_server(port: int) -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("0.0.0.0", port))
    listener.listen(4096)
    # Two accept loops (one per core) so the server is never the only thing a variant waits on.
    # The benchmark starts servers in their own session and stops the whole process group.
    if os.fork() != 0:
        print("ready", flush=True)
    while True:
        conn, _ = listener.accept()
        try:
            if conn.recv(1):
                conn.sendall(RESPONSE)
        except OSError:
            pass
        finally:
            conn.close()


def _crr_worker(address: str, port: int, deadline: float, results: multiprocessing.Queue) -> None:
    done = 0
    while time.monotonic() < deadline:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        try:
            sock.settimeout(1.0)
            sock.connect((address, port))
            sock.sendall(REQUEST)
            if sock.recv(1) == RESPONSE:
                done += 1
        except OSError:
            pass
        finally:
            sock.close()
    results.put(done)


def crr_client(address: str, port: int, seconds: float, workers: int) -> None:
    results: multiprocessing.Queue = multiprocessing.Queue()
    start = time.monotonic() + 0.2  # every worker forked before the clock starts
    processes = [
        multiprocessing.Process(target=_crr_worker, args=(address, port, start + seconds, results))
        for _ in range(workers)
    ]
    for process in processes:
        process.start()
    total = sum(results.get() for _ in processes)
    for process in processes:
        process.join()
    print(total / seconds, flush=True)


def udp_sink(port: int) -> None:
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("0.0.0.0", port))
    print("ready", flush=True)
    while True:
        time.sleep(3600)


def udp_blast(address: str, port: int, seconds: float, flows: int) -> None:
    sockets = []
    for _ in range(flows):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        sock.connect((address, port))
        sockets.append(sock)
    payload = os.urandom(32)
    sent = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for sock in sockets:
            try:
                sock.send(payload)
                sent += 1
            except BlockingIOError:
                pass
    print(sent, flush=True)


def main(argv: list[str]) -> int:
    command, args = argv[0], argv[1:]
    if command == "crr-server":
        crr_server(int(args[0]))
    elif command == "crr-client":
        crr_client(args[0], int(args[1]), float(args[2]), int(args[3]))
    elif command == "udp-sink":
        udp_sink(int(args[0]))
    elif command == "udp-blast":
        udp_blast(args[0], int(args[1]), float(args[2]), int(args[3]))
    else:
        print(f"unknown command {command}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
