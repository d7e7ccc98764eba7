"""Flow records of the BPF dataplane (issue 24): the ring buffer's flow events, named.

The datapath (bpf/lib/metrics.h) sends one event when a judgement newly admits a way of a flow
and, for a denied flow, its first packet and then one aggregate per PF_FLOW_DENY_INTERVAL; what a
denied flow still holds when it goes quiet is sent from here (`sweep_denied`), by reading and
deleting its pf_flow_denied entry. An event carries what decided: the direction's policy id and,
for a tiered direction, the merged verdict word, whose ranks name ClusterNetworkPolicy rules.

Naming happens here, from the NodeState the dataplane last applied (`FlowNamer.update`), so the
datapath pays nothing for it. A NetworkPolicy allow is found among the endpoint's allows by the
flow's peer, protocol and port: the kernel merges the allows of a policy id into one entry per
cell (identical lists of different policies share it), so it cannot tell which of several
allows matching the same packet it used; any of them decides, and the first in the list is
named. The (tier, policy, rule) named is interned into the record's `rule_ref`. A flow judged
under a state older than the last apply is named after the new one (a race of one apply).

Audit verdicts: the kernel judges a new INGRESS flow by its audit view and sends the record
audit-denied (bpf/lib/audit.h). The EGRESS audit verdict is computed here instead, from the allowed
record every newly admitted egress flow gets: nf_egress_link is too near the verifier's limit to
hold the lookup. `audit_denial` judges the record's tuple by the endpoint's egress audit view with
the matching the kernel's lookup does (pf_policy_allows: identity or CIDR peer, protocol, port,
tiered ranks); a denial turns the record audit-denied, naming the audit view's rule, and counts
in `egress_audit_denied`. Exact for every recorded flow; a flow whose record the datapath could not
send (its budget) is counted in events lost, not audited. Judged by the audit view of the state
last applied, like the naming (the same race of one apply).
"""

from __future__ import annotations

import ctypes
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from agent.dataplane.bpf import ctbound
from agent.dataplane.bpf.maps import ntohs
from agent.dataplane.bpf.structs import (
    ACT_ACCEPT,
    ACT_DENY,
    ACT_PASS,
    FLOW_ALLOWED,
    FLOW_AUDIT_DENIED,
    FLOW_DENIED,
    REASON_MAX,
    Direction,
    FlowEventStruct,
    Reason,
    address_from_bytes,
)
from agent.dataplane.flows import FlowRecord, FlowVerdict
from agent.dataplane.types import (
    TIER_ADMIN,
    TIER_BASELINE,
    Allow,
    DirectionPolicy,
    IPAddress,
    NodeState,
    TieredAllow,
    matches,
)

# why no rule decided (FlowRecord.rule when rule_ref is 0)
NO_POLICY = "no policy selects the pod"
NO_RULE_MATCHED = "isolated, no rule matched"
NO_RULE_OPEN = "no rule matched, not isolated"
NODE_TRAFFIC = "node traffic"

_VERDICTS = {FLOW_ALLOWED: FlowVerdict.ALLOWED, FLOW_AUDIT_DENIED: FlowVerdict.AUDIT_DENIED}
_TIER_NAMES = {TIER_ADMIN: "admin"}


@dataclass(frozen=True)
class RawFlow:
    """One flow event as the datapath sent it (struct pf_flow_event), or a swept aggregate."""

    time_ns: int  # CLOCK_MONOTONIC
    endpoint_id: int
    direction: int
    verdict: int
    reason: int
    protocol: int
    source: IPAddress
    destination: IPAddress
    source_port: int
    destination_port: int
    policy_id: int
    verdict_word: int
    packets: int
    bytes: int


def raw_flow(event: FlowEventStruct) -> RawFlow:
    return _raw(event, event, event.time_ns, event.verdict)


def _raw(where: Any, what: Any, time_ns: int, verdict: int) -> RawFlow:
    """A RawFlow from the struct naming the flow (`where`: a flow event, or a pf_flow_denied key)
    and the one saying what decided and how much (`what`: the event, or the key's pending value)."""
    return RawFlow(
        time_ns=time_ns,
        endpoint_id=where.endpoint_id,
        direction=where.direction,
        verdict=verdict,
        reason=where.reason,
        protocol=where.protocol,
        source=address_from_bytes(bytes(where.saddr.bytes)),
        destination=address_from_bytes(bytes(where.daddr.bytes)),
        source_port=ntohs(where.sport_be),
        destination_port=ntohs(where.dport_be),
        policy_id=what.policy_id,
        verdict_word=what.verdict_word,
        packets=what.packets,
        bytes=what.bytes,
    )


@dataclass
class _View:
    """The applied state flows are named after; the address index is built on first use."""

    state: NodeState
    endpoint_keys: dict[int, str]  # endpoint_id -> "namespace/name"
    _identities: dict[IPAddress, frozenset[int]] | None = field(default=None, repr=False)
    _node_ips: frozenset[IPAddress] = frozenset()

    def __post_init__(self) -> None:
        self._node_ips = frozenset(self.state.node_ips)

    def identities_of(self, address: IPAddress) -> frozenset[int]:
        if self._identities is None:
            index: dict[IPAddress, set[int]] = {}
            for identity, addresses in self.state.identities.items():
                for each in addresses:
                    index.setdefault(each, set()).add(identity)
            self._identities = {a: frozenset(ids) for a, ids in index.items()}
        return self._identities.get(address, frozenset())

    def is_node(self, address: IPAddress) -> bool:
        return address in self._node_ips


def _matches(view: _View, rule: Allow | TieredAllow, peer: IPAddress, protocol: int, port: int) -> bool:
    return matches(rule, peer, view.identities_of(peer), protocol, port)


class FlowNamer:
    """Names flow events after the NodeState last applied; interns what it names into rule_ref."""

    def __init__(self) -> None:
        self._view = _View(NodeState(version=0), {})
        self._refs: dict[tuple[str, str, str], int] = {}
        self._lock = threading.Lock()  # interning: named from the feed thread, read from others
        self._egress_audit_denied: dict[str, int] = {}  # endpoint key -> audit-denied egress records

    def update(self, state: NodeState, endpoint_keys: dict[int, str]) -> None:
        """After an apply: `endpoint_keys` maps each endpoint_id to its key. Replaced whole; the
        egress audit counts of endpoints gone go with them, as their kernel counter slots do."""
        self._view = _View(state, dict(endpoint_keys))
        keys = set(endpoint_keys.values())
        with self._lock:
            self._egress_audit_denied = {k: n for k, n in self._egress_audit_denied.items() if k in keys}

    def endpoint_key(self, endpoint_id: int) -> str:
        return self._view.endpoint_keys.get(endpoint_id, "")

    def rule_ref(self, tier: str, policy: str, rule: str) -> int:
        with self._lock:
            return self._refs.setdefault((tier, policy, rule), len(self._refs) + 1)

    def rule_of(self, rule_ref: int) -> tuple[str, str, str] | None:
        """(tier, policy, rule) a rule_ref stands for; None for 0 or one never handed out."""
        with self._lock:
            for named, ref in self._refs.items():
                if ref == rule_ref:
                    return named
        return None

    def egress_audit_denied(self) -> dict[str, int]:
        """Per endpoint key, the egress flows named audit-denied (the kernel counts ingress ones)."""
        with self._lock:
            return dict(self._egress_audit_denied)

    def name(self, raw: RawFlow, now_mono_ns: int, now_wall_ns: int) -> FlowRecord:
        view = self._view
        key = view.endpoint_keys.get(raw.endpoint_id, "")
        direction = Direction(raw.direction).name.lower() if raw.direction in (0, 1) else str(raw.direction)
        reason = Reason(raw.reason) if raw.reason < REASON_MAX else None
        verdict = _VERDICTS.get(raw.verdict, FlowVerdict.DENIED)
        denial = self._egress_audit(view, key, raw, reason)
        if denial is not None:
            verdict = FlowVerdict.AUDIT_DENIED
            tier, policy, rule = denial
        else:
            tier, policy, rule = self._decider(view, key, raw, reason)
        ref = self.rule_ref(tier, policy, rule) if policy else 0
        return FlowRecord(
            time_ns=now_wall_ns - max(0, now_mono_ns - raw.time_ns),
            endpoint=key,
            direction=direction,
            protocol=raw.protocol,
            source=str(raw.source),
            destination=str(raw.destination),
            source_port=raw.source_port,
            destination_port=raw.destination_port,
            verdict=verdict,
            reason="" if reason is Reason.ALLOWED else (reason.name.lower() if reason else str(raw.reason)),
            rule_ref=ref,
            tier=tier,
            policy=policy,
            rule=rule,
            packets=raw.packets,
            bytes=raw.bytes,
        )

    def _egress_audit(
        self, view: _View, key: str, raw: RawFlow, reason: Reason | None
    ) -> tuple[str, str, str] | None:
        """What the egress audit view denying a newly admitted egress flow names; None when there
        is no such view or it admits the flow. Counted once per record (one per admission)."""
        if raw.direction != Direction.EGRESS or raw.verdict != FLOW_ALLOWED or reason is not Reason.ALLOWED:
            return None
        endpoint = view.state.endpoints.get(key)
        if endpoint is None or endpoint.egress.audit is None:
            return None
        audit = endpoint.egress.audit
        denial = audit_denial(view, audit, raw.destination, raw.protocol, raw.destination_port)
        if denial is not None:
            with self._lock:
                self._egress_audit_denied[key] = self._egress_audit_denied.get(key, 0) + 1
        return denial

    def _decider(self, view: _View, key: str, raw: RawFlow, reason: Reason | None) -> tuple[str, str, str]:
        """(tier, policy, rule) of what decided; policy "" when no rule did (rule says why)."""
        if reason not in (Reason.ALLOWED, Reason.POLICY):
            return "", "", ""  # spoofed source, malformed, ...: the reason says it all
        ingress = raw.direction == Direction.INGRESS
        peer = raw.source if ingress else raw.destination
        if reason is Reason.ALLOWED and ingress and view.is_node(raw.source):
            return "default", "", NODE_TRAFFIC
        if raw.policy_id == 0:
            return "default", "", NO_POLICY
        endpoint = view.state.endpoints.get(key)
        if endpoint is None:
            return "", "", ""
        policy = endpoint.ingress if ingress else endpoint.egress
        if raw.verdict == FLOW_AUDIT_DENIED:
            # what the audit view (bpf/lib/audit.h) decided: its policy id and verdict word
            audit = policy.audit
            if audit is None:
                return "", "", ""
            if audit.tiered:
                return _tiered_decider(view, audit, raw, peer)
            return "networkpolicy", "", NO_RULE_MATCHED
        if policy.tiered:
            return _tiered_decider(view, policy, raw, peer)
        if reason is Reason.ALLOWED:
            allow = _first_allow(view, policy.allows, peer, raw)
            if allow is not None:
                return "networkpolicy", allow.policy, allow.rule
            return "networkpolicy", "", ""
        return "networkpolicy", "", NO_RULE_MATCHED


def _first_allow(view: _View, allows: Iterable[Allow], peer: IPAddress, raw: RawFlow) -> Allow | None:
    for allow in allows:
        if _matches(view, allow, peer, raw.protocol, raw.destination_port):
            return allow
    return None


def audit_denial(
    view: _View, audit: DirectionPolicy, peer: IPAddress, protocol: int, port: int
) -> tuple[str, str, str] | None:
    """(tier, policy, rule) of what makes `audit` deny a new flow to or from `peer`; None when it
    admits it. The kernel's answer (bpf/lib/policy.h pf_policy_allows) for the same view: without
    tiers, any allow matching admits, else isolation denies; with tiers, the lowest-ranked Admin
    hit decides unless it passes, then the lowest-ranked other hit (a NetworkPolicy allow ranks
    0; a Baseline Pass admits, tiered.tiered_rule), then isolation."""
    if not audit.judged:
        return None  # the view allows everything (policy id 0 in pf_audit)
    if any(_matches(view, allow, peer, protocol, port) for allow in audit.allows):
        if not audit.tiered:
            return None
        rest: tuple[int, int, str, str, str] | None = (0, ACT_ACCEPT, "networkpolicy", "", "")
    else:
        rest = None
    admin = None
    for entry in audit.tiered:
        if not _matches(view, entry, peer, protocol, port):
            continue
        if entry.tier == TIER_ADMIN:
            if admin is None or entry.rank < admin.rank:
                admin = entry
        elif rest is None or entry.rank < rest[0]:
            action = ACT_ACCEPT if entry.tier == TIER_BASELINE and entry.action == ACT_PASS else entry.action
            rest = (entry.rank, action, _TIER_NAMES.get(entry.tier, "baseline"), entry.policy, entry.rule)
    if admin is not None and admin.action in (ACT_ACCEPT, ACT_DENY):
        return None if admin.action == ACT_ACCEPT else ("admin", admin.policy, admin.rule)
    if rest is not None:
        return None if rest[1] != ACT_DENY else rest[2:]
    return ("networkpolicy", "", NO_RULE_MATCHED) if audit.isolated else None


def _tiered_decider(
    view: _View, policy: DirectionPolicy, raw: RawFlow, peer: IPAddress
) -> tuple[str, str, str]:
    """What the merged verdict word (bpf/lib/policy.h pf_policy_allows) says decided."""
    word = raw.verdict_word
    admin_action, rest_action = word & 3, (word >> 2) & 3
    admin_rank, rest_rank = (word >> 4) & 0x3FFF, (word >> 18) & 0x1FFF
    if admin_action in (ACT_ACCEPT, ACT_DENY):
        return _ranked(policy, TIER_ADMIN, admin_rank)
    if rest_action:
        if rest_rank == 0:  # a NetworkPolicy allow (rank 0 of the rest)
            allow = _first_allow(view, policy.allows, peer, raw)
            return ("networkpolicy", allow.policy, allow.rule) if allow else ("networkpolicy", "", "")
        return _ranked(policy, None, rest_rank)
    if policy.isolated:
        return "networkpolicy", "", NO_RULE_MATCHED
    return "default", "", NO_RULE_OPEN


def _ranked(policy: DirectionPolicy, tier: int | None, rank: int) -> tuple[str, str, str]:
    for entry in policy.tiered:
        if entry.rank == rank and (entry.tier == TIER_ADMIN) == (tier == TIER_ADMIN):
            return _TIER_NAMES.get(entry.tier, "baseline"), entry.policy, entry.rule
    return ("admin" if tier == TIER_ADMIN else "baseline"), "", ""


class FlowEvents:
    """The flow-event ring buffer and the aggregates of quiet denied flows, named by a FlowNamer."""

    def __init__(self, namer: FlowNamer, deny_interval_s: float) -> None:
        self.namer = namer
        self._raw: list[RawFlow] = []
        self._interval_ns = int(deny_interval_s * 1e9)
        self._last_sweep_ns = 0

    def open(self, module: Any) -> None:
        module[b"pf_events"].open_ring_buffer(self._on_event)

    def poll(self, module: Any, timeout_ms: int) -> list[FlowRecord]:
        module.ring_buffer_poll(timeout_ms)
        now = time.monotonic_ns()
        if now - self._last_sweep_ns >= self._interval_ns // 5:
            self._last_sweep_ns = now
            self._raw.extend(sweep_denied(module, now, self._interval_ns))
        raw, self._raw = self._raw, []
        wall = time.time_ns()
        return [self.namer.name(each, now, wall) for each in raw]

    def _on_event(self, _ctx: Any, data: Any, _size: int) -> None:
        self._raw.append(raw_flow(ctypes.cast(data, ctypes.POINTER(FlowEventStruct)).contents))


def sweep_denied(module: Any, now_ns: int, interval_ns: int) -> list[RawFlow]:
    """The pending packets of denied flows quiet for `interval_ns`, their entries deleted (the
    flow's next denied packet starts a new record). Read in batches (ctbound.lookup_batches): a
    full map is a few syscalls, then one delete per quiet flow. A packet the datapath counts
    between the read and the delete is lost to the records (a window of one syscall)."""
    table = module[b"pf_flow_denied"]
    quiet = []
    for keys, values, count in ctbound.lookup_batches(table):
        for index in range(count):
            pending = values[index]
            if now_ns - pending.recorded_ns >= interval_ns:  # copies: the buffers are reused
                quiet.append(
                    (type(keys[index]).from_buffer_copy(keys[index]), type(pending).from_buffer_copy(pending))
                )
    swept = []
    for key, pending in quiet:
        try:
            del table[key]
        except KeyError:
            continue  # evicted meanwhile
        if pending.packets:
            swept.append(_raw(key, pending, now_ns, FLOW_DENIED))
    return swept
