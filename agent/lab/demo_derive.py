"""The demo's derived paths: bookinfo's policies made by `podfence derive` from its Istio
configuration (agent/lab/bookinfo/istio), and by `podfence suggest` from the connections the
demo itself saw succeed under the hand-written policies. Each set is checked with the
reference evaluator before the demo enforces it and probes the matrix again.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

from agent.derive.flows import Options, observe
from agent.derive.inputs import read_documents
from agent.derive.istio import derive_istio
from agent.derive.render import DnsTarget, render, validate
from agent.derive.verify import Report, verify
from agent.lab.prober import TruthTable
from agent.lab.topology import LabPod
from agent.model.load import load_folder
from agent.model.objects import Namespace, NetworkPolicy
from agent.policy.state import ClusterState

ISTIOD = "istio-system/istiod"


def _outcome(report: Report) -> str:
    return "every one allowed" if report.ok else f"{len(report.denied_declared)} DENIED"


def derived(hand: list[NetworkPolicy]) -> tuple[list[dict[str, Any]], list[str], bool]:
    """(policy documents, lines to print, every route allowed) for bookinfo's Istio configuration."""
    with resources.as_file(resources.files("agent.lab").joinpath("bookinfo").joinpath("istio")) as folder:
        graph = derive_istio(read_documents(folder))
    dns = DnsTarget()
    documents = render(graph, dns, "derive")
    report = verify(graph, validate(documents), hand, dns, mesh=True)
    lines = [
        f"podfence derive --istio agent/lab/bookinfo/istio: {len(documents)} policies; "
        f"{report.declared} declared connections, {_outcome(report)} by the reference evaluator"
    ]
    changes = report.newly_denied + report.newly_allowed
    others = [c for c in changes if ISTIOD not in (c["from"], c["to"])]
    if others:
        lines.append(f"  against the hand-written policies, {len(others)} pairs differ:")
        lines += [f"    {c['from']} -> {c['to']}: {', '.join(c['ports'])}" for c in others]
    else:
        lines.append(
            f"  against the hand-written policies: the same matrix but for the {len(changes)} pairs "
            "with istiod, which only the derived set knows (there is no istiod on this lab)"
        )
    return documents, lines, report.ok


def flow_records(
    table: TruthTable, pod: Callable[[str], LabPod], columns: dict[str, tuple[str, int, str]]
) -> list[dict[str, Any]]:
    """The reachable cells of a probed matrix as `podfence observe -o jsonl` records: what the
    application was seen doing. `columns`: label -> (pod, port, protocol)."""
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    records = []
    for (source, label), reachable in sorted(table.cells.items()):
        if not reachable or not table.judged(source, label):
            continue
        target, port, protocol = columns[label]
        src, dst = pod(source), pod(target)
        records.append(
            {
                "time": now,
                "node": src.spec.node,
                "protocol": protocol,
                "source": {
                    "namespace": src.spec.namespace,
                    "pod": src.spec.name,
                    "ip": ipaddress.ip_address(src.ip),
                    "port": None,
                },
                "destination": {
                    "namespace": dst.spec.namespace,
                    "pod": dst.spec.name,
                    "ip": ipaddress.ip_address(dst.ip),
                    "port": port,
                },
                "direction": "egress",
                "verdict": "allowed",
                "policy": None,
                "reason": "probed by the demo",
            }
        )
    return records


def suggested(
    records: list[dict[str, Any]], source_dir: Path
) -> tuple[list[dict[str, Any]], list[str], bool]:
    """(policy documents, lines to print, every flow allowed) from the records, with the lab's
    source folder (its namespaces, pods and the policies now in force) as `--source`."""
    loaded = load_folder(source_dir)
    state = ClusterState.from_objects(loaded.objects)
    dns = DnsTarget()
    observation = observe(records, state, Options(), dns)
    documents = render(observation.graph, dns, "suggest")
    namespaces = [o for o in loaded.objects if isinstance(o, Namespace)]
    report = verify(
        observation.graph,
        validate(documents),
        list(state.policies.values()),
        dns,
        namespaces,
        cluster=list(state.cluster_policies.values()),
    )
    changes = report.newly_denied + report.newly_allowed
    lines = [
        f"podfence suggest: {len(records)} flow records (the reachable cells above) -> {len(documents)} "
        f"policies; {report.declared} observed connections, {_outcome(report)} by the reference evaluator",
        f"  against the derived policies: {len(changes)} pairs differ, {len(report.allowed_beyond)} "
        "connections allowed beyond what was observed",
    ]
    lines += [f"    {c['from']} -> {c['to']}: {', '.join(c['ports'])}" for c in changes[:12]]
    return documents, lines, report.ok
