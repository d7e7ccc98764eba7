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
* `crr-sliced PORT SECONDS WORKERS SLICE NETNS=IP...` / `stream-sliced PORT SECONDS SLICE NETNS=IP...`:
  the same connect-request-close loop, or one bulk TCP stream into a `stream-sink PORT`, against
  several variants in turn, switching the client's network namespace every slice: time-sliced
  interleaving. Run in the root namespace; prints one JSON object whose "rounds" hold a list per
  round with one figure per variant, in argument order.
Servers print "ready" once listening, so the benchmark can wait for them.

Why time slices: this machine's neighbours take the CPU in bursts of seconds, which is what made
runs of a second each spread 0.6-1.4x against themselves. Slots of tens of milliseconds rotated
over every variant put each burst on all variants alike, so the totals of one run compare the
variants as if they had run side by side (bench/datapath.py takes the ratios of the totals).
"""

from __future__ import annotations

import ctypes
import json
import multiprocessing
import os
import random
import socket
import struct
import sys
import time

CLONE_NEWNET = 0x40000000
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


def _crr_once(address: str, port: int) -> bool:
    """One connection: connect, request, response, close (RST). True if it was answered."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
    try:
        sock.settimeout(1.0)
        sock.connect((address, port))
        sock.sendall(REQUEST)
        return sock.recv(1) == RESPONSE
    except OSError:
        return False
    finally:
        sock.close()


def _crr_worker(address: str, port: int, deadline: float, results: multiprocessing.Queue) -> None:
    done = 0
    while time.monotonic() < deadline:
        done += _crr_once(address, port)
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


# --- time-sliced interleaving ----------------------------------------------------------------


def _setns(fd: int) -> None:
    if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "setns")


class Slices:
    """Slots of `length` seconds from `start`, each given to one variant: each round of
    len(variants) slots visits every variant once, in an order shuffled per round by a seed every
    worker shares (so all workers are in the same variant at once, and no variant always follows
    the same one)."""

    def __init__(self, start: float, length: float, variants: int) -> None:
        self.start, self.length, self.variants = start, length, variants
        self._orders: dict[int, list[int]] = {}

    def at(self, now: float) -> tuple[int, int, float]:
        """(round, variant, seconds since the slot began) at monotonic time `now` (>= start)."""
        slot = int((now - self.start) / self.length)
        round_, position = divmod(slot, self.variants)
        order = self._orders.get(round_)
        if order is None:
            order = list(range(self.variants))
            random.Random(round_).shuffle(order)
            self._orders = {round_: order}
        return round_, order[position], now - self.start - slot * self.length


def _crr_sliced_worker(targets: list[tuple[str, str]], port: int, slices: Slices, end: float,
                       results: multiprocessing.Queue) -> None:
    fds = [os.open(f"/run/netns/{netns}", os.O_RDONLY) for netns, _ in targets]
    done: dict[int, list[int]] = {}  # round -> connections per variant
    current = -1
    while (now := time.monotonic()) < end:
        if now < slices.start:
            time.sleep(slices.start - now)
            continue
        round_, variant, _ = slices.at(now)
        if variant != current:
            _setns(fds[variant])
            current = variant
        if _crr_once(targets[variant][1], port):
            done.setdefault(round_, [0] * len(targets))[variant] += 1
    results.put(done)


def crr_sliced(targets: list[tuple[str, str]], port: int, seconds: float, workers: int,
               slice_s: float) -> dict[str, object]:
    """Connections per round and variant, summed over `workers` closed-loop processes."""
    slices = Slices(time.monotonic() + 0.3, slice_s, len(targets))
    end = slices.start + seconds
    results: multiprocessing.Queue = multiprocessing.Queue()
    processes = [
        multiprocessing.Process(target=_crr_sliced_worker, args=(targets, port, slices, end, results))
        for _ in range(workers)
    ]
    for process in processes:
        process.start()
    rounds: dict[int, list[int]] = {}
    for _ in processes:
        for round_, counts in results.get().items():
            total = rounds.setdefault(round_, [0] * len(targets))
            for variant, count in enumerate(counts):
                total[variant] += count
    for process in processes:
        process.join()
    complete = [rounds[r] for r in sorted(rounds) if (r + 1) * len(targets) * slice_s <= seconds]
    return {"unit": "connections per slice", "slice_seconds": slice_s, "rounds": complete}


STREAM_CHUNK = 256 * 1024
STREAM_WARMUP = 0.02  # of each slot: the new stream's empty send buffer fills before counting starts


def stream_sink(port: int) -> None:
    """Reads every connection to the end, one thread each (only one is busy at a time)."""
    import threading

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("0.0.0.0", port))
    listener.listen(64)

    def drain(conn: socket.socket) -> None:
        buffer = bytearray(1 << 20)
        with conn:
            while conn.recv_into(buffer):
                pass

    print("ready", flush=True)
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=drain, args=(conn,), daemon=True).start()


def stream_sliced(
    targets: list[tuple[str, str]], port: int, seconds: float, slice_s: float
) -> dict[str, object]:
    """One bulk TCP stream per variant (opened inside its namespace), written in turn: bytes
    accepted per round and variant after each slot's warm-up, scaled to the whole slot."""
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    streams = []
    for netns, address in targets:
        fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
        _setns(fd)
        os.close(fd)
        streams.append(socket.create_connection((address, port), timeout=5))
    _setns(home)
    os.close(home)
    chunk = memoryview(bytearray(STREAM_CHUNK))
    slices = Slices(time.monotonic() + 0.1, slice_s, len(targets))
    end = slices.start + seconds
    rounds: dict[int, list[float]] = {}
    while (now := time.monotonic()) < end:
        if now < slices.start:
            time.sleep(slices.start - now)
            continue
        round_, variant, into_slot = slices.at(now)
        sent = streams[variant].send(chunk)
        if into_slot >= STREAM_WARMUP:
            rounds.setdefault(round_, [0.0] * len(targets))[variant] += sent
    for stream in streams:
        stream.close()
    scale = slice_s / (slice_s - STREAM_WARMUP)
    whole = [r for r in sorted(rounds) if (r + 1) * len(targets) * slice_s <= seconds]
    complete = [[sent * scale for sent in rounds[r]] for r in whole]
    return {"unit": "bytes per slice", "slice_seconds": slice_s, "rounds": complete}


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
    elif command in ("crr-sliced", "stream-sliced"):
        targets = [(netns, ip) for netns, ip in (arg.split("=", 1) for arg in args if "=" in arg)]
        numbers = [arg for arg in args if "=" not in arg]
        if command == "crr-sliced":
            port, seconds, workers, slot = numbers
            result = crr_sliced(targets, int(port), float(seconds), int(workers), float(slot))
        else:
            result = stream_sliced(targets, int(numbers[0]), float(numbers[1]), float(numbers[2]))
        print(json.dumps(result), flush=True)
    elif command == "stream-sink":
        stream_sink(int(args[0]))
    elif command == "udp-blast":
        udp_blast(args[0], int(args[1]), float(args[2]), int(args[3]))
    else:
        print(f"unknown command {command}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
