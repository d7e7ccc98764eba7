"""What `derive` and `suggest` share: verify, then print the YAML (stdout) and the summary.

The contract (docs/design.md): stdout holds the policies as multi-document YAML and nothing
else; the summary goes to stderr, or as one JSON object to `--summary-json FILE`. Exit 0 when
the output allows every declared route or observed flow. Exit 1 when it would not (a bug: then
nothing is printed, since applying it would cut traffic the input declares), or on a failure.
Exit 2 for bad usage or bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.derive.graph import SIDECAR_PORTS, Graph
from agent.derive.inputs import InputError, parse_selector
from agent.derive.render import DnsTarget, RenderError, render, to_yaml, validate
from agent.derive.verify import Report, verify
from agent.model.cluster_policy import ClusterNetworkPolicy
from agent.model.load import load_file, load_folder
from agent.model.objects import KubeObject, Namespace, NetworkPolicy

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
TEXT_LIMIT = 40  # lines per section on stderr; --summary-json holds everything


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dns",
        default="kube-system:k8s-app=kube-dns",
        metavar="NS:key=value",
        help="the cluster DNS pods every pod may ask (default kube-system:k8s-app=kube-dns)",
    )
    parser.add_argument(
        "--diff",
        metavar="DIR",
        help="compare with the NetworkPolicies of this folder instead of the current ones",
    )
    parser.add_argument(
        "--namespace",
        action="append",
        metavar="NS",
        help="generate policies only for this namespace (repeatable, or comma-separated)",
    )
    parser.add_argument("--audit", action="store_true", help="annotate every policy podfence.io/mode: audit")
    parser.add_argument(
        "--summary-json", metavar="FILE", help="write the summary there as JSON, not to stderr"
    )


def namespaces(args: argparse.Namespace) -> list[str] | None:
    if not args.namespace:
        return None
    # Repeated flags give a list; PODFENCE_NAMESPACE gives one comma-separated string.
    items = [args.namespace] if isinstance(args.namespace, str) else args.namespace
    return sorted({n.strip() for item in items for n in item.split(",") if n.strip()})


def dns_target(args: argparse.Namespace) -> DnsTarget:
    namespace, labels = parse_selector(args.dns, "--dns")
    return DnsTarget(namespace, labels)


@dataclass
class InForce:
    """What the cluster enforces now: the "before" of the comparison. Its ClusterNetworkPolicies
    also hold after, since the output adds NetworkPolicies only."""

    policies: list[NetworkPolicy] = field(default_factory=list)
    cluster: list[ClusterNetworkPolicy] = field(default_factory=list)
    namespaces: list[Namespace] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @classmethod
    def from_objects(cls, objects: list[KubeObject], warnings: list[str]) -> InForce:
        return cls(
            [o for o in objects if isinstance(o, NetworkPolicy)],
            [o for o in objects if isinstance(o, ClusterNetworkPolicy)],
            [o for o in objects if isinstance(o, Namespace)],
            warnings,
        )


def load_policies(path: str, flag: str) -> InForce:
    """The policies and Namespaces of a folder or file, with warnings for invalid objects."""
    source = Path(path)
    if source.is_dir():
        result = load_folder(source)
    elif source.is_file():
        result = load_file(source)
    else:
        raise InputError(f"{flag} {path}: no such file or directory")
    warnings = [f"{flag}: ignored invalid object: {error}" for error in result.errors]
    return InForce.from_objects(result.objects, warnings)


def _compact(ports: list[str]) -> str:
    """A port list for people: Envoy's own ports, when all are there, as one item."""
    envoy = {f"TCP/{p}" for p in SIDECAR_PORTS}
    if envoy <= set(ports):
        ports = [p for p in ports if p not in envoy] + ["Envoy's ports 150xx"]
    return ", ".join(ports)


def _lines(title: str, items: list[str]) -> list[str]:
    if not items:
        return []
    shown = [f"  {item}" for item in items[:TEXT_LIMIT]]
    if len(items) > TEXT_LIMIT:
        shown.append(f"  ... and {len(items) - TEXT_LIMIT} more (all of them with --summary-json)")
    return [title, *shown]


def summary(
    command: str, graph: Graph, documents: list[dict[str, Any]], report: Report, extra: dict[str, Any]
) -> dict[str, Any]:
    return {
        "command": command,
        "ok": report.ok,
        "policies": [f"{d['metadata']['namespace']}/{d['metadata']['name']}" for d in documents],
        "namespaces": graph.namespaces,
        "workloads": [w.key for w in graph.workloads],
        "declared": [
            {
                "from": e.source.key,
                "to": e.destination.key,
                "protocol": e.protocol.value,
                "port": e.port,
                "why": e.why,
            }
            for e in graph.edges
        ],
        "denied_declared": report.denied_declared,
        "denied_by_cluster_policy": report.denied_by_cluster_policy,
        "newly_denied": report.newly_denied,
        "newly_allowed": report.newly_allowed,
        "allowed_beyond": report.allowed_beyond,
        "unselected_connections": report.untouched,
        "not_translated": [n.as_dict() for n in graph.notes],
        **extra,
    }


def render_text(data: dict[str, Any]) -> str:
    head = (
        f"podfence {data['command']}: {len(data['policies'])} policies for "
        f"{len(data['workloads'])} workloads; "
        f"{len(data['declared'])} {data.get('unit', 'declared connections')}, "
        + (
            "every one allowed"
            if data["ok"]
            else f"{len(data['denied_declared'])} of them DENIED: nothing printed"
        )
    )
    lines = [head]
    lines += _lines(
        "denied by the generated policies although declared:",
        [
            f"{d['from']} -> {d['to']} {d['protocol']}/{d['port']} ({d['why']})"
            for d in data["denied_declared"]
        ],
    )
    lines += _lines(
        "denied by a ClusterNetworkPolicy whatever the output says:",
        [
            f"{d['from']} -> {d['to']} {d['protocol']}/{d['port']}: {d['by']}"
            for d in data["denied_by_cluster_policy"]
        ],
    )
    lines += _lines(
        "denied now, open before:",
        [f"{d['from']} -> {d['to']}: {_compact(d['ports'])}" for d in data["newly_denied"]],
    )
    lines += _lines(
        "open now, denied before:",
        [f"{d['from']} -> {d['to']}: {_compact(d['ports'])}" for d in data["newly_allowed"]],
    )
    lines += _lines(
        "allowed beyond what was declared:",
        [
            f"{d['from']} -> {d['to']} {d['protocol']}/{d['port']}: {d['reason']}"
            for d in data["allowed_beyond"]
        ],
    )
    if data["unselected_connections"]:
        lines.append(
            f"{data['unselected_connections']} connections between endpoints that no policy selects "
            "(outside the covered namespaces, the cluster DNS, istiod, the outside) stay as they were"
        )
    lines += _lines(
        "not translated:",
        [
            f"{n['kind']} {n['name']} {n['field']}: {n['why']}".replace("  ", " ")
            for n in data["not_translated"]
        ],
    )
    lines += _lines(
        "left out:",
        [
            f"{d['from']} -> {d['to']} {d['port']} ({d['records']} records): {d['why']}"
            for d in data.get("excluded", [])
        ],
    )
    return "\n".join(lines)


def finish(
    args: argparse.Namespace,
    command: str,
    graph: Graph,
    in_force: InForce,
    mesh: bool,
    extra: dict[str, Any],
) -> int:
    """Render, validate, verify, print. Returns the exit code."""
    dns = dns_target(args)
    documents = render(graph, dns, command, audit=args.audit)
    try:
        generated = validate(documents)
    except RenderError as exc:
        print(f"podfence {command}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    report = verify(graph, generated, in_force.policies, dns, in_force.namespaces, mesh, in_force.cluster)
    warnings = in_force.warnings
    data = summary(command, graph, documents, report, {"warnings": warnings, **extra})
    if args.summary_json:
        try:
            Path(args.summary_json).write_text(json.dumps(data, indent=2) + "\n")
        except OSError as exc:
            print(
                f"podfence {command}: --summary-json {args.summary_json}: {exc.strerror or exc}",
                file=sys.stderr,
            )
            return EXIT_FAILURE
        if not report.ok:
            print(
                f"podfence {command}: {len(report.denied_declared)} declared connections would be denied; "
                f"nothing printed (see {args.summary_json})",
                file=sys.stderr,
            )
    else:
        for warning in warnings:
            print(f"warning: {warning}", file=sys.stderr)
        print(render_text(data), file=sys.stderr)
    if not report.ok:
        return EXIT_FAILURE
    sys.stdout.write(to_yaml(documents))
    return EXIT_OK


def run_guarded(command: str, body: Any) -> int:
    """Runs `body()`; bad input becomes a message and exit code 2."""
    try:
        return int(body())
    except InputError as exc:
        print(f"podfence {command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
