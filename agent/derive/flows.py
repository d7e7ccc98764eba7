"""Observed flows -> the least-privilege connection graph (`podfence suggest --flows FILE.jsonl`).

Input is the `podfence observe -o jsonl` record (docs/design.md). Addresses are mapped to pods
with the cluster's own objects (`--source DIR`), then pods to workloads by their stable labels
(or only `--label-keys`), so the policies name label sets, never a pod or its IP. An address
that is no pod is outside the cluster and becomes an ipBlock of `--prefix-length` bits. Flows
to the cluster DNS are covered by the namespace's DNS egress policy. Denied flows, ICMP and
edges seen fewer than `--min-count` times are left out and listed.
"""

from __future__ import annotations

import ipaddress
import json
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, TextIO

from agent.derive.graph import (
    Edge,
    Endpoint,
    Graph,
    Note,
    Outside,
    Workload,
    aggregate,
    dns_name,
    stable_labels,
)
from agent.derive.inputs import InputError
from agent.derive.render import DnsTarget, workload_name
from agent.model.objects import IPAddress, Pod, Protocol
from agent.policy.state import ClusterState, takes_part_in_selectors

MAX_LINES = 5_000_000
MAX_LINE_CHARS = 65_536  # a record is a few hundred characters
# Ranges clusters draw pod, Service and node addresses from: a peer there that is no pod is
# worth a second look (documentation ranges, which Python also calls private, are not).
INTERNAL = tuple(
    ipaddress.ip_network(n)
    for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7")
)


def _internal(network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> bool:
    return any(network.version == n.version and network.subnet_of(n) for n in INTERNAL)  # type: ignore[arg-type]


@dataclass
class Options:
    label_keys: frozenset[str] | None = None
    namespaces: list[str] | None = None
    min_count: int = 1
    prefix_v4: int = 24
    prefix_v6: int = 64


@dataclass
class _Seen:
    count: int = 0
    first: str = ""
    last: str = ""

    def add(self, time: str) -> None:
        self.count += 1
        self.first = min(self.first, time) if self.first else time
        self.last = max(self.last, time)


@dataclass
class Observation:
    graph: Graph
    flows: int = 0
    excluded: list[dict[str, Any]] = field(default_factory=list)


def read_flows(stream: TextIO, source: str) -> list[dict[str, Any]]:
    records = []
    for number, line in enumerate(stream, 1):
        if number > MAX_LINES:
            raise InputError(f"{source}: more than {MAX_LINES} lines")
        if len(line) > MAX_LINE_CHARS:
            raise InputError(f"{source}:{number}: longer than {MAX_LINE_CHARS} characters: not a flow record")
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise InputError(f"{source}:{number}: not a JSON object: {exc}") from None
        if not isinstance(record, dict):
            raise InputError(f"{source}:{number}: not a JSON object")
        for side in ("source", "destination"):
            end = record.get(side)
            if not isinstance(end, dict) or not isinstance(end.get("ip"), str):
                raise InputError(f"{source}:{number}: {side}.ip is missing")
            try:
                end["ip"] = ipaddress.ip_address(end["ip"])
            except ValueError:
                raise InputError(f"{source}:{number}: {side}.ip {end['ip']!r} is not an IP address") from None
        if not isinstance(record.get("protocol"), str) or not isinstance(record.get("time"), str):
            raise InputError(f"{source}:{number}: protocol and time must be strings")
        port = record["destination"].get("port")
        if port is not None and (
            isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535
        ):
            raise InputError(f"{source}:{number}: destination.port {port!r} is not a port number")
        records.append(record)
    return records


class _Mapper:
    def __init__(self, state: ClusterState, options: Options, dns: DnsTarget) -> None:
        self.state = state
        self.options = options
        self.dns = dns
        self.by_ip = {
            ip: pod for pod in state.pods.values() if takes_part_in_selectors(pod) for ip in pod.ips
        }
        self.workloads: dict[tuple[str, tuple[tuple[str, str], ...]], Workload] = {}
        self.samples: dict[str, dict[str, str]] = {}
        self.sample_ips: dict[str, tuple[IPAddress, ...]] = {}
        for pod in sorted(state.pods.values(), key=lambda p: p.key):
            if takes_part_in_selectors(pod):
                self.workload(pod)

    def labels(self, pod: Pod) -> tuple[tuple[str, str], ...]:
        """The pod's labels among --label-keys; all its stable labels when it has none of those keys
        (an empty selector would take in every pod of the namespace)."""
        return stable_labels(pod.labels, self.options.label_keys) or stable_labels(pod.labels)

    def workload(self, pod: Pod) -> Workload:
        labels = self.labels(pod)
        key = (pod.namespace, labels)
        known = self.workloads.get(key)
        if known is None:
            names = {w.name for w in self.workloads.values() if w.namespace == pod.namespace}
            name = workload_name(dict(labels), pod.name) if labels else "all-pods"
            if name in names:  # e.g. two pools of one app: every label value tells them apart
                name = dns_name("-".join(v for _, v in labels), name)
            while name in names:
                name += "-x"
            known = Workload(pod.namespace, labels, name, pod.ports)
            self.samples[known.key] = dict(pod.labels)
            self.sample_ips[known.key] = pod.ips
        else:
            known = Workload(
                known.namespace, known.labels, known.name, tuple(dict.fromkeys(known.ports + pod.ports))
            )
        self.workloads[key] = known
        return known

    def endpoint(self, side: dict[str, Any]) -> Endpoint:
        named = self.state.pods.get(f"{side.get('namespace')}/{side.get('pod')}")
        pod = named if named is not None and side["ip"] in named.ips else self.by_ip.get(side["ip"])
        if pod is None:
            ip: IPAddress = side["ip"]
            return Outside(aggregate(ip, self.options.prefix_v4, self.options.prefix_v6))
        return self.workloads[(pod.namespace, self.labels(pod))]

    def is_dns(self, endpoint: Endpoint) -> bool:
        return (
            isinstance(endpoint, Workload)
            and endpoint.namespace == self.dns.namespace
            and all(dict(endpoint.labels).get(k) == v for k, v in self.dns.labels)
        )


def observe(
    records: list[dict[str, Any]], state: ClusterState, options: Options, dns: DnsTarget
) -> Observation:
    mapper = _Mapper(state, options, dns)
    seen: dict[Edge, _Seen] = defaultdict(_Seen)
    per_workload: dict[str, _Seen] = defaultdict(_Seen)
    excluded: dict[tuple[str, str, str, str], int] = defaultdict(int)
    dns_clients: set[Workload] = set()
    for record in records:
        src = mapper.endpoint(record["source"])
        dst = mapper.endpoint(record["destination"])
        protocol_name = record["protocol"].upper()
        port = record["destination"].get("port") or 0
        label = f"{protocol_name}/{port}" if port else protocol_name
        if record.get("verdict") == "denied":
            excluded[(src.key, dst.key, label, "denied when observed: not allowed by the suggestion")] += 1
            continue
        if protocol_name not in Protocol.__members__ or not port:
            excluded[(src.key, dst.key, label, "no port: a rule for it would open every protocol")] += 1
            continue
        protocol = Protocol(protocol_name)
        if mapper.is_dns(dst) and port == 53 and isinstance(src, Workload):
            dns_clients.add(src)
            continue
        edge = Edge(src, dst, protocol, port, "observed")
        seen[edge].add(record["time"])
        for end in (src, dst):
            if isinstance(end, Workload):
                per_workload[end.key].add(record["time"])
    graph = Graph(samples=mapper.samples, sample_ips=mapper.sample_ips)
    observation = Observation(graph, flows=len(records))
    involved: set[Workload] = set(dns_clients)
    for edge, stats in seen.items():
        if stats.count < options.min_count:
            excluded[
                (
                    edge.source.key,
                    edge.destination.key,
                    f"{edge.protocol.value}/{edge.port}",
                    f"seen {stats.count} times, fewer than --min-count {options.min_count}",
                )
            ] += stats.count
            continue
        graph.add_edge(
            Edge(
                edge.source,
                edge.destination,
                edge.protocol,
                edge.port,
                f"observed {stats.count} times, {stats.first} .. {stats.last}",
            )
        )
        involved |= {e for e in (edge.source, edge.destination) if isinstance(e, Workload)}
    covered = set(options.namespaces or {w.namespace for w in involved if not mapper.is_dns(w)})
    graph.namespaces = sorted(covered)
    graph.workloads = [w for w in mapper.workloads.values() if w in involved or w.namespace in covered]
    graph.unmanaged = {w.key for w in graph.workloads if w.namespace not in covered or mapper.is_dns(w)}
    for workload in graph.workloads:
        seen_by = per_workload.get(workload.key)
        if seen_by is not None:
            graph.annotations[workload.key] = {
                "podfence.io/derived-from": f"{seen_by.count} flow records",
                "podfence.io/first-seen": seen_by.first,
                "podfence.io/last-seen": seen_by.last,
            }
    for address in sorted(
        {
            e.key
            for edge in graph.edges
            for e in (edge.source, edge.destination)
            if isinstance(e, Outside) and e.cidr is not None and _internal(e.cidr)
        }
    ):
        graph.notes.append(
            Note(
                "flow",
                address,
                "",
                "a private address that is no pod of --source (a node, a "
                "Service ClusterIP seen before DNAT?): allowed as an ipBlock",
            )
        )
    observation.excluded = [
        {"from": s, "to": d, "port": p, "records": n, "why": why}
        for (s, d, p, why), n in sorted(excluded.items())
    ]
    return observation
