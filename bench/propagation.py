"""Propagation latency: a policy edit in the control service's folder until the kernel enforces it.

A node with 100 pods runs real `podfence control --source DIR` and `podfence agent` processes
(bench/_cluster.py). One policy, `gate`, isolates the target pod p0 and admits either the client
pod p2 (allow) or nobody (deny) on TCP 8080; each edit rewrites it to the other form, EDITS times.
From the moment of the write, a prober in p2 opens a new TCP connection to p0 every
PROBE_INTERVAL seconds (non-blocking, so probes overlap); a connection that completes is
"allowed", one without an answer after DENIED_AFTER seconds "dropped". The latency of an edit is
the send time of the first probe with the new verdict after which no probe shows the old one.
Its resolution is PROBE_INTERVAL; it includes the folder poll (POLL_INTERVAL), the control
service's resolve and send, the agent's reconcile and the kernel programming.

Run: `.venv/bin/python -m bench.propagation` (root). `BENCH_QUICK=1`: fewer edits.
"""

from __future__ import annotations

import errno
import json
import os
import select
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.dataplane.netns import inside
from bench import _cluster, _netlab

QUICK = os.environ.get("BENCH_QUICK") == "1"
PODS = 100
EDITS = 10 if QUICK else 50
POLL_INTERVAL = 0.02  # the control service's folder poll (its default is 0.2 s)
PROBE_INTERVAL = 0.002
DENIED_AFTER = 0.05  # a SYN unanswered this long was dropped (an allowed one answers in < 1 ms)
SETTLE_PROBES = 10  # consecutive probes with the new verdict that end one measurement
EDIT_TIMEOUT = 5.0
PAUSE_BETWEEN_EDITS = 0.2
TARGET_P99_MS = 100.0
LOG_ROOT = Path("/tmp/pfbench-propagation")
LINGER_RESET = struct.pack("ii", 1, 0)  # close without a FIN or TIME_WAIT
DATAPLANES = tuple(os.environ.get("BENCH_DATAPLANES", "bpf,iptables").split(","))
TARGET, CLIENT = "p0", "p2"  # p2 is app a2; the ring policy of p0's app (a0) admits only a1


def gate_policy(allow: bool) -> dict[str, Any]:
    admitted = {"role": "client"} if allow else {"role": "nobody"}
    return _cluster.ingress_policy("gate", {"role": "target"}, admitted)


@dataclass
class Probe:
    sent: float
    sock: socket.socket
    allowed: bool | None = None


def probe_until_flip(address: str, port: int, new_verdict: bool, since: float) -> float | None:
    """Probe from this thread's netns; the send time of the first probe of the settled new verdict."""
    pending: dict[int, Probe] = {}
    finished: list[Probe] = []
    next_send = time.monotonic()
    poller = select.epoll()
    try:
        while time.monotonic() - since < EDIT_TIMEOUT:
            now = time.monotonic()
            if now >= next_send:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
                code = sock.connect_ex((address, port))
                if code not in (errno.EINPROGRESS, 0):
                    sock.close()
                else:
                    pending[sock.fileno()] = Probe(now, sock)
                    poller.register(sock.fileno(), select.EPOLLOUT)
                next_send = now + PROBE_INTERVAL
            for fd, _ in poller.poll(max(0.0, next_send - time.monotonic())):
                probe = pending.pop(fd)
                poller.unregister(fd)
                probe.allowed = probe.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
                probe.sock.close()
                finished.append(probe)
            now = time.monotonic()
            for fd, probe in list(pending.items()):
                if now - probe.sent > DENIED_AFTER:
                    pending.pop(fd)
                    poller.unregister(fd)
                    probe.allowed = False
                    probe.sock.close()
                    finished.append(probe)
            finished.sort(key=lambda p: p.sent)
            flip = _settled_flip(finished, new_verdict)
            if flip is not None:
                return flip - since
        return None
    finally:
        for probe in pending.values():
            probe.sock.close()
        poller.close()


def _settled_flip(probes: list[Probe], new_verdict: bool) -> float | None:
    """Send time of the first probe of the last run of new-verdict probes, once that run is long."""
    run_start: float | None = None
    run_length = 0
    for probe in probes:
        if probe.allowed == new_verdict:
            if run_length == 0:
                run_start = probe.sent
            run_length += 1
        else:
            run_length = 0
    return run_start if run_length >= SETTLE_PROBES else None


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def breakdown(edits: list[tuple[float, float]], control_log: Path) -> dict[str, Any]:
    """Median time of each stage: write -> the control service's new version (folder poll +
    resolve; from its JSON log, millisecond timestamps) -> the prober saw the new verdict
    (stream, the agent's decoding, reconcile and kernel programming). The agent runs at info
    level: its debug logging (pyroute2's included) would slow the very path measured."""
    versions = [
        _cluster.log_time(e)
        for e in _cluster.read_json_log(control_log)
        if e.get("msg", "").startswith("policy version ")
    ]
    control_ms, rest_ms = [], []
    for wall, latency in edits:
        version_at = next((t for t in versions if t >= wall - 0.001), None)
        if version_at is None:
            continue
        control_ms.append((version_at - wall) * 1000)
        rest_ms.append((wall + latency - version_at) * 1000)
    stages: dict[str, Any] = {
        "matched_edits": len(control_ms),
        "write_to_control_version": _median_or_none(control_ms),
        "control_version_to_verdict_seen": _median_or_none(rest_ms),
    }
    return stages


def _median_or_none(values: list[float]) -> float | None:
    return round(statistics.median(values), 1) if values else None


def measure(dataplane: str, tag: str) -> dict[str, Any]:
    workdir = LOG_ROOT / dataplane  # kept after the run: the processes' logs explain outliers
    shutil.rmtree(workdir, ignore_errors=True)
    folder = workdir / "source"
    folder.mkdir(parents=True)
    with _cluster.node_with_pods(tag, PODS) as topology:
        labels = {TARGET: {"role": "target"}, CLIENT: {"role": "client"}}
        _cluster.write_base_folder(folder, topology, labels)
        gate = folder / "30-gate.yaml"
        _cluster.write_yaml(gate, [gate_policy(allow=True)])
        target, client = topology.pods[TARGET], topology.pods[CLIENT]
        processes = _cluster.Processes(topology, folder, workdir, dataplane, POLL_INTERVAL)
        server = _netlab.in_netns_argv(
            target.netns, _netlab.python_argv("bench._workload", "crr-server", str(_cluster.SERVE_PORT))
        )
        server_process = subprocess.Popen(
            server, stdout=subprocess.PIPE, env=_netlab.child_env(), start_new_session=True
        )
        try:
            processes.start_control()
            processes.start_agent()
            processes.wait(lambda: processes.caught_up(PODS), "agent caught up", 120)
            latencies: dict[str, list[float]] = {"to_deny": [], "to_allow": []}
            missed = 0
            edits: list[tuple[float, float]] = []  # (wall-clock write time, seconds to the flip)
            allow = True
            with inside(client.netns):
                for _ in range(EDITS):
                    allow = not allow
                    since, wall = time.monotonic(), time.time()
                    _cluster.write_yaml(gate, [gate_policy(allow)])
                    latency = probe_until_flip(target.ip, _cluster.SERVE_PORT, allow, since)
                    if latency is None:
                        missed += 1
                    else:
                        latencies["to_allow" if allow else "to_deny"].append(latency * 1000)
                        edits.append((wall, latency))
                    time.sleep(PAUSE_BETWEEN_EDITS)
            metrics = processes.agent_metrics()
        finally:
            processes.stop()
            os.killpg(server_process.pid, signal.SIGKILL)
            server_process.wait()
        stages = breakdown(edits, workdir / "control.log")
        # The agent's own measure of dataplane.apply() time, averaged over every apply it made.
        count = metrics.get("podfence_policy_programming_seconds_count", 0)
        if count:
            stages["agent_apply_mean_ms"] = round(
                1000 * metrics["podfence_policy_programming_seconds_sum"] / count, 1
            )
        every = latencies["to_allow"] + latencies["to_deny"]
        if not every:
            return {"error": f"no edit took effect within {EDIT_TIMEOUT} s", "missed": missed}
        return {
            "edits": EDITS,
            "missed": missed,
            "p50_ms": round(percentile(every, 0.50), 1),
            "p99_ms": round(percentile(every, 0.99), 1),
            "max_ms": round(max(every), 1),
            "to_allow_p50_ms": _median_or_none(latencies["to_allow"]),
            "to_deny_p50_ms": _median_or_none(latencies["to_deny"]),
            "stages_p50_ms": stages,
            "target_p99_ms": TARGET_P99_MS,
            "meets_target": percentile(every, 0.99) < TARGET_P99_MS and missed == 0,
        }


def run() -> dict[str, Any]:
    results: dict[str, Any] = {
        "load_average": [round(x, 2) for x in os.getloadavg()],  # the neighbours' load, for context
        "pods": PODS,
        "poll_interval_s": POLL_INTERVAL,
        "probe_interval_ms": PROBE_INTERVAL * 1000,
    }
    for index, dataplane in enumerate(DATAPLANES):
        try:
            results[dataplane] = measure(dataplane, f"p{index}")
        except Exception as exc:  # one dataplane that cannot run here must not hide the other
            results[dataplane] = {"error": repr(exc)}
    return results


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
