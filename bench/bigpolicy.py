"""Big policies, from the folder source's file write to the node's ack (issue 27).

A node with PODS pods runs real `podfence control --source DIR` and `podfence agent` processes
(bench/_cluster.py). Each case writes one file of the folder (atomic replace) and waits until the
control service has a newer version and reports the node in sync with it (its
podfence_control_node_lag_versions is 0, i.e. the agent acked it after programming the kernel);
the time from the write to that scrape is the case's latency (resolution: SCRAPE_INTERVAL plus
one scrape). Cases:
  - ipblock: one NetworkPolicy whose ingress rule lists PEERS ipBlock /32 peers, selecting one pod;
  - ipblock_one_peer: one peer of that list replaced by another, EDITS times (YAML and JSON files:
    PyYAML's parser alone takes ~150 ms for the 450 KB text, JSON ~5 ms);
  - policies: PEERS single-rule policies (one ipBlock /32 each) spread over the pods' apps;
  - policies_one_peer: one of those policies' peer changed, EDITS times;
  - namespaces: NAMESPACES namespaces x PODS_PER_NAMESPACE pods on other nodes, admitted by one
    namespace-selector policy on every local pod (their IPs reach the node as identities);
  - namespaces_one_pod: one remote pod's IP changed, EDITS times.
For each: latency p50/p99 (one-shot cases: the single figure), and the agent's CPU seconds and
peak RSS over the case. Both dataplanes (BENCH_DATAPLANES).

Run: `.venv/bin/python -m bench.bigpolicy` (root). `BENCH_QUICK=1`: fewer edits, 1,000 peers.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import yaml

from bench import _cluster, _proc

QUICK = os.environ.get("BENCH_QUICK") == "1"
PODS = 20
PEERS = 1_000 if QUICK else 10_000
NAMESPACES = 100 if QUICK else 1_000
PODS_PER_NAMESPACE = 10
EDITS = 3 if QUICK else 10
POLL_INTERVAL = 0.02  # the control service's folder poll (events wake it earlier)
SCRAPE_INTERVAL = 0.005
REFUSAL_CHECK_S = 1.0  # how often the agent is asked whether it refused the version
CASE_TIMEOUT = 600.0
TARGETS_S = {"bpf": 1.0, "iptables": 2.0}
TARGET_ONE_PEER_S = 0.1
LOG_ROOT = Path("/tmp/pfbench-bigpolicy")
DATAPLANES = tuple(os.environ.get("BENCH_DATAPLANES", "bpf,iptables").split(","))
CASES = tuple(os.environ.get("BENCH_CASES", "ipblock,policies,namespaces").split(","))
TARGET = "p0"


def host_peer(index: int) -> str:
    """The index-th /32 of 172.16.0.0/12 (never a pod address of the bench node)."""
    return f"172.{16 + index // 65536}.{(index // 256) % 256}.{index % 256}/32"


def ipblock_policy(peers: list[str]) -> dict[str, Any]:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"namespace": _cluster.NAMESPACE, "name": "allow-list"},
        "spec": {
            "podSelector": {"matchLabels": {"role": "target"}},
            "policyTypes": ["Ingress"],
            "ingress": [
                {
                    "from": [{"ipBlock": {"cidr": peer}} for peer in peers],
                    "ports": [{"protocol": "TCP", "port": _cluster.SERVE_PORT}],
                }
            ],
        },
    }


def single_rule_policy(index: int, peer: str) -> dict[str, Any]:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"namespace": _cluster.NAMESPACE, "name": f"single-{index}"},
        "spec": {
            "podSelector": {"matchLabels": {"app": f"a{index % _cluster.APPS}"}},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"ipBlock": {"cidr": peer}}], "ports": [{"port": _cluster.SERVE_PORT}]}],
        },
    }


def remote_objects(moved: int | None = None) -> list[dict[str, Any]]:
    """NAMESPACES namespaces of PODS_PER_NAMESPACE pods on another node; pod `moved` gets another IP."""
    objects: list[dict[str, Any]] = []
    for n in range(NAMESPACES):
        name = f"tenant-{n}"
        objects.append({"apiVersion": "v1", "kind": "Namespace",
                        "metadata": {"name": name, "labels": {"tier": "tenant"}}})
        for k in range(PODS_PER_NAMESPACE):
            index = n * PODS_PER_NAMESPACE + k
            ip = host_peer(index + (1 << 19 if index == moved else 0)).split("/")[0]
            pod = _cluster.pod_manifest(f"r{k}", ip, {"app": "remote"}, node="elsewhere")
            pod["metadata"]["namespace"] = name
            objects.append(pod)
    return objects


def tenants_policy() -> dict[str, Any]:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"namespace": _cluster.NAMESPACE, "name": "from-tenants"},
        "spec": {
            "podSelector": {},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"tier": "tenant"}}}]}],
        },
    }


def prepare(path: Path, objects: list[dict[str, Any]]) -> Path:
    """The file's new text beside it, to be renamed over it (the write the clock starts at);
    JSON as `kubectl get -o json` writes a list when the suffix says so."""
    temporary = path.with_name(f".{path.name}.tmp")
    if path.suffix == ".json":
        temporary.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}))
    else:
        temporary.write_text(yaml.safe_dump_all(objects, sort_keys=False))
    return temporary


def write(path: Path, objects: list[dict[str, Any]]) -> None:
    os.replace(prepare(path, objects), path)


class Node:
    """The processes of one dataplane, and the write -> ack measurement."""

    def __init__(self, processes: _cluster.Processes) -> None:
        self.processes = processes

    def in_sync(self, after_version: int) -> bool:
        try:
            metrics = _cluster.scrape(self.processes.node.netns, self.processes.control_metrics_port)
        except OSError:
            return False
        version = metrics.get("podfence_control_policy_version", -1)
        lag = metrics.get(f"podfence_control_node_lag_versions{{node={_cluster.NODE}}}")
        return version > after_version and lag == 0

    def apply_errors(self) -> float:
        return self.processes.agent_metrics().get("podfence_apply_errors_total", 0.0)

    def check_refused(self, errors_before: float) -> None:
        if self.apply_errors() > errors_before:
            raise RuntimeError(f"the agent refused a version; see {self.processes.workdir}/agent.log")

    def write_and_wait(self, path: Path, objects: list[dict[str, Any]]) -> dict[str, float]:
        """Seconds from the file write to the ack, and the agent's CPU seconds meanwhile."""
        before = self.processes.control_version()
        pid = _cluster.agent_pid(self.processes)
        prepared = prepare(path, objects)  # serialising 10,000 peers is the bench's time, not podfence's
        errors = self.apply_errors()
        cpu = _proc.cpu_seconds(pid)
        started = time.monotonic()
        os.replace(prepared, path)

        last_check = started

        def acked() -> bool:
            nonlocal last_check
            if self.in_sync(before):
                return True
            # A nack is never followed by an ack of that version. Asked of the agent every
            # REFUSAL_CHECK_S only: its scrape reads the dataplane's counters (on iptables, the
            # whole filter table: ~0.3 s of its CPU with 10,000 chains), which, every 5 ms, was
            # most of what the agent did while the bench waited for it.
            if time.monotonic() - last_check >= REFUSAL_CHECK_S:
                last_check = time.monotonic()
                self.check_refused(errors)
            return False

        done = self.processes.wait(acked, f"ack of {path.name}", CASE_TIMEOUT, interval=SCRAPE_INTERVAL)
        return {"seconds": done - started, "agent_cpu_s": _proc.cpu_seconds(pid) - cpu}


def summary(samples: list[dict[str, float]], target: float) -> dict[str, Any]:
    seconds = sorted(s["seconds"] for s in samples)
    p99 = seconds[min(len(seconds) - 1, round(0.99 * (len(seconds) - 1)))]
    return {
        "runs": len(seconds),
        "p50_ms": round(1000 * statistics.median(seconds), 1),
        "p99_ms": round(1000 * p99, 1),
        "agent_cpu_ms_mean": round(1000 * statistics.mean(s["agent_cpu_s"] for s in samples), 1),
        "target_ms": target * 1000,
        "meets_target": p99 < target,
    }


def run_cases(node: Node, folder: Path, dataplane: str) -> dict[str, Any]:
    results: dict[str, Any] = {}
    target = TARGETS_S[dataplane]
    peers = [host_peer(i) for i in range(PEERS)]
    if "ipblock" in CASES:
        for suffix in ("yaml", "json"):
            path = folder / f"40-allow-list.{suffix}"
            first = node.write_and_wait(path, [ipblock_policy(peers)])
            edits = []
            for edit in range(EDITS):
                changed = list(peers)
                changed[edit] = host_peer(PEERS + edit)  # a new address in place of an old one
                edits.append(node.write_and_wait(path, [ipblock_policy(changed)]))
            results[f"ipblock_{suffix}"] = summary([first], target)
            results[f"ipblock_one_peer_{suffix}"] = summary(edits, TARGET_ONE_PEER_S)
            node.write_and_wait(path, [])  # the next format starts from no big policy
            path.unlink()
    if "policies" in CASES:
        path = folder / "50-singles.json"
        policies = [single_rule_policy(i, peers[i]) for i in range(PEERS)]
        results["policies"] = summary([node.write_and_wait(path, policies)], target)
        edits = []
        for edit in range(EDITS):
            edited = list(policies)
            edited[edit] = single_rule_policy(edit, host_peer(PEERS + edit))
            edits.append(node.write_and_wait(path, edited))
        results["policies_one_peer"] = summary(edits, TARGET_ONE_PEER_S)
        node.write_and_wait(path, [])
        path.unlink()
    if "namespaces" in CASES:
        remote, policy = folder / "60-tenants.json", folder / "61-from-tenants.json"
        write(remote, remote_objects())
        results["namespaces"] = summary([node.write_and_wait(policy, [tenants_policy()])], target)
        edits = [node.write_and_wait(remote, remote_objects(moved=edit)) for edit in range(EDITS)]
        results["namespaces_one_pod"] = summary(edits, TARGET_ONE_PEER_S)
    results["agent_peak_rss_mib"] = round(
        _proc.memory_kib(_cluster.agent_pid(node.processes)).get("VmHWM", 0) / 1024, 1
    )
    return results


def measure(dataplane: str, tag: str) -> dict[str, Any]:
    workdir = LOG_ROOT / dataplane  # kept after the run: the processes' logs explain outliers
    shutil.rmtree(workdir, ignore_errors=True)
    folder = workdir / "source"
    folder.mkdir(parents=True)
    with _cluster.node_with_pods(tag, PODS) as topology:
        _cluster.write_base_folder(folder, topology, {TARGET: {"role": "target"}})
        processes = _cluster.Processes(topology, folder, workdir, dataplane, POLL_INTERVAL)
        try:
            processes.start_control()
            processes.start_agent()
            processes.wait(lambda: processes.caught_up(PODS), "agent caught up", 120)
            return run_cases(Node(processes), folder, dataplane)
        finally:
            processes.stop()


def run() -> dict[str, Any]:
    results: dict[str, Any] = {
        "load_average": [round(x, 2) for x in os.getloadavg()],  # the neighbours' load, for context
        "pods": PODS,
        "peers": PEERS,
        "namespaces": NAMESPACES,
        "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
    }
    for index, dataplane in enumerate(DATAPLANES):
        try:
            results[dataplane] = measure(dataplane, f"g{index}")
        except Exception as exc:  # one dataplane that cannot run here must not hide the other
            results[dataplane] = {"error": repr(exc)}
    return results


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
