"""The iptables dataplane's flow records: NFLOG packets of its log chains -> FlowRecords.

One consumer, the node's flow feed (agent/node/flowfeed.py, which hands the denied records to the
deny log too), polls them. Records wait in a bounded queue between two polls; a feed that falls
behind loses the oldest, counted. The kernel never waits for the reader: nfnetlink_log drops what
a full socket cannot take, and the group's sequence numbers count it (nflog.py).
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

from agent.dataplane.flows import FlowRecord, FlowVerdict
from agent.dataplane.iptables.flowrecords import (
    NO_POLICY,
    NO_RULE,
    SET_RULE,
    TIER_NAMES,
    AllowedFlows,
    DeniedFlows,
    RuleName,
    decode_tuple,
    parse_prefix,
)
from agent.dataplane.iptables.nflog import RECEIVE_BUFFER, NflogError, NflogPacket, NflogReader
from agent.dataplane.types import IdentityPeer, TieredAllow, matches

log = logging.getLogger(__name__)

QUEUE_RECORDS = 8192  # records kept for a consumer between two of its polls
RETRY_S = 30.0  # after the group could not be bound
_EGRESS = "egress"


@dataclass(frozen=True)
class FlowView:
    """What the last apply programmed, to name a logged packet's endpoint and rule."""

    interfaces: dict[int, str] = field(default_factory=dict)  # host-side ifindex -> endpoint key
    addresses: dict[str, str] = field(default_factory=dict)  # pod address -> endpoint key
    rules: dict[int, RuleName] = field(default_factory=dict)  # rule_ref -> rule
    # A tier's precedence written as one set per action (tiers.py) logs through one chain per
    # (direction, tier, action), SET_RULE: the deciding rule is found here, by the same "first
    # entry by rank" the compiler resolved the sets with. (endpoint key, direction, audit view?)
    # -> entries by rank; address -> the identities these entries name that it carries.
    tiered: dict[tuple[str, str, bool], tuple[TieredAllow, ...]] = field(default_factory=dict)
    identities: dict[str, frozenset[int]] = field(default_factory=dict)


def _decided_by_set(view: FlowView, endpoint: str, name: RuleName, peer: str, protocol: int,
                    port: int, audit: bool) -> RuleName:
    """The rule among `endpoint`'s entries of `name.tier` (in its audit view: `audit`) that a
    set rule's match stood for."""
    address = ipaddress.ip_address(peer)
    identities = view.identities.get(peer, frozenset())
    for entry in view.tiered.get((endpoint, name.direction, audit), ()):
        if TIER_NAMES.get(entry.tier) == name.tier and matches(entry, address, identities, protocol, port):
            return RuleName(name.direction, name.tier, entry.policy, entry.rule)
    return name


def record_of(packet: NflogPacket, view: FlowView) -> FlowRecord | None:
    """The record of one logged packet; None when it is not podfence's or holds no IP header."""
    parsed = parse_prefix(packet.prefix)
    tuple5 = decode_tuple(packet.payload)
    if parsed is None or tuple5 is None:
        return None
    verdict, ref = parsed
    name = view.rules.get(ref, RuleName("", "", "", ""))
    if name.direction == _EGRESS:  # the pod sent it: it came in by the pod's interface
        endpoint = view.interfaces.get(packet.physindev or packet.indev) or view.addresses.get(tuple5.source)
    else:  # behind a bridge the port is unknown in FORWARD: the destination address names it
        endpoint = view.interfaces.get(packet.physoutdev or packet.outdev) or view.addresses.get(
            tuple5.destination
        )
    if name.rule == SET_RULE and endpoint:
        peer = tuple5.destination if name.direction == _EGRESS else tuple5.source
        audit = verdict == FlowVerdict.AUDIT_DENIED
        name = _decided_by_set(view, endpoint, name, peer, tuple5.protocol, tuple5.destination_port, audit)
    rule = name.rule
    if not name.decided_by_rule and not rule:
        rule = NO_RULE if verdict != FlowVerdict.ALLOWED else NO_POLICY
    return FlowRecord(
        time_ns=packet.time_ns or time.time_ns(),
        endpoint=endpoint or "",
        direction=name.direction,
        protocol=tuple5.protocol,
        source=tuple5.source,
        destination=tuple5.destination,
        source_port=tuple5.source_port,
        destination_port=tuple5.destination_port,
        verdict=verdict,
        reason=name.reason if verdict == FlowVerdict.DENIED else "",  # audit-denied passes
        rule_ref=ref if name.decided_by_rule else 0,
        tier=name.tier,
        policy=name.policy,
        rule=rule,
        packets=1,
        bytes=packet.length,
    )


class FlowSource:
    def __init__(
        self, group: int, denied_interval_s: float = 5.0, receive_buffer: int = RECEIVE_BUFFER
    ) -> None:
        self.group = group
        self.view = FlowView()  # replaced whole by the apply thread, read by the poller
        self._denied = DeniedFlows(denied_interval_s)
        self._allowed = AllowedFlows()
        self._reader: NflogReader | None = None
        self._receive_buffer = receive_buffer
        self._retry_at = 0.0
        self._records: deque[FlowRecord] = deque(maxlen=QUEUE_RECORDS)
        self._dropped = 0  # records the queue dropped for want of a poll
        self._lock = threading.Lock()
        self.foreign = 0  # packets in the group that are not podfence's records

    def poll_flows(self, timeout_ms: int) -> list[FlowRecord]:
        with self._lock:
            reader = self._open()
            if reader is None:
                time.sleep(max(timeout_ms, 0) / 1000)  # a poller loop must not spin
            else:
                self._pump(reader, 0 if self._records else timeout_ms)
            taken = list(self._records)
            self._records.clear()
            return taken

    def lost(self) -> int:
        reader = self._reader
        return (reader.lost if reader is not None else 0) + self._dropped

    def close(self) -> None:
        with self._lock:
            if self._reader is not None:
                self._reader.close()
                self._reader = None

    def _open(self) -> NflogReader | None:
        """The reader; None while the group cannot be bound (tried again every RETRY_S, and
        said so each time)."""
        if self._reader is None:
            now = time.monotonic()
            if now < self._retry_at:
                return None
            try:
                self._reader = NflogReader(self.group, self._receive_buffer)
            except NflogError as exc:
                self._retry_at = now + RETRY_S
                log.warning(
                    "no flow records for %.0f s: %s", RETRY_S, exc.strerror, extra={"nflog_group": self.group}
                )
                return None
            log.info(
                "reading flow records from NFLOG group %d", self.group, extra={"nflog_group": self.group}
            )
        return self._reader

    def _pump(self, reader: NflogReader, timeout_ms: int) -> None:
        packets = reader.read(timeout_ms)
        # the view of now, not of before the wait: a packet that came during it may have been
        # logged by the rules of an apply made meanwhile (the dataplane publishes a view that
        # names them before it commits them)
        view = self.view
        for packet in packets:
            record = record_of(packet, view)
            if record is None:
                self.foreign += 1
            elif record.verdict != FlowVerdict.DENIED:  # allowed, audit-denied: its first packet
                if self._allowed.first(record):
                    self._put(record)
            else:
                for due in self._denied.add(record):
                    self._put(due)
        for due in self._denied.flush():
            self._put(due)

    def _put(self, record: FlowRecord) -> None:
        if len(self._records) == self._records.maxlen:
            self._dropped += 1  # the deque drops its oldest
        self._records.append(record)


def flow_view(
    endpoints: dict[str, tuple[int | None, tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...]]],
    interfaces: set[int],
    rules: dict[int, RuleName],
    last_rules: dict[int, RuleName],
    tiered: dict[tuple[str, str, bool], tuple[TieredAllow, ...]] | None = None,
    identities: Mapping[int, tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...]] | None = None,
) -> FlowView:
    """The view of an apply: endpoints by interface (the first key claims it, as in the compiler)
    and address; the rules of this apply and the last (records of packets logged just before
    the change still find their rule); the tiered entries (by rank) that set rules stand for,
    with the addresses of the identities they name."""
    by_interface: dict[int, str] = {}
    by_address: dict[str, str] = {}
    for key in sorted(endpoints):
        ifindex, ips = endpoints[key]
        if ifindex is not None and ifindex in interfaces:
            by_interface.setdefault(ifindex, key)
        for ip in ips:
            by_address.setdefault(str(ip), key)
    ordered = {
        key: tuple(sorted(entries, key=lambda e: (e.tier, e.rank))) for key, entries in (tiered or {}).items()
    }
    named = {e.peer.identity for each in ordered.values() for e in each if isinstance(e.peer, IdentityPeer)}
    carried: dict[str, set[int]] = {}
    for identity in named:
        for ip in (identities or {}).get(identity, ()):
            carried.setdefault(str(ip), set()).add(identity)
    members = {address: frozenset(ids) for address, ids in carried.items()}
    return FlowView(by_interface, by_address, {**last_rules, **rules}, ordered, members)
