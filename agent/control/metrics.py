"""Prometheus metrics of the control service, registered on a registry the caller passes in.

Gauges that describe live state (version, connected nodes, per-node lag) are read from the hub at
scrape time by a custom collector, so they can never drift from what GetStatus reports.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from agent.control.admission import REFUSAL_REASONS
from agent.control.freshness import Freshness
from agent.process_metrics import register_process_metrics


class ControlMetrics:
    """The metrics a control service updates as events happen (counters, histograms, gauges)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        register_process_metrics(self.registry)
        self.snapshot_build_seconds = Histogram(
            "podfence_control_snapshot_build_seconds",
            "Time to compute one node's policy and encode it as a snapshot message.",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=self.registry,
        )
        self.source_errors_total = Counter(
            "podfence_control_source_errors",
            "Errors reading the policy source (unparsable files, API errors).",
            registry=self.registry,
        )
        self.invalid_objects = Gauge(
            "podfence_control_invalid_objects",
            "Objects whose current form fails validation (held at their last valid form or rejected).",
            registry=self.registry,
        )
        self.last_valid_objects = Gauge(
            "podfence_control_last_valid_objects",
            "Invalid objects whose last valid form stays in force (an invalid edit never drops one).",
            registry=self.registry,
        )
        self.streams_refused_total = Counter(
            "podfence_control_streams_refused",
            "Sync streams refused or ended before Hello: no Hello in time, too many streams awaiting "
            "Hello from one client, or the service's stream limit reached.",
            labelnames=["reason"],
            registry=self.registry,
        )
        for reason in REFUSAL_REASONS:  # every series from the start
            self.streams_refused_total.labels(reason)
        self.streams_reset_total = Counter(
            "podfence_control_stream_resets",
            "Streams that fell too far behind and were resynchronised with a snapshot.",
            registry=self.registry,
        )
        self.taint_removals_total = Counter(
            "podfence_control_taint_removals",
            "Attempts to lift a node's not-ready taint once its agent applied a first version: "
            "removed, or failed (retried with backoff).",
            labelnames=["result"],
            registry=self.registry,
        )
        for result in ("removed", "failed"):
            self.taint_removals_total.labels(result)
        # Flow relay (issue 24, flow_relay.py)
        self.flow_records_total = Counter(
            "podfence_control_flow_records",
            "Flow records agents pushed: accepted (stored and relayed), or invalid (malformed, dropped).",
            labelnames=["result"],
            registry=self.registry,
        )
        for result in ("accepted", "invalid"):
            self.flow_records_total.labels(result)
        self.flow_agent_lost_total = Counter(
            "podfence_control_flow_agent_lost",
            "Flow records agents report they dropped before sending (their buffer was full).",
            registry=self.registry,
        )
        self.flow_relayed_total = Counter(
            "podfence_control_flow_relayed",
            "Flow records sent to podfence observe readers.",
            registry=self.registry,
        )
        self.flow_reader_lost_total = Counter(
            "podfence_control_flow_reader_lost",
            "Flow records a slow podfence observe reader lost (its queue was full); nobody else waits.",
            registry=self.registry,
        )
        self.flow_readers = Gauge(
            "podfence_control_flow_readers",
            "Open podfence observe --follow streams.",
            registry=self.registry,
        )

    def watch_hub(self, read: Callable[[], tuple[int, Mapping[str, tuple[int, bool]]]]) -> None:
        """Register the scrape-time gauges; `read` returns (version, {node: (applied, connected)})."""
        self.registry.register(_HubCollector(read))

    def watch_flow_readers(self, count: Callable[[], int]) -> None:
        """Read the number of open Observe streams at scrape time."""
        self.flow_readers.set_function(count)

    def watch_freshness(self, read: Callable[[], Freshness]) -> None:
        """Register the scrape-time gauges of how recently the source heard from the API server."""
        self.registry.register(_FreshnessCollector(read))


class _FreshnessCollector(Collector):
    def __init__(self, read: Callable[[], Freshness]) -> None:
        self._read = read

    def collect(self) -> Iterable[Metric]:
        freshness = self._read()
        yield GaugeMetricFamily(
            "podfence_control_source_last_heard_seconds",
            "Seconds since the policy source last heard from the Kubernetes API server (the least "
            "recently heard of its watched kinds).",
            value=freshness.seconds_since_heard,
        )
        yield GaugeMetricFamily(
            "podfence_control_source_stale",
            "1 while the source has heard nothing for longer than a healthy watch stays silent: the "
            "replica keeps serving the state it last read, which may be out of date.",
            value=1.0 if freshness.stale else 0.0,
        )


class _HubCollector(Collector):
    def __init__(self, read: Callable[[], tuple[int, Mapping[str, tuple[int, bool]]]]) -> None:
        self._read = read

    def collect(self) -> Iterable[Metric]:
        version, nodes = self._read()
        yield GaugeMetricFamily(
            "podfence_control_policy_version", "The control service's current policy version.", value=version
        )
        yield GaugeMetricFamily(
            "podfence_control_connected_nodes",
            "Nodes with an open Sync stream.",
            value=sum(1 for _, connected in nodes.values() if connected),
        )
        lag = GaugeMetricFamily(
            "podfence_control_node_lag_versions",
            "Versions between the current policy and what the node has applied (0: in sync).",
            labels=["node"],
        )
        for node, (applied, _) in sorted(nodes.items()):
            lag.add_metric([node], max(0, version - applied))
        yield lag
