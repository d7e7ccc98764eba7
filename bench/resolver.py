"""Resolver benchmark: full resolution and incremental updates on a synthetic large cluster.

Two sizes (SIZES), each measured in an interpreter of its own: 10,000 pods in 500 namespaces on
100 nodes with 2,000 policies, and 100,000 pods in 5,000 namespaces on 1,000 nodes with 10,000
policies (issue 25's scale: full resolution < 10 s, incremental median < 5 ms). Policies mix
same-namespace pod selectors, namespace selectors (by label and by the automatic name label),
`{}` selectors, ipBlocks with excepts, numeric and named ports (ingress and egress). Reports full
resolution time (all objects in, NodePolicy for every node out), median/p99 incremental update
time per event kind (the event plus take_dirty_nodes() plus node_policy() for every dirty node,
i.e. what the control service does per event) and peak RSS. Run: `.venv/bin/python -m bench
resolver` (both sizes), or `.venv/bin/python -m bench.resolver [SIZE]` for one; SIZE `30k` is a
third of the large size (same shapes, ~3 minutes) for iterating, not run by `run()`.
"""

from __future__ import annotations

import gc
import ipaddress
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from agent.model.objects import (
    ContainerPort,
    IPBlock,
    KubeObject,
    LabelSelector,
    Namespace,
    NetworkPolicy,
    Operator,
    Peer,
    Pod,
    PolicyType,
    PortSpec,
    Protocol,
    Requirement,
    Rule,
    labels_from_dict,
)
from agent.policy.resolver import Resolver
from bench import _proc


@dataclass(frozen=True)
class Size:
    namespaces: int
    pods: int
    policies: int
    nodes: int
    targets: dict[str, float]

    @property
    def teams(self) -> int:
        """Ten namespaces a team at every size: a cluster ten times larger has ten times the
        teams, not ten times larger ones (50 teams at 100k pods: 18.6M allows, against 17.0M).
        What stays wide on purpose is shape 6: the front pods of every prod namespace, one
        identity (so one allow) per namespace: 1,250 policies x 4 pods x 3,333 namespaces =
        16.7M of the 17.0M allows at 100k pods (0.33M of 0.40M at 10k)."""
        return max(1, self.namespaces // 10)


SIZES = {
    "10k": Size(500, 10_000, 2_000, 100,
                {"full_resolution_s": 2.0, "incremental_median_ms": 5.0, "peak_rss_mb": 400}),
    # For iteration: a third of the large size (every count x0.3, same shapes); not in run().
    "30k": Size(1_500, 30_000, 3_000, 300, {"full_resolution_s": 3.0, "incremental_median_ms": 5.0}),
    "100k": Size(5_000, 100_000, 10_000, 1_000, {"full_resolution_s": 10.0, "incremental_median_ms": 5.0}),
}
APPS_PER_NAMESPACE = 5
SAMPLES = 200
SEED = 20261122
# PODFENCE_BENCH_CLOCK=cpu times every figure (full resolution, each update, and the load and node
# split) by this process's CPU time rather than the wall: on a machine shared with a load of 10-20
# the wall is 2-10x the CPU and moves with the neighbours, the CPU much less.
CLOCK_NAME = os.environ.get("PODFENCE_BENCH_CLOCK", "wall")
CLOCK = time.process_time if CLOCK_NAME == "cpu" else time.perf_counter

IN, EG = frozenset({PolicyType.INGRESS}), frozenset({PolicyType.EGRESS})
PORTS = (ContainerPort(8080, Protocol.TCP, "http"), ContainerPort(9090, Protocol.TCP, "metrics"))


def sel(**labels: str) -> LabelSelector:
    return LabelSelector(match_labels=labels_from_dict(labels))


def namespace(i: int, team: int) -> Namespace:
    return Namespace(f"ns-{i}", {"team": f"t{team}", "env": "prod" if i % 3 else "dev"})


def pod(ns: int, index: int, app: int, nodes: int) -> Pod:
    serial = ns * 100 + index  # index < 100
    address = ipaddress.ip_address("10.128.0.0") + serial
    return Pod(
        namespace=f"ns-{ns}",
        name=f"pod-{index}",
        node_name=f"node-{serial % nodes}",
        labels={"app": f"app-{app}", "tier": "front" if app == 0 else "back"},
        ips=(address,),
        ports=PORTS,
    )


def policy(rng: random.Random, ns: int, index: int, namespaces: int, port: int = 8080,
           teams: int = 50) -> NetworkPolicy:
    """One of eight shapes, chosen by index so the mix is stable."""
    name, namespace_name = f"pol-{index}", f"ns-{ns}"
    app = sel(app=f"app-{index % APPS_PER_NAMESPACE}")
    tcp = (PortSpec(Protocol.TCP, port),)
    shape = index % 8
    if shape == 0:  # default deny both ways
        return NetworkPolicy(namespace_name, name, LabelSelector(), IN | EG)
    if shape == 1:  # same-namespace app -> app on a numeric port
        peer = Peer(pod_selector=sel(app=f"app-{(index + 1) % APPS_PER_NAMESPACE}"))
        return NetworkPolicy(namespace_name, name, app, IN, ingress=(Rule((peer,), tcp),))
    if shape == 2:  # another team's namespaces, one app, named port
        peer = Peer(namespace_selector=sel(team=f"t{rng.randrange(teams)}"), pod_selector=sel(tier="front"))
        return NetworkPolicy(
            namespace_name, name, app, IN, ingress=(Rule((peer,), (PortSpec(Protocol.TCP, "http"),)),)
        )
    if shape == 3:  # monitoring from one named namespace, on the metrics port
        peer = Peer(
            namespace_selector=sel(**{"kubernetes.io/metadata.name": f"ns-{rng.randrange(namespaces)}"})
        )
        return NetworkPolicy(
            namespace_name,
            name,
            LabelSelector(),
            IN,
            ingress=(Rule((peer,), (PortSpec(Protocol.TCP, "metrics"),)),),
        )
    if shape == 4:  # egress to the outside world except private ranges, plus DNS
        block = IPBlock(ipaddress.ip_network("0.0.0.0/0"), (ipaddress.ip_network("10.0.0.0/8"),))
        dns = Rule(ports=(PortSpec(Protocol.UDP, 53), PortSpec(Protocol.TCP, 53)))
        return NetworkPolicy(namespace_name, name, app, EG, egress=(Rule((Peer(ip_block=block),), tcp), dns))
    if shape == 5:  # egress to an app of selected namespaces by expression, named port resolved per pod
        expression = Requirement("env", Operator.IN, frozenset({"prod"}))
        peer = Peer(
            namespace_selector=LabelSelector(
                match_labels=(("team", f"t{rng.randrange(teams)}"),), match_expressions=(expression,)
            ),
            pod_selector=sel(app="app-1"),
        )
        return NetworkPolicy(
            namespace_name, name, app, EG, egress=(Rule((peer,), (PortSpec(Protocol.TCP, "http"),)),)
        )
    if shape == 6:  # every pod of prod namespaces may reach the front end (wide peer)
        peer = Peer(namespace_selector=sel(env="prod"), pod_selector=sel(tier="front"))
        return NetworkPolicy(namespace_name, name, sel(tier="front"), IN, ingress=(Rule((peer,), tcp),))
    # shape 7: ranged ports from a CIDR with excepts
    block = IPBlock(ipaddress.ip_network("10.0.0.0/8"), (ipaddress.ip_network("10.10.0.0/16"),))
    return NetworkPolicy(
        namespace_name,
        name,
        app,
        IN,
        ingress=(Rule((Peer(ip_block=block),), (PortSpec(Protocol.TCP, 30000, 32767),)),),
    )


def build_cluster(
    rng: random.Random, size: Size
) -> tuple[list[Namespace], list[Pod], list[NetworkPolicy]]:
    namespaces = [namespace(i, i % size.teams) for i in range(size.namespaces)]
    per_namespace = size.pods // size.namespaces
    pods = [
        pod(ns, i, i % APPS_PER_NAMESPACE, size.nodes)
        for ns in range(size.namespaces)
        for i in range(per_namespace)
    ]
    per_ns_policies = size.policies // size.namespaces
    policies = [
        policy(rng, ns, ns * per_ns_policies + j, size.namespaces, teams=size.teams)
        for ns in range(size.namespaces)
        for j in range(per_ns_policies)
    ]
    return namespaces, pods, policies


def peak_rss_kib() -> int:
    """This process image's peak RSS (VmHWM). Not getrusage's ru_maxrss: that one survives
    execve, so a child started by a large parent reports the parent's peak."""
    return _proc.memory_kib(os.getpid())["VmHWM"]


def _quantiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "median_ms": round(statistics.median(ordered) * 1000, 3),
        "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000, 3),
        "max_ms": round(ordered[-1] * 1000, 3),
    }


def _timed_update(resolver: Resolver, event: Callable[[], None]) -> tuple[float, int]:
    start = CLOCK()
    event()
    dirty = resolver.take_dirty_nodes()
    for node in dirty:
        resolver.node_policy(node)
    return CLOCK() - start, len(dirty)


def run() -> dict[str, object]:
    """measure() of each size in a fresh interpreter. `make bench` runs every module in one
    process, whose high-water mark holds the BCC compiles and topologies of the modules before
    this one: read in place, the peak RSS was 625 MB in the full run of 2026-12-06 against 126 MB
    alone. A fresh interpreter per size also keeps the small size's heap out of the large one's."""
    results: dict[str, object] = {}
    for name in ("10k", "100k"):
        measured = subprocess.run(
            [sys.executable, "-m", "bench.resolver", name],
            cwd=Path(__file__).resolve().parents[1],
            capture_output=True,
            text=True,
            check=True,
        )
        results[name] = json.loads(measured.stdout)
    return results


def measure(size: Size) -> dict[str, object]:
    rng = random.Random(SEED)
    namespaces, pods, policies = build_cluster(rng, size)
    objects: list[KubeObject] = [*namespaces, *pods, *policies]

    start, cpu_start = CLOCK(), time.process_time()
    resolver = Resolver()
    resolver.replace_all(objects)
    loaded = CLOCK()
    node_policies = {node: resolver.node_policy(node) for node in resolver.nodes()}
    resolver.take_dirty_nodes()
    full = CLOCK() - start
    full_cpu = time.process_time() - cpu_start  # on a shared machine: the part that is this process's
    # The control service holds this heap for its lifetime: freezing it keeps CPython's full
    # collections from rescanning ~1M long-lived objects during every later update.
    gc.freeze()
    entries = sum(
        len(e.ingress.allows) + len(e.egress.allows)
        for np in node_policies.values()
        for e in np.endpoints.values()
    )

    pods_by_key = {p.key: p for p in pods}
    keys = sorted(pods_by_key)
    samples: dict[str, list[float]] = {
        "pod_added": [],
        "pod_relabelled": [],
        "namespace_relabelled": [],
        "policy_changed": [],
    }
    dirty_counts: dict[str, list[int]] = {k: [] for k in samples}

    def record(kind: str, event: Callable[[], None]) -> None:
        elapsed, dirty = _timed_update(resolver, event)
        samples[kind].append(elapsed)
        dirty_counts[kind].append(dirty)

    for i in range(SAMPLES):
        ns = rng.randrange(size.namespaces)
        new_pod = pod(ns, 90 + i % 10, rng.randrange(APPS_PER_NAMESPACE), size.nodes)
        record("pod_added", lambda p=new_pod: resolver.upsert(p))  # type: ignore[misc]

        key = keys[rng.randrange(len(keys))]
        old = pods_by_key[key]
        relabelled = Pod(
            old.namespace,
            old.name,
            old.node_name,
            {**old.labels, "app": f"app-{rng.randrange(APPS_PER_NAMESPACE)}"},
            old.ips,
            old.ports,
        )
        pods_by_key[key] = relabelled
        record("pod_relabelled", lambda p=relabelled: resolver.upsert(p))  # type: ignore[misc]

        ns_index = rng.randrange(size.namespaces)
        relabelled_ns = namespace(ns_index, rng.randrange(size.teams))
        record("namespace_relabelled", lambda n=relabelled_ns: resolver.upsert(n))  # type: ignore[misc]

        index = rng.randrange(size.policies)
        per_ns_policies = size.policies // size.namespaces
        ns_of = index // per_ns_policies
        changed = policy(random.Random(index), ns_of, index, size.namespaces, port=8000 + i, teams=size.teams)
        record("policy_changed", lambda p=changed: resolver.upsert(p))  # type: ignore[misc]

    all_samples = [s for v in samples.values() for s in v]
    return {
        "cluster": {"namespaces": size.namespaces, "pods": size.pods, "policies": size.policies,
                    "nodes": size.nodes, "teams": size.teams},
        "clock": CLOCK_NAME,
        "full_resolution_s": round(full, 3),
        "full_resolution_cpu_s": round(full_cpu, 3),
        "full_load_s": round(loaded - start, 3),
        "full_node_policies_s": round(full - (loaded - start), 3),
        "allow_entries_total": entries,
        "incremental": {
            kind: {**_quantiles(v), "mean_dirty_nodes": round(statistics.mean(dirty_counts[kind]), 2)}
            for kind, v in samples.items()
        },
        "incremental_all": _quantiles(all_samples),
        # Absolute times on a shared 2-core machine are noisy; this ratio, from one run, is not.
        "full_over_incremental_median": round(full / statistics.median(all_samples), 1),
        "gc_frozen_after_full_load": True,
        "peak_rss_mb": round(peak_rss_kib() / 1024, 1),
        "targets": size.targets,
    }


if __name__ == "__main__":
    json.dump(measure(SIZES[sys.argv[1] if len(sys.argv) > 1 else "10k"]), sys.stdout, indent=2)
    print()
