"""The node's flow feed: every record reaches every sink, a broken sink costs only itself, and
podfence_flows_total keeps its series bounded (--flow-metrics)."""

from __future__ import annotations

import json
import logging
import threading

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from agent.dataplane.flows import FlowRecord, FlowRecordSource, FlowVerdict
from agent.logs import JsonFormatter
from agent.node.flowfeed import FlowFeed, FlowMetrics
from agent.node.flowlog import FlowLogger


def record(
    verdict: FlowVerdict = FlowVerdict.DENIED, policy: str = "", direction: str = "ingress"
) -> FlowRecord:
    return FlowRecord(
        time_ns=1,
        endpoint="ns/web",
        direction=direction,
        protocol=6,
        source="10.0.0.9",
        destination="10.0.0.5",
        source_port=40000,
        destination_port=22,
        verdict=verdict,
        reason="policy" if verdict is FlowVerdict.DENIED else "",
        policy=policy,
        rule="ingress[0]" if policy else "isolated, no rule matched",
        packets=3,
    )


class RecordsDouble:
    """Stands in for a dataplane's FlowRecordSource (the real one needs root: tests/privileged)."""

    def __init__(self, batches: list[list[FlowRecord]], stop: threading.Event) -> None:
        self._batches = batches
        self._stop = stop

    def poll_flows(self, timeout_ms: int) -> list[FlowRecord]:
        if not self._batches:
            self._stop.set()
            return []
        batch = self._batches.pop(0)
        if batch is None:
            raise OSError("ring buffer gone")
        return batch

    def flows_lost(self) -> int:
        return 0


def test_every_record_reaches_every_sink_and_a_broken_sink_costs_only_itself() -> None:
    stop = threading.Event()
    source = RecordsDouble([[record(), record(FlowVerdict.ALLOWED)], None, [record()]], stop)  # type: ignore[list-item]
    assert isinstance(source, FlowRecordSource)
    seen: list[FlowRecord] = []

    def broken(_: FlowRecord) -> None:
        raise RuntimeError("sink bug")

    feed = FlowFeed(source, [broken, seen.append])
    feed.run(stop, poll_timeout_ms=0)  # the failed poll waits a second, then goes on
    assert [r.verdict for r in seen] == [FlowVerdict.DENIED, FlowVerdict.ALLOWED, FlowVerdict.DENIED]
    assert (feed.records, feed.sink_errors) == (3, 3)


def _scrape(metrics: FlowMetrics) -> str:
    registry = CollectorRegistry()
    registry.register(metrics)
    return generate_latest(registry).decode()


def test_flow_metrics_count_by_verdict_and_direction_without_the_policy_by_default() -> None:
    metrics = FlowMetrics()
    for each in (record(), record(), record(FlowVerdict.ALLOWED, "ns/p", "egress")):
        metrics(each)
    text = _scrape(metrics)
    assert 'podfence_flows_total{direction="ingress",verdict="denied"} 2.0' in text
    assert 'podfence_flows_total{direction="egress",verdict="allowed"} 1.0' in text
    assert "policy=" not in text


def test_flow_metrics_policy_label_is_bounded() -> None:
    metrics = FlowMetrics("policy", max_policies=2)
    for name in ("ns/a", "ns/b", "ns/c", "ns/d", "ns/a"):
        metrics(record(FlowVerdict.ALLOWED, name))
    metrics(record())  # no policy decided
    text = _scrape(metrics)
    assert 'policy="ns/a",verdict="allowed"} 2.0' in text
    assert 'policy="ns/b",verdict="allowed"} 1.0' in text
    assert 'policy="other",verdict="allowed"} 2.0' in text
    assert 'policy="",verdict="denied"} 1.0' in text
    assert "ns/c" not in text and "ns/d" not in text
    with pytest.raises(ValueError):
        FlowMetrics("none")


def test_the_deny_log_names_the_deciding_rule_and_skips_allowed_records(
    caplog: pytest.LogCaptureFixture,
) -> None:
    logger = FlowLogger()
    with caplog.at_level(logging.INFO, logger="podfence.flow"):
        logger.handle_record(record(FlowVerdict.ALLOWED, "ns/p"))
        logger.handle_record(record(policy="ns/p"))
    (line,) = caplog.records
    entry = json.loads(JsonFormatter().format(line))
    assert entry["flow"]["verdict"] == "denied"
    assert (entry["flow"]["policy"], entry["flow"]["rule"], entry["flow"]["packets"]) == (
        "ns/p",
        "ingress[0]",
        3,
    )
    assert "(ingress[0] of ns/p, 3 packets)" in entry["msg"]
