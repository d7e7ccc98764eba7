"""ServiceEntry -> egress to addresses outside the cluster, where the entry names them.

A ServiceEntry with `resolution: NONE` lists the destination ranges in `addresses`; one with
`resolution: STATIC` lists its endpoints' IPs. Those become ipBlock egress on the entry's ports
for every mesh workload whose Sidecar may reach the host. A DNS-resolved entry has no fixed
address (the names resolve at run time), so it is listed instead: allow it by hand, or derive
it from observed flows with `podfence suggest`.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from agent.derive.graph import Edge, Graph, Note, Outside, Workload
from agent.derive.inputs import mapping, meta, port_number, sequence
from agent.derive.istio_scope import Scope
from agent.model.objects import IPNetwork, Protocol


def _networks(values: list[Any]) -> tuple[list[IPNetwork], list[str]]:
    networks, bad = [], []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(str(value), strict=False))
        except ValueError:
            bad.append(str(value))  # a hostname or a unix socket: no address to allow
    return networks, bad


def service_entries(
    documents: list[tuple[str, dict[str, Any]]], graph: Graph, scope: Scope, sources: list[Workload]
) -> None:
    for _, doc in documents:
        if doc.get("kind") != "ServiceEntry":
            continue
        namespace, name = meta(doc, "ServiceEntry")
        where = f"ServiceEntry {namespace}/{name}"
        ref = f"{namespace}/{name}"
        spec = mapping(doc.get("spec"), where)
        if spec.get("location", "MESH_EXTERNAL") != "MESH_EXTERNAL":
            graph.notes.append(
                Note(
                    "ServiceEntry",
                    ref,
                    "spec.location",
                    "MESH_INTERNAL entries (WorkloadEntry, VMs) are not translated",
                )
            )
            continue
        resolution = spec.get("resolution", "NONE")
        if resolution == "NONE":
            networks, bad = _networks(sequence(spec.get("addresses"), where))
        elif resolution == "STATIC":
            endpoints = [mapping(e, where).get("address") for e in sequence(spec.get("endpoints"), where)]
            networks, bad = _networks(endpoints)
        else:
            graph.notes.append(
                Note(
                    "ServiceEntry",
                    ref,
                    "spec.resolution",
                    f"{resolution}: the addresses are only known at run time; no egress "
                    "derived (allow it by hand, or with podfence suggest)",
                )
            )
            continue
        if bad or not networks:
            graph.notes.append(
                Note(
                    "ServiceEntry",
                    ref,
                    "spec",
                    "no IP address to allow"
                    if not networks
                    else f"not IP addresses, left out: {', '.join(bad)}",
                )
            )
        hosts = [str(h) for h in sequence(spec.get("hosts"), where)]
        ports = [
            port_number(
                mapping(p, where).get("targetPort") or mapping(p, where).get("number"), f"{where}: spec.ports"
            )
            for p in sequence(spec.get("ports"), where)
        ]
        if not ports:
            graph.notes.append(Note("ServiceEntry", ref, "spec.ports", "no ports: no egress derived"))
        for source in sources:
            for port in ports:
                if not any(scope.egress_allows_host(source, namespace, {h}, h, port) for h in hosts):
                    continue
                for network in networks:
                    graph.add_edge(
                        Edge(
                            source,
                            Outside(network),
                            Protocol.TCP,
                            port,
                            f"{where} ({hosts[0] if hosts else ''})",
                        )
                    )
