"""New and established flows under 10 vs 1,000 ClusterNetworkPolicy Admin rules, both dataplanes.

The datapath of bench/datapath.py (two-node topology, real traffic, time-sliced instruments), with
the server pods' ingress holding N Admin-tier entries in front of 1,000 NetworkPolicy allows:
ranks 1..N, actions Pass/Accept/Deny in turn, each from its own identity and TCP port, none
matching the client, as the resolver compiles 1,000 admin rules (the worst case for precedence
by runs: the action changes at every rank). The client's connections miss every Admin entry and
are admitted by a NetworkPolicy allow, so a new flow pays the whole Admin tier.

Variants: `none` (no filter), `bpf_<N>`, `iptables_<N>` for N in 10 and 1,000,
`iptables_runs_1000`: the iptables dataplane with the tier written as runs of one action
(tiers.py before the per-action sets, still used for entries wider than one port): what the sets
remove, and `<plane>_again_10`, `<plane>_10` built a second time: the A/A control, whose ratio
against `<plane>_10` is what the instrument reads when nothing differs.
Reported per variant, same-node path, over SLICED_REPETITIONS time-sliced runs: connections per
second (`conn_per_s_sliced`: one connect/request/response/close each, new flows) and the bulk
TCP stream (`tcp_gbps_sliced`: established flows), and the ratios 1,000 vs 10 per dataplane
(target: new flows >= 0.97, established unchanged).

Run: `.venv/bin/python -m bench cnp_datapath` (root). `BENCH_QUICK=1` shortens the runs.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import statistics
import subprocess
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import replace
from typing import Any
from unittest import mock

from agent.dataplane.base import ConntrackReleasing
from agent.dataplane.iptables.tier_sets import ResolvedTier
from agent.dataplane.netns import inside
from agent.dataplane.types import (
    ACTION_ACCEPT,
    ACTION_DENY,
    ACTION_PASS,
    TIER_ADMIN,
    IdentityPeer,
    NodeState,
    TieredAllow,
)
from agent.node.ctrelease import ConntrackReleaser
from bench import _netlab, datapath
from bench._netlab import Topology

ADMIN_COUNTS = (10, 1000)
NETWORK_POLICY_ALLOWS = 1000
ADMIN_BASE = 100_000  # identity ids of the admin peers
SLICED_REPETITIONS = 1 if datapath.QUICK else 5
CRR_SECONDS = 1.0 if datapath.QUICK else 6.0  # per variant and run
STREAM_SECONDS = 0.5 if datapath.QUICK else 2.0
_ACTIONS = (ACTION_PASS, ACTION_ACCEPT, ACTION_DENY)


def admin_state(topology: Topology, node: str, admin: int) -> NodeState:
    """bench/datapath.py's state with `admin` Admin entries on every isolated direction."""
    state = datapath.node_state(topology, node, NETWORK_POLICY_ALLOWS)
    tiered = tuple(
        TieredAllow(TIER_ADMIN, i + 1, _ACTIONS[i % 3], IdentityPeer(ADMIN_BASE + i), datapath.TCP,
                    20_000 + i, 20_000 + i, "bench-admin")
        for i in range(admin)
    )  # fmt: skip
    endpoints = {
        key: replace(ep, ingress=replace(ep.ingress, tiered=tiered)) if ep.ingress.isolated else ep
        for key, ep in state.endpoints.items()
    }
    identities = dict(state.identities)
    base = int(ipaddress.IPv4Address("10.202.0.0"))
    identities.update({ADMIN_BASE + i: (ipaddress.IPv4Address(base + i),) for i in range(admin)})
    return replace(state, endpoints=endpoints, identities=identities)


@contextlib.contextmanager
def _as_runs(runs: bool) -> Iterator[None]:
    """The iptables compiler writing every tier as runs (the lever of `iptables_runs_*`)."""
    if not runs:
        yield
        return
    def every_entry_as_runs(entries: Iterable[TieredAllow], *_: object) -> ResolvedTier:
        return ResolvedTier({}, {}, tuple(entries))

    with mock.patch("agent.dataplane.iptables.tiers.resolve_tier", every_entry_as_runs):
        yield


def _name(plane: str | None, admin: int, kind: str) -> str:
    return "none" if plane is None else f"{plane}{kind}_{admin}"


def build(index: int, plane: str | None, admin: int, kind: str = "") -> datapath.Variant:
    """`kind`: "" , "_runs" (iptables tiers as runs) or "_again" (the A/A control)."""
    name = _name(plane, admin, kind)
    runs = kind == "_runs"
    topology = Topology(tag=f"c{index}")
    topology.build(2, [("client", 1), ("local", 1), ("remote", 2)])
    variant = datapath.Variant(name=name, dataplane=plane, rules=admin, topology=topology)
    try:
        datapath.start_servers(variant)
        if plane is not None:
            for node in topology.nodes.values():
                with inside(node.netns), _as_runs(runs):
                    dataplane = datapath.make_dataplane(plane, node.pin_dir)
                    variant.live_dataplanes.append((node.netns, dataplane))
                    dataplane.start()
                    dataplane.apply(admin_state(topology, node.name, admin))
                if isinstance(dataplane, ConntrackReleasing):
                    # the agent's periodic flow-table count (agent/node/ctrelease.py): without it
                    # the eBPF flow table fills up with closed connections and refuses new ones
                    count = ConntrackReleaser(dataplane).run
                    threading.Thread(target=count, args=(variant.stop_counting,), daemon=True).start()
            variant.enforcing = datapath.drops_unallowed_port(variant)
            if not variant.enforcing:
                raise RuntimeError(f"{name}: a port no rule allows was not dropped")
    except BaseException:
        datapath.destroy_variant(variant)
        raise
    return variant


def _plan() -> list[tuple[str | None, int, str]]:
    plan: list[tuple[str | None, int, str]] = [(None, 0, "")]
    for plane in datapath.DATAPLANES:
        plan += [(plane, count, "") for count in ADMIN_COUNTS]
        plan.append((plane, ADMIN_COUNTS[0], "_again"))
    if "iptables" in datapath.DATAPLANES:
        plan.append(("iptables", ADMIN_COUNTS[-1], "_runs"))
    return plan


def run() -> dict[str, Any]:
    _netlab.remove_all(_netlab.PREFIX + "c")
    started = time.monotonic()
    variants: list[datapath.Variant] = []
    unavailable: dict[str, str] = {}
    samples: dict[str, dict[str, list[float]]] = {}
    failures: list[str] = []
    try:
        for index, (plane, admin, kind) in enumerate(_plan()):
            try:
                variants.append(build(index, plane, admin, kind))
            except Exception as exc:  # a dataplane that cannot run here is reported, not fatal
                unavailable[_name(plane, admin, kind)] = repr(exc)
        for _ in range(SLICED_REPETITIONS):
            for metric, seconds in (("conn_per_s_sliced", CRR_SECONDS), ("tcp_gbps_sliced", STREAM_SECONDS)):
                try:
                    values = datapath.measure_sliced(variants, "same_node", metric, seconds)
                except (subprocess.SubprocessError, RuntimeError, ValueError, KeyError) as exc:
                    # one stuck run (a neighbour's burst past a connect timeout) voids only itself
                    failures.append(f"{metric}: {exc!r}"[:300])
                    continue
                for name, value in values.items():
                    samples.setdefault(metric, {}).setdefault(name, []).append(value)
    finally:
        for variant in variants:
            datapath.destroy_variant(variant)
    results: dict[str, Any] = {
        name: {metric: round(statistics.median(by_name[name]), 4)
               for metric, by_name in samples.items() if name in by_name}
        for name in (v.name for v in variants)
    }
    ratios: dict[str, Any] = {}
    low, high = ADMIN_COUNTS[0], ADMIN_COUNTS[-1]
    pairs = [(f"{plane}_{high}", f"{plane}_{low}") for plane in datapath.DATAPLANES]
    pairs += [(f"{plane}_again_{low}", f"{plane}_{low}") for plane in datapath.DATAPLANES]
    pairs.append((f"iptables_runs_{high}", f"iptables_{low}"))
    for many_name, few_name in pairs:
        measured = samples.get("conn_per_s_sliced", {})
        if few_name not in measured or many_name not in measured:
            continue
        for metric, by_name in samples.items():
            if few_name not in by_name or many_name not in by_name:
                continue
            # per run (one time-sliced run visits every variant): the ratio of that run, then the median
            per_run = [m / f for m, f in zip(by_name[many_name], by_name[few_name], strict=True) if f > 0]
            ratios.setdefault(f"{many_name}_vs_{few_name}", {})[metric] = {
                "median": round(statistics.median(per_run), 3),
                "range": [round(min(per_run), 3), round(max(per_run), 3)],
            }
    return {
        "admin_counts": list(ADMIN_COUNTS),
        "network_policy_allows": NETWORK_POLICY_ALLOWS,
        "sliced_repetitions": SLICED_REPETITIONS,
        "seconds_per_variant": {"conn": CRR_SECONDS, "stream": STREAM_SECONDS},
        "unavailable": unavailable,
        "failed_runs": failures,
        "results": results,
        "ratios": ratios,
        "wall_seconds": round(time.monotonic() - started, 1),
    }


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
