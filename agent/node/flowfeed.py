"""The node's flow feed (issue 24): one thread reads the dataplane's flow records and hands each to
every sink — the Prometheus counters below, the deny log (flowlog.py), the per-node buffer that
relays to the control service.

A sink is a plain `Callable[[FlowRecord], None]` run on the feed's thread, so it must be quick (a
counter, an append to a bounded buffer); one that raises is logged (at most once a minute) and
counted, and the other sinks still get the record.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable

from prometheus_client.metrics_core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from agent.dataplane.flows import FlowRecord, FlowRecordSource, FlowVerdict

log = logging.getLogger(__name__)

FlowSink = Callable[[FlowRecord], None]

FLOW_METRICS_MODES = ("none", "verdict", "policy")


class FlowFeed:
    def __init__(self, source: FlowRecordSource, sinks: Iterable[FlowSink] = ()) -> None:
        self._source = source
        self._sinks: list[FlowSink] = list(sinks)
        self.records = 0
        self.sink_errors = 0
        self._last_warning = float("-inf")

    def add_sink(self, sink: FlowSink) -> None:
        """Before run() starts (the list is read without a lock)."""
        self._sinks.append(sink)

    def deliver(self, records: Iterable[FlowRecord]) -> None:
        for record in records:
            self.records += 1
            for sink in self._sinks:
                try:
                    sink(record)
                except Exception as error:  # one broken sink must not starve the others
                    self.sink_errors += 1
                    self._warn(f"a flow record sink failed: {error!r}")

    def run(self, stop: threading.Event, poll_timeout_ms: int = 200) -> None:
        """Blocks until `stop` is set."""
        while not stop.is_set():
            try:
                records = list(self._source.poll_flows(poll_timeout_ms))
            except Exception as error:  # a bad event must not end the feed for good
                self._warn(f"reading flow records failed: {error!r}")
                stop.wait(1.0)
                continue
            self.deliver(records)

    def _warn(self, message: str) -> None:
        now = time.monotonic()
        if now - self._last_warning >= 60.0:
            self._last_warning = now
            log.warning("%s", message)


class FlowMetrics(Collector):
    """`podfence_flows_total{verdict,direction[,policy]}`: flow records counted by a feed sink and
    read at scrape time. `mode` "verdict" leaves the policy label out, "policy" keeps it for at
    most `max_policies` policy names (the rest count as policy "other"), so the series stay
    bounded whatever the cluster holds: 3 verdicts x 2 directions x (max_policies + 2)."""

    OTHER = "other"

    def __init__(self, mode: str = "verdict", max_policies: int = 200) -> None:
        if mode not in ("verdict", "policy"):
            raise ValueError(f"flow metrics mode must be verdict or policy, not {mode!r}")
        self.by_policy = mode == "policy"
        self._max_policies = max_policies
        self._counts: dict[tuple[str, ...], int] = {}
        self._policies: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, record: FlowRecord) -> None:
        verdict = record.verdict.value if isinstance(record.verdict, FlowVerdict) else str(record.verdict)
        key: tuple[str, ...] = (verdict, record.direction)
        with self._lock:
            if self.by_policy:
                policy = record.policy
                if policy and policy not in self._policies:
                    if len(self._policies) < self._max_policies:
                        self._policies.add(policy)
                    else:
                        policy = self.OTHER
                key = (*key, policy)
            self._counts[key] = self._counts.get(key, 0) + 1

    def collect(self) -> Iterable[Metric]:
        labels = ["verdict", "direction", "policy"] if self.by_policy else ["verdict", "direction"]
        family = CounterMetricFamily(
            "podfence_flows",
            "Flow records of this node by verdict and direction (and policy).",
            labels=labels,
        )
        with self._lock:
            counts = sorted(self._counts.items())
        for key, count in counts:
            family.add_metric(list(key), count)
        yield family
