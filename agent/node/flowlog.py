"""Deny logs: one structured log line per denied flow record (a sink of flowfeed.FlowFeed), or
per deny event of a dataplane that has only those (DenyEventSource, its own thread).

The kernel already rate-limits records (a per-CPU token bucket) and aggregates a denied flow's
packets; this limits again in user space so that a flood of denied traffic cannot flood the logs
either, and reports how many lines it suppressed. Each line carries the pod (namespace/name),
direction, 5-tuple and drop reason (with a record: the deciding policy and rule, and the packets
it stands for) as `extra` fields, so `--log-format json` turns it into a flow record.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from agent.dataplane.base import DenyEvent, DenyEventSource
from agent.dataplane.flows import FlowRecord, FlowVerdict

log = logging.getLogger("podfence.flow")

_PROTOCOL_NAMES = {1: "ICMP", 6: "TCP", 17: "UDP", 58: "ICMPv6", 132: "SCTP"}


class TokenBucket:
    def __init__(self, rate_per_s: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._rate = rate_per_s
        self._burst = float(burst)
        self._tokens = float(burst)
        self._clock = clock
        self._last = clock()

    def take(self) -> bool:
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
        self._last = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False


def flow_fields(event: DenyEvent | FlowRecord) -> dict[str, Any]:
    """The structured fields of one flow record."""
    return {
        "pod": event.endpoint or "<unknown endpoint>",
        "direction": event.direction,
        "protocol": _PROTOCOL_NAMES.get(event.protocol, str(event.protocol)),
        "src": event.source,
        "dst": event.destination,
        "sport": event.source_port,
        "dport": event.destination_port,
        "reason": event.reason,
        "verdict": "denied",
    }


def record_fields(record: FlowRecord) -> dict[str, Any]:
    """The structured fields of a denied flow record: the deny event's, and what decided."""
    fields = flow_fields(record)  # a FlowRecord has every field a DenyEvent has
    fields.update(
        verdict=record.verdict.value,
        policy=record.policy,
        rule=record.rule,
        tier=record.tier,
        packets=record.packets,
    )
    return fields


class FlowLogger:
    def __init__(
        self,
        source: DenyEventSource | None = None,
        *,
        rate_per_s: float = 50.0,
        burst: int = 200,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._source = source
        self._bucket = TokenBucket(rate_per_s, burst, clock)
        self._clock = clock
        self.logged = 0
        self.suppressed = 0
        self._suppressed_reported = 0
        self._last_report = clock()

    def handle(self, event: DenyEvent) -> None:
        if not self._bucket.take():
            self.suppressed += 1
            return
        fields = flow_fields(event)
        log.info(
            "denied %(protocol)s %(src)s:%(sport)s -> %(dst)s:%(dport)s %(direction)s %(pod)s: %(reason)s",
            fields,
            extra={"flow": fields},
        )
        self.logged += 1

    def handle_record(self, record: FlowRecord) -> None:
        """A flow feed sink: logs the denied records (allowed ones are for observe and metrics)."""
        if record.verdict == FlowVerdict.ALLOWED:
            return
        if not self._bucket.take():
            self.suppressed += 1
            return
        fields = record_fields(record)
        log.info(
            "%(verdict)s %(protocol)s %(src)s:%(sport)s -> %(dst)s:%(dport)s %(direction)s %(pod)s: "
            "%(reason)s (%(rule)s%(policy)s, %(packets)s packets)",
            {**fields, "policy": f" of {fields['policy']}" if fields["policy"] else ""},
            extra={"flow": fields},
        )
        self.logged += 1
        self._report_suppressed()

    def run(self, stop: threading.Event, poll_timeout_ms: int = 200) -> None:
        """Blocks until `stop` is set."""
        source = self._source
        if source is None:
            raise ValueError("FlowLogger.run() needs a DenyEventSource")
        while not stop.is_set():
            try:
                for event in source.poll_events(poll_timeout_ms):
                    self.handle(event)
            except Exception as exc:  # a bad event must not end flow logging for good
                log.warning("reading deny events failed: %s", exc)
                stop.wait(1.0)
            self._report_suppressed()

    def _report_suppressed(self) -> None:
        now = self._clock()
        if self.suppressed > self._suppressed_reported and now - self._last_report >= 10.0:
            log.warning(
                "%d deny events not logged (flow log rate limit)",
                self.suppressed - self._suppressed_reported,
                extra={"suppressed": self.suppressed - self._suppressed_reported},
            )
            self._suppressed_reported = self.suppressed
            self._last_report = now
