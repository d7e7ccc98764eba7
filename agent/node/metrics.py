"""The agent's Prometheus metrics, read live at scrape time, and its /healthz and /readyz endpoints.

One custom collector reads the dataplane's counters and maps, the reconcile loop's status and
the sync client's connection state each time Prometheus scrapes; nothing is copied in between.

Metrics (all read at scrape time):
  podfence_packets_total{direction,verdict}     packets judged, all pods of the node together
  podfence_endpoint_packets_total{namespace,pod,direction,verdict}  packets judged per pod
  podfence_endpoint_bytes_total{namespace,pod,direction,verdict}    bytes judged per pod
                                                (both off with --per-pod-metrics off)
  podfence_drops_total{reason}                  drops per reason (bpf drop-reason list)
  podfence_policy_programming_seconds           histogram: version received -> kernel enforces it
  podfence_interface_programming_seconds        histogram: netlink change -> kernel enforces it
  podfence_applied_version                      last version enforced (-1: none yet)
  podfence_sync_connected                       1 while the stream to the control service is up
  podfence_sync_held                            1 while the stream's replica lags behind the
                                                enforced source generation (its versions held)
  podfence_managed_endpoints                    pods of this node with policy
  podfence_located_endpoints                    ... whose host interface was found
  podfence_pod_interfaces                       host-side pod interfaces guarded
  podfence_map_entries{map}, podfence_map_capacity{map}   map usage against capacity
  podfence_events_lost_total                    flow records the budget or ring buffer dropped
  (podfence_flows_total: agent.node.flowfeed.FlowMetrics)
  podfence_apply_errors_total                   failed programming attempts (retries included)
  podfence_hook_repairs_total                   netfilter hooks put back first after another tool
                                                inserted rules above them or removed them
  podfence_state_repairs_total{kind}            kernel state put back (repair.py; hooks as kind hook)

Also podfence_build_info and the process_* family (agent.process_metrics).

Cardinality: `namespace`/`pod` labels are the pods on this node (bounded by the kubelet's max pods),
times 2 directions and 2 verdicts; `reason` labels are the fixed drop-reason list; `map` labels
the fixed set of dataplane maps (or ipsets).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from agent.dataplane.base import AuditCounting, Dataplane, DropReasons, EventsLost, MapUsage
from agent.node.flowfeed import FlowMetrics
from agent.node.histogram import LatencyHistogram
from agent.node.reconcile import Reconciler
from agent.node.repair import KINDS
from agent.process_metrics import register_process_metrics

STATE_REPAIR_KINDS = ("hook", *KINDS)

log = logging.getLogger(__name__)


class SyncStatus(Protocol):
    @property
    def connected(self) -> bool: ...


class HookRepairCount(Protocol):
    @property
    def repairs(self) -> int: ...


class StateRepairCounts(Protocol):
    @property
    def by_kind(self) -> Mapping[str, int]: ...


class AgentCollector(Collector):
    def __init__(
        self,
        dataplane: Dataplane,
        reconciler: Reconciler,
        sync: SyncStatus | None,
        hook_guard: HookRepairCount | None = None,
        per_pod: bool = True,
        state_guard: StateRepairCounts | None = None,
    ) -> None:
        self._per_pod = per_pod  # off: no per-pod series at all, only the node's totals
        self._dataplane = dataplane
        self._reconciler = reconciler
        self._sync = sync
        self._hook_guard = hook_guard
        self._state_guard = state_guard
        self.flows: FlowMetrics | None = None  # podfence_flows_total, a collector of its own

    def describe(self) -> Iterable[Metric]:
        # Describing would read the kernel at registration time; an empty describe() makes
        # the registry call collect() only when scraped.
        return []

    def collect(self) -> Iterable[Metric]:
        yield from self._endpoint_counters()
        yield from self._dataplane_features()
        status = self._reconciler.status()
        yield _histogram(
            "podfence_policy_programming_seconds",
            "Time from receiving a policy version to the kernel enforcing it (retries included).",
            self._reconciler.programming_seconds,
        )
        yield _histogram(
            "podfence_interface_programming_seconds",
            "Time from a netlink change (new pod interface, route, FDB entry) to the kernel enforcing it.",
            self._reconciler.interface_seconds,
        )
        applied = GaugeMetricFamily(
            "podfence_applied_version", "Last policy version the kernel enforces (-1: none yet)."
        )
        applied.add_metric([], -1 if status.applied_version is None else status.applied_version)
        yield applied
        connected = GaugeMetricFamily(
            "podfence_sync_connected", "1 while the sync stream to the control service is up."
        )
        connected.add_metric([], 1 if self._sync is not None and self._sync.connected else 0)
        yield connected
        held = GaugeMetricFamily(
            "podfence_sync_held",
            "1 while the control replica lags behind the enforced policy and its versions are held.",
        )
        held.add_metric([], 1 if getattr(self._sync, "held", None) else 0)
        yield held
        yield _gauge(
            "podfence_managed_endpoints",
            "Pods of this node the agent enforces policy for.",
            status.managed_endpoints,
        )
        yield _gauge(
            "podfence_located_endpoints",
            "Managed pods whose host interface was found.",
            status.resolved_endpoints,
        )
        yield _gauge(
            "podfence_pod_interfaces",
            "Host-side pod interfaces guarded (known pod or not).",
            status.pod_interfaces,
        )
        yield _gauge(
            "podfence_rejected_policies",
            "Policies left out because this node's maps cannot hold them (names in the log and status).",
            len(status.rejected_policies),
        )
        errors = CounterMetricFamily(
            "podfence_apply_errors", "Failed attempts to program the kernel (retried ones included)."
        )
        errors.add_metric([], status.apply_errors_total)
        yield errors
        repairs = CounterMetricFamily(
            "podfence_hook_repairs",
            "podfence netfilter hooks put back first after another tool moved or removed them.",
        )
        hook_repairs = self._hook_guard.repairs if self._hook_guard is not None else 0
        repairs.add_metric([], hook_repairs)
        yield repairs
        state = CounterMetricFamily(
            "podfence_state_repairs",
            "Pieces of podfence's kernel state put back after someone removed or changed them, per kind.",
            labels=["kind"],
        )
        found = self._state_guard.by_kind if self._state_guard is not None else {}
        for kind in STATE_REPAIR_KINDS:  # a fixed set of labels, each present from the start
            state.add_metric([kind], hook_repairs if kind == "hook" else found.get(kind, 0))
        yield state

    def _endpoint_counters(self) -> Iterable[Metric]:
        totals = CounterMetricFamily(
            "podfence_packets",
            "Packets seen by the filters of this node's pods, per direction and verdict (all pods).",
            labels=["direction", "verdict"],
        )
        packets = CounterMetricFamily(
            "podfence_endpoint_packets",
            "Packets seen by the filter of a pod, per direction and verdict.",
            labels=["namespace", "pod", "direction", "verdict"],
        )
        octets = CounterMetricFamily(
            "podfence_endpoint_bytes",
            "Bytes seen by the filter of a pod, per direction and verdict.",
            labels=["namespace", "pod", "direction", "verdict"],
        )
        try:
            counters = self._dataplane.counters()
        except Exception as exc:  # a scrape must not fail because one kernel read did
            log.warning("reading endpoint counters failed: %s", exc)
            counters = []
        summed = {(direction, verdict): 0 for direction in ("ingress", "egress")
                  for verdict in ("allowed", "denied")}  # every series exists from the start
        for counter in counters:
            for verdict, value in (("allowed", counter.allowed_packets), ("denied", counter.denied_packets)):
                summed[(counter.direction, verdict)] = summed.get((counter.direction, verdict), 0) + value
            if not self._per_pod:
                continue
            namespace, _, pod = counter.key.partition("/")
            allowed = [namespace, pod, counter.direction, "allowed"]
            denied = [namespace, pod, counter.direction, "denied"]
            packets.add_metric(allowed, counter.allowed_packets)
            packets.add_metric(denied, counter.denied_packets)
            octets.add_metric(allowed, counter.allowed_bytes)
            octets.add_metric(denied, counter.denied_bytes)
        for (direction, verdict), value in sorted(summed.items()):
            totals.add_metric([direction, verdict], value)
        return [totals, packets, octets] if self._per_pod else [totals]

    def _dataplane_features(self) -> Iterable[Metric]:
        dataplane = self._dataplane
        drops = CounterMetricFamily("podfence_drops", "Packets dropped, per drop reason.", labels=["reason"])
        entries = GaugeMetricFamily("podfence_map_entries", "Entries in use per map.", labels=["map"])
        capacity = GaugeMetricFamily("podfence_map_capacity", "Capacity per map.", labels=["map"])
        lost = CounterMetricFamily("podfence_events_lost", "Flow records not sent (budget or ring buffer).")
        audit = CounterMetricFamily(
            "podfence_audit_denied",
            "New flows admitted that the policies in audit would deny, per direction (all pods).",
            labels=["direction"],
        )
        audited = {"ingress": 0, "egress": 0}  # both series exist from the start
        try:
            if isinstance(dataplane, AuditCounting):
                for (_, direction), count in dataplane.audit_denied().items():
                    audited[direction] = audited.get(direction, 0) + count
            if isinstance(dataplane, DropReasons):
                for reason, count in sorted(dataplane.drop_reason_counts().items()):
                    drops.add_metric([reason], count)
            if isinstance(dataplane, MapUsage):
                for name, (used, size) in sorted(dataplane.map_usage().items()):
                    entries.add_metric([name], used)
                    capacity.add_metric([name], size)
            lost.add_metric([], dataplane.events_lost() if isinstance(dataplane, EventsLost) else 0)
        except Exception as exc:
            log.warning("reading dataplane statistics failed: %s", exc)
        for direction, count in sorted(audited.items()):
            audit.add_metric([direction], count)
        return [drops, entries, capacity, lost, audit]


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    gauge = GaugeMetricFamily(name, documentation)
    gauge.add_metric([], value)
    return gauge


def _histogram(name: str, documentation: str, histogram: LatencyHistogram) -> HistogramMetricFamily:
    buckets, total, _ = histogram.snapshot()
    family = HistogramMetricFamily(name, documentation)
    family.add_metric([], [(_bucket_label(bound), count) for bound, count in buckets], total)
    return family


def _bucket_label(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


def register_agent_metrics(
    registry: CollectorRegistry,
    dataplane: Dataplane,
    reconciler: Reconciler,
    sync: SyncStatus | None,
    hook_guard: HookRepairCount | None = None,
    per_pod: bool = True,
    state_guard: StateRepairCounts | None = None,
    flow_metrics: str = "verdict",
) -> AgentCollector:
    """`flow_metrics` (--flow-metrics): the labels of podfence_flows_total, whose counter is a flow
    feed sink (collector.flows), or "none"."""
    register_process_metrics(registry)
    collector = AgentCollector(dataplane, reconciler, sync, hook_guard, per_pod, state_guard)
    registry.register(collector)
    if flow_metrics != "none":
        collector.flows = FlowMetrics(flow_metrics)
        registry.register(collector.flows)
    return collector
