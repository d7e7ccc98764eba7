"""Flow records on the iptables dataplane: which rule logs what, and NFLOG packets -> FlowRecords.

Rules. Each deciding rule of an endpoint chain jumps (goto) to a log chain of its rule_ref
instead of returning or dropping itself; log chains are shared by every endpoint whose rule
has that (direction, tier, policy, rule), so they add two or three rules per distinct rule, not
per allow: 10,000 allows of one NetworkPolicy rule cost one more chain, not 10,000 more rules.

    PF-LA<ref>:  NEW -> NFLOG "pf1 a <ref>" ; RETURN            (allowed: the flow's first packet)
    PF-LU<ref>:  NEW -> NFLOG "pf1 u <ref>" ; RETURN            (audit-denied: passes, targets.py)
    PF-LD<ref>:  over the per-flow rate (hashlimit) -> DROP, counted as unlogged ;
                 NFLOG "pf1 d <ref>" ; DROP                      (denied: every packet, up to it)

Only new flows reach the deciding rules (established ones RETURN at the chain's first rule), so
established packets pay nothing. The endpoint is not in the prefix (a log chain serves many):
the packet's interfaces name it (egress: the one it came in on, ingress: the one it leaves by),
its address where a bridge hides the port.

Records. An allowed flow is one record. A denied flow is a record on its first packet, and its
later packets are added up per flow in user space (DeniedFlows) and reported as one record per
flush interval while they keep coming, so N denied packets give records whose packets sum to N
(as long as the flow stays under the per-flow log rate; what exceeds it is counted, not logged).
"""

from __future__ import annotations

import hashlib
import ipaddress
import time
from collections import OrderedDict
from dataclasses import dataclass, replace

from agent.dataplane.flows import FlowRecord, FlowVerdict
from agent.dataplane.types import TIER_ADMIN, TIER_BASELINE, Allow, TieredAllow

PREFIX_TAG = "pf1"
_VERDICT_CODES = {FlowVerdict.ALLOWED: "a", FlowVerdict.DENIED: "d", FlowVerdict.AUDIT_DENIED: "u"}
_CODE_VERDICTS = {code: verdict for verdict, code in _VERDICT_CODES.items()}

DEFAULT_NFLOG_GROUP = 1247  # not 0: ulogd and most NFLOG examples use group 0 by default
NFLOG_SIZE = 128  # bytes of each packet copied (nflog.COPY_BYTES)
DENIED_LOG_RATE = "10/sec"  # per flow: a normal denied flow (retries) is logged packet by packet
DENIED_LOG_BURST = 20
HASHLIMIT_NAME = "pf-flows"
UNLOGGED = "podfence:unlogged"  # comment of the rule counting denied packets over the log rate

NO_POLICY = "no policy selects the pod"
NO_RULE = "isolated, no rule matched"
TIER_NAMES = {TIER_ADMIN: "admin", TIER_BASELINE: "baseline", 0: "networkpolicy"}
# The rule of a tier's per-action set (tiers.py): the reader names the entry the set stood for.
SET_RULE = "@set"


def nflog_prefix(verdict: FlowVerdict, rule_ref: int) -> str:
    """The NFLOG prefix of a rule that logs `verdict` for `rule_ref`: "pf1 <a|d|u> <ref hex>",
    at most 20 characters (the kernel keeps 64)."""
    return f"{PREFIX_TAG} {_VERDICT_CODES[verdict]} {rule_ref:x}"


def parse_prefix(prefix: str) -> tuple[FlowVerdict, int] | None:
    """(verdict, rule_ref) of a podfence prefix; None for anything else (another tool's group)."""
    parts = prefix.split(" ")
    if len(parts) != 3 or parts[0] != PREFIX_TAG or parts[1] not in _CODE_VERDICTS:
        return None
    try:
        return _CODE_VERDICTS[parts[1]], int(parts[2], 16)
    except ValueError:
        return None


@dataclass(frozen=True)
class RuleName:
    """What a rule_ref stands for. `policy` "" with `rule` NO_POLICY or NO_RULE: no rule decided."""

    direction: str
    tier: str
    policy: str
    rule: str
    reason: str = "policy"  # of a denial: the drop reason name (types.Reason, lower case)

    @property
    def decided_by_rule(self) -> bool:
        return self.policy != ""


def rule_ref(name: RuleName) -> int:
    """A stable 48-bit reference: the same rule gets the same log chain across restarts, so an
    unchanged endpoint chain keeps its name (and counters). Never 0 (the contract's "none")."""
    text = "\0".join((name.direction, name.tier, name.policy, name.rule, name.reason))
    return int.from_bytes(hashlib.sha1(text.encode()).digest()[:6], "big") or 1


def allow_of(entry: TieredAllow) -> Allow:
    """The Allow of a ClusterNetworkPolicy entry: its match, policy and rule names."""
    return Allow(entry.peer, entry.protocol, entry.port_first, entry.port_last, entry.policy, entry.rule)


def rule_name(direction: str, tier: int, allow: Allow) -> RuleName:
    return RuleName(direction, TIER_NAMES.get(tier, "networkpolicy"), allow.policy, allow.rule)


def log_chain(verdict: FlowVerdict, ref: int, group: int) -> tuple[str, list[str]]:
    """The name and rules of the log chain of `ref`. The name carries a hash of the rules, so
    another group (or log rate) is a new chain, swapped in like a changed endpoint chain."""
    rules = _log_chain_rules(verdict, ref, group)
    digest = hashlib.sha1("\n".join(rules).encode()).hexdigest()[:6]
    return f"PF-L{_VERDICT_CODES[verdict].upper()}{ref:012x}{digest}", rules


def _log_chain_rules(verdict: FlowVerdict, ref: int, group: int) -> list[str]:
    prefix = nflog_prefix(verdict, ref)
    nflog = f'-j NFLOG --nflog-group {group} --nflog-prefix "{prefix}" --nflog-size {NFLOG_SIZE}'
    if verdict in (FlowVerdict.ALLOWED, FlowVerdict.AUDIT_DENIED):  # audit-denied passes too
        return [f"-m conntrack --ctstate NEW {nflog}", "-j RETURN"]
    return [
        f"-m hashlimit --hashlimit-above {DENIED_LOG_RATE} --hashlimit-burst {DENIED_LOG_BURST} "
        f"--hashlimit-mode srcip,dstip,srcport,dstport --hashlimit-name {HASHLIMIT_NAME} "
        f'-m comment --comment "{UNLOGGED}" -j DROP',
        nflog,
        "-j DROP",
    ]


# -- packets --------------------------------------------------------------------------------------

_PORTED = (6, 17, 132)
_IPV6_EXTENSIONS = (0, 43, 60)  # hop-by-hop, routing, destination options


@dataclass(frozen=True)
class Tuple5:
    protocol: int
    source: str
    destination: str
    source_port: int
    destination_port: int


def _l4(protocol: int, data: bytes, first_fragment: bool) -> tuple[int, int]:
    if not first_fragment:
        return 0, 0
    if protocol in _PORTED and len(data) >= 4:
        return int.from_bytes(data[0:2], "big"), int.from_bytes(data[2:4], "big")
    if protocol in (1, 58) and len(data) >= 2:
        return data[0], data[1]  # type, code
    return 0, 0


def decode_tuple(payload: bytes) -> Tuple5 | None:
    """The 5-tuple of an IPv4 or IPv6 packet's first bytes; None when they hold no whole header."""
    if len(payload) >= 20 and payload[0] >> 4 == 4:
        header = (payload[0] & 0x0F) * 4
        if header < 20:
            return None
        protocol = payload[9]
        first = int.from_bytes(payload[6:8], "big") & 0x1FFF == 0
        source, destination = ipaddress.IPv4Address(payload[12:16]), ipaddress.IPv4Address(payload[16:20])
        return Tuple5(protocol, str(source), str(destination), *_l4(protocol, payload[header:], first))
    if len(payload) >= 40 and payload[0] >> 4 == 6:
        source6, destination6 = ipaddress.IPv6Address(payload[8:24]), ipaddress.IPv6Address(payload[24:40])
        protocol, offset, first = payload[6], 40, True
        while protocol in (*_IPV6_EXTENSIONS, 44) and offset + 8 <= len(payload):
            if protocol == 44:  # fragment: ports only in the first
                first = int.from_bytes(payload[offset + 2 : offset + 4], "big") & 0xFFF8 == 0
                protocol, offset = payload[offset], offset + 8
            else:
                protocol, offset = payload[offset], offset + (payload[offset + 1] + 1) * 8
        return Tuple5(protocol, str(source6), str(destination6), *_l4(protocol, payload[offset:], first))
    return None


# -- allowed flows, once; denied packets, added up per flow ---------------------------------------

ALLOWED_REPEAT_S = 30.0  # an allowed flow's first packet logged again within this: no new record


def flow_key(record: FlowRecord) -> tuple[object, ...]:
    return (
        record.endpoint, record.direction, record.protocol, record.source, record.destination,
        record.source_port, record.destination_port, record.rule_ref, record.policy, record.rule,
    )  # fmt: skip


class AllowedFlows:
    """Allowed flows reported in the last `window_s`. A flow whose packets the next hop drops
    (the peer's ingress denies it) never gets its conntrack entry confirmed, so each of its
    packets is NEW again on the sender's side and logged again: one record stands for them."""

    def __init__(
        self, window_s: float = ALLOWED_REPEAT_S, capacity: int = 65536, clock=time.monotonic
    ) -> None:  # type: ignore[no-untyped-def]
        self.window_s = window_s
        self.capacity = capacity
        self._clock = clock
        self._seen: OrderedDict[tuple[object, ...], float] = OrderedDict()

    def first(self, record: FlowRecord) -> bool:
        """Is this the flow's first record within the window (then it is remembered)?"""
        now = self._clock()
        key = flow_key(record)
        seen = self._seen.get(key)
        if seen is not None and now - seen < self.window_s:
            return False
        self._seen[key] = now
        self._seen.move_to_end(key)
        while len(self._seen) > self.capacity or (
            self._seen and now - next(iter(self._seen.values())) >= self.window_s
        ):
            self._seen.popitem(last=False)
        return True


@dataclass
class _Denied:
    record: FlowRecord  # the flow's first record: the template of the later ones
    packets: int = 0  # not yet reported
    bytes: int = 0
    last_report: float = 0.0
    last_seen: float = 0.0


class DeniedFlows:
    """Denied packets per flow: the first one reported at once, the rest summed and reported once
    per `interval_s` while they come. At most `capacity` flows are tracked: the least recently
    seen one is reported (if it has packets pending) and forgotten to make room."""

    def __init__(self, interval_s: float = 5.0, capacity: int = 16384, clock=time.monotonic) -> None:  # type: ignore[no-untyped-def]
        self.interval_s = interval_s
        self.capacity = capacity
        self._clock = clock
        self._flows: OrderedDict[tuple[object, ...], _Denied] = OrderedDict()

    def add(self, record: FlowRecord) -> list[FlowRecord]:
        """Records due now because of this denied packet (its flow's first, or an evicted one's)."""
        now = self._clock()
        key = flow_key(record)
        flow = self._flows.get(key)
        if flow is not None:
            flow.packets += record.packets
            flow.bytes += record.bytes
            flow.last_seen = now
            self._flows.move_to_end(key)
            return []
        due: list[FlowRecord] = []
        while len(self._flows) >= self.capacity:
            _, oldest = self._flows.popitem(last=False)
            if oldest.packets:
                due.append(self._report(oldest))
        self._flows[key] = _Denied(record, last_report=now, last_seen=now)
        due.append(record)
        return due

    def flush(self, force: bool = False) -> list[FlowRecord]:
        """Records of the flows whose interval passed with packets pending (all of them: force);
        flows quiet for two intervals are forgotten."""
        now = self._clock()
        due = []
        for key, flow in list(self._flows.items()):
            if flow.packets and (force or now - flow.last_report >= self.interval_s):
                due.append(self._report(flow))
                flow.last_report = now
            elif not flow.packets and now - flow.last_seen >= 2 * self.interval_s:
                del self._flows[key]
        return due

    def _report(self, flow: _Denied) -> FlowRecord:
        record = replace(flow.record, time_ns=time.time_ns(), packets=flow.packets, bytes=flow.bytes)
        flow.packets = flow.bytes = 0
        return record

    def __len__(self) -> int:
        return len(self._flows)
