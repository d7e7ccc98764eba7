"""NodeState -> desired iptables chains and ipsets. Pure: no I/O, so it is testable without root.

Layout in the filter table of each family (iptables and ip6tables):

    FORWARD --(hook)--> PF-FWD:  -j PF-FROM ; -j PF-TO
    INPUT   --(hook)--> PF-FROM
    PF-FROM: per endpoint: IPv4 options but a lone Router Alert -> DROP (source routes);
             per source IP  a related ICMP error not quoting a packet to that IP -> DROP;
             per source IP  "-i <if> -s <ip> -g PF-E<key>-<rules>"  (egress),
             then "-i <if> -j DROP" (anti-spoofing: any other source from that interface)
    PF-TO:   per endpoint                "-o <if> -g PF-I<key>-<rules>"          (ingress)
    PF-E…/PF-I…: ESTABLISHED,RELATED -> RETURN; a NEW connection beyond the pod's bound (connlimit,
                 by the pod's address: source in PF-E, destination in PF-I) -> DROP; (ingress)
                 allows -> RETURN; DROP. (The node's own traffic leaves through OUTPUT:
                 nothing of it reaches these chains.)

In the IPv6 table, neighbour discovery (hop limit 255, so never routed) passes first in PF-FROM and
PF-TO: without it no IPv6 packet could flow at all. From pods (PF-FROM) only solicitations and
neighbour advertisements of address resolution's length pass so; router advertisements and
longer messages meet the pod's own chains like any packet. Before that, a known pod's neighbour
discovery meets a chain of its own (PF-N..., neighbour.py) that drops what address resolution
does not need: advertisements of addresses not the pod's, link-layer addresses not its MAC.

Allowed traffic RETURNs instead of ACCEPTing, so other software's FORWARD/INPUT rules still
see it: podfence only ever removes traffic. `-g` (goto) makes an endpoint chain's RETURN leave
PF-FROM as well, so the spoof DROP below it is never reached by an allowed packet.

Endpoint chain names carry a hash of their own rules: a changed policy is a new chain, built
before the dispatch points at it (one iptables-restore commit swaps every jump at once), and an
unchanged one keeps its name, its counters and its place across restarts.

Sets: one hash:ip per identity and family (`pf-i4-<id>`), one hash:net per CIDR peer that has
excepts (`pf-n4-<hash>`, excepts as `nomatch` entries, so excepts of one peer never carve out of
another). CIDR peers without excepts are matched inline.

An endpoint chain with GROUP_MIN_ALLOWS or more allows of one protocol and one port each (from
an identity, or a CIDR without excepts) matches all of those through one hash:net,port set
(`pf-g4i-<endpoint hash>`: "peer net,tcp:port" entries) and one rule: a new connection then
costs one set lookup instead of a walk over thousands of rules. The set is named after the
endpoint and direction, not its content, so a peer joining or leaving an identity is a set swap,
as for the identity sets. Fewer such allows keep a rule each, which reads better in
iptables-save and costs the same.
"""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass, field

from agent.dataplane.flows import FlowVerdict
from agent.dataplane.iptables.bridge import BridgePort, BridgeRules, compile_bridge
from agent.dataplane.iptables.flowrecords import (
    NO_POLICY,
    NO_RULE,
    RuleName,
    log_chain,
    rule_name,
    rule_ref,
)
from agent.dataplane.iptables.neighbour import NEIGHBOUR_CHAIN, NEIGHBOUR_DISPATCH, neighbour_rules
from agent.dataplane.iptables.tiers import tiered_rules
from agent.dataplane.types import (
    ACTION_ACCEPT,
    ACTION_DENY,
    PROTO_ANY,
    V4_MAPPED_SPACE,
    Allow,
    CidrPeer,
    DirectionPolicy,
    Endpoint,
    IdentityPeer,
    IPAddress,
    IPNetwork,
    NodeState,
)

FAMILIES = (4, 6)
CHAIN_PREFIX = "PF-"
SET_PREFIX = "pf-"
COMMENT_PREFIX = "podfence:"

FORWARD_CHAIN = "PF-FWD"
FROM_POD_CHAIN = "PF-FROM"
TO_POD_CHAIN = "PF-TO"
FIXED_CHAINS = (FORWARD_CHAIN, FROM_POD_CHAIN, TO_POD_CHAIN)
# Built-in chain -> podfence chain it jumps to (the only rules podfence adds to others' chains).
HOOKS = {"FORWARD": FORWARD_CHAIN, "INPUT": FROM_POD_CHAIN}

# Rule comments: what each rule counts as, and which endpoint a dispatch rule serves.
ALLOW = "podfence:allow"
DENY = "podfence:deny"
HOOK = "podfence:hook"
NDP = "podfence:ndp"
UNKNOWN = "podfence:unknown"
DISPATCH = "podfence:ep"  # "podfence:ep <direction> <key>"
SPOOF = "podfence:spoof"  # "podfence:spoof <key>"
IP_OPTIONS = "podfence:ipopts"  # "podfence:ipopts <key>"
ICMP_ERROR = "podfence:icmperr"  # "podfence:icmperr <key> <source ip>"
# A new flow the enforced rules admitted and the audit view would deny: "podfence:auditdeny
# <direction> <key>", a RETURN (an audit chain never drops)
AUDIT_DENY = "podfence:auditdeny"
# PF-FROM drops counted per endpoint (as its egress denials): comment "<prefix> <key>[ <detail>]"
FROM_POD_DROPS = (SPOOF, IP_OPTIONS, ICMP_ERROR)
# IPv4 options from a pod, but for a lone Router Alert (IGMP): IHL 6..15, and not (IHL 6 with the
# four option bytes 0x94040000). A source route is why: the node rewrites the destination after
# FORWARD, where the pod's chain judged a packet to the node.
_IP_OPTIONS_MATCH = '-m u32 --u32 "0>>24&0xF=6:15" -m u32 ! --u32 "0>>24&0xF=6&&20=0x94040000"'


def _icmp_error_match(ip: IPAddress) -> str:
    """A related ICMP error from `ip` that does not quote a packet sent to `ip`.

    nf_conntrack takes an error quoting a tracked flow as RELATED from any source (a router on
    the path), so a pod could hand payload in errors about another pod's flow to a pod whose
    ingress denies it (issue 21). Pods are not routers: an error a pod sends is its own only
    when the packet it quotes was sent to the pod (as bpf/lib/conntrack.h pf_ct_related).
    IPv4: the inner destination sits 8 (ICMP header) + 16 bytes past the outer header (IHL).
    IPv6: at 40 + 8 + 24, which holds only without extension headers; an error with them is
    dropped too (it cannot be read here, and a pod's own errors carry none)."""
    if ip.version == 4:
        return f'-p icmp -m conntrack --ctstate RELATED -m u32 ! --u32 "0>>22&0x3C@24={int(ip):#x}"'
    words = int(ip).to_bytes(16, "big")
    quoted = "&&".join(f"{72 + 4 * i}={int.from_bytes(words[4 * i : 4 * i + 4], 'big'):#x}" for i in range(4))
    return f'-p ipv6-icmp -m conntrack --ctstate RELATED -m u32 ! --u32 "4>>8&0xFF=58&&{quoted}"'


EGRESS = "egress"
INGRESS = "ingress"

_PORT_PROTOCOLS = {6: "tcp", 17: "udp", 132: "sctp"}
GROUP_MIN_ALLOWS = 8
DEFAULT_SET_LIMIT = 65536  # a grouped set that would hold more entries is not built
_ICMPV6_NDP_TYPES = (133, 134, 135, 136)  # router/neighbour solicitation and advertisement
# What a pod may send of them, by IPv6 packet length (header included): router and neighbour
# solicitations and neighbour advertisements with at most one 8-byte option (its link-layer
# address, or a DAD nonce). No router advertisements from pods; anything longer carries more
# than address resolution needs and is judged like any other packet.
_ICMPV6_NDP_FROM_POD = {133: "48:56", 135: "64:72", 136: "64:72"}


@dataclass(frozen=True)
class Interface:
    """A host-side pod interface as the kernel names it; `bridge` is its master bridge, if any."""

    ifindex: int
    name: str
    bridge: str | None = None


@dataclass(frozen=True)
class IpSetSpec:
    name: str
    family: int
    kind: str  # "hash:ip" | "hash:net" | "hash:net,port"
    members: frozenset[str]  # canonical "addr/len", "addr/len nomatch", "addr/len,tcp:80" (canonical_member)

    @property
    def inet(self) -> str:
        return "inet" if self.family == 4 else "inet6"


@dataclass
class DesiredState:
    sets: dict[str, IpSetSpec] = field(default_factory=dict)
    # family -> chain name -> rule specs (the text after "-A <chain> "), in order
    chains: dict[int, dict[str, list[str]]] = field(default_factory=dict)
    # (key, direction) -> family -> endpoint chain name
    endpoint_chains: dict[tuple[str, str], dict[int, str]] = field(default_factory=dict)
    uses_bridges: bool = False
    # set name -> the policies ("ns/name") whose allows match on it, so that a set too big for
    # maxelem can be charged to them (agent/dataplane/fit.py)
    set_users: dict[str, set[str]] = field(default_factory=dict)
    # the bridge family's chains for bridged pod ports (bridge.py)
    bridge: BridgeRules = field(default_factory=BridgeRules)
    # rule_ref -> what it names, for every log chain written (flowrecords.py); empty when off
    rule_names: dict[int, RuleName] = field(default_factory=dict)


def canonical_member(text: str) -> str:
    """One spelling per set entry, whatever `ipset save` or we wrote: "10.0.0.1/32 nomatch",
    "10.0.0.1/32,tcp:80" (ipset saves a host without its /32)."""
    entry, _, flag = text.partition(" ")
    address, comma, port = entry.partition(",")
    member = str(ipaddress.ip_network(address, strict=False))
    if comma:
        member = f"{member},{port}"
    return f"{member} nomatch" if flag.strip() == "nomatch" else member


def member_address(member: str) -> str:
    """The address (or network) part of a canonical set entry."""
    return member.split(" ", 1)[0].split(",", 1)[0]


def _short_hash(text: str, length: int = 8) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:length]


def _family(item: IPAddress | IPNetwork) -> int:
    return item.version


def _comment(text: str) -> str:
    return f'-m comment --comment "{text}"'


# what an Accept or Deny entry of a tier does (tiers.py)
TARGETS = {ACTION_ACCEPT: f"{_comment(ALLOW)} -j RETURN", ACTION_DENY: f"{_comment(DENY)} -j DROP"}
SET_MATCH = "-m set --match-set "  # the match _identity_match and _cidr_match write, then the name


def _identity_set(identity: int, family: int) -> str:
    return f"pf-i{family}-{identity}"


class _Compiler:
    def __init__(
        self,
        state: NodeState,
        interfaces: dict[int, Interface],
        unknown_endpoints: str,
        tcp_needs_syn: bool,
        set_limit: int,
        flows_per_pod: int,
        flow_group: int | None,
    ) -> None:
        self.state = state
        self.flow_group = flow_group
        # while an audit chain is built (_audit_chain): (the enforced allow's target, endpoint
        # key, direction); decided() then sends Accepts there and makes Denies counted RETURNs
        self._auditing: tuple[str, str, str] | None = None
        # while an endpoint direction with an audit view is compiled: what its audit chains judge
        self._audit_of: tuple[Endpoint, str, int, DirectionPolicy] | None = None
        self.interfaces = interfaces
        self.unknown_endpoints = unknown_endpoints
        self._neighbour_dispatch: list[str] = []  # the IPv6 pods' neighbour chains, by interface
        self.tcp_needs_syn = tcp_needs_syn
        self.set_limit = set_limit
        self.flows_per_pod = flows_per_pod
        self.out = DesiredState()

    # -- sets ---------------------------------------------------------------------------------

    def _add_set(self, name: str, family: int, kind: str, members: set[str], canonical: bool = False) -> str:
        spelled = frozenset(members) if canonical else frozenset(canonical_member(m) for m in members)
        self.out.sets[name] = IpSetSpec(name, family, kind, spelled)
        return name

    def _identity_match(self, peer: IdentityPeer, family: int, side: str) -> str:
        name = _identity_set(peer.identity, family)
        if name not in self.out.sets:  # many rules name one identity: its members are built once
            ips = {str(ip) for ip in self.state.identities.get(peer.identity, ()) if ip.version == family}
            self._add_set(name, family, "hash:ip", ips)
        return f"-m set --match-set {name} {side}"

    def _cidr_match(self, peer: CidrPeer, family: int, side: str) -> str | None:
        """The address part of a rule for `peer`, "" for any address, None if it matches nothing."""
        flag = "-s" if side == "src" else "-d"
        excepts = [e for e in peer.excepts if e.version == family and e.overlaps(peer.cidr)]
        if any(peer.cidr.subnet_of(e) for e in excepts):  # type: ignore[arg-type]
            return None
        if not excepts:
            return "" if peer.cidr.prefixlen == 0 else f"{flag} {peer.cidr}"
        key = f"{peer.cidr}|{','.join(sorted(str(e) for e in excepts))}"
        name = f"pf-n{family}-{_short_hash(key, 12)}"  # named by its content: built once
        if name not in self.out.sets:
            # hash:net cannot hold a /0: cover it with its two halves.
            covers = list(peer.cidr.subnets(1)) if peer.cidr.prefixlen == 0 else [peer.cidr]
            members = {str(c) for c in covers} | {f"{e} nomatch" for e in excepts}
            self._add_set(name, family, "hash:net", members)
        return f"-m set --match-set {name} {side}"

    def _port_entries(self, allow: Allow, family: int) -> set[str] | None:
        """The hash:net,port entries (canonical) of an allow of one protocol and one port from an
        identity or a CIDR without excepts; None for any other allow."""
        protocol = _PORT_PROTOCOLS.get(allow.protocol)
        if protocol is None or allow.port_first != allow.port_last or allow.port_first <= 0:
            return None
        peer = allow.peer
        if isinstance(peer, IdentityPeer):
            members = self.state.identities.get(peer.identity, ())
            networks = [ipaddress.ip_network(ip) for ip in members if ip.version == family]
        elif (
            peer.cidr.version != family
            or peer.cidr.prefixlen == 0  # hash:net,port cannot hold a /0
            or any(e.version == family and e.overlaps(peer.cidr) for e in peer.excepts)
        ):
            return None
        else:
            networks = [peer.cidr]
        return {f"{network},{protocol}:{allow.port_first}" for network in networks}

    def _grouped_allows(
        self,
        endpoint: Endpoint,
        direction: str,
        family: int,
        side: str,
        allows: tuple[Allow, ...],
        run: str = "",
        target: str = f"{_comment(ALLOW)} -j RETURN",
    ) -> tuple[str | None, list[Allow]]:
        """One set rule for the allows _port_entries can hold, if there are GROUP_MIN_ALLOWS of
        them (and their entries fit in a set), and the allows left to write one rule each."""
        entries: set[str] = set()
        rest: list[Allow] = []
        held = 0
        for allow in allows:
            found = self._port_entries(allow, family)
            if found is None:
                rest.append(allow)
            else:
                entries |= found
                held += 1
        if held < GROUP_MIN_ALLOWS or len(entries) > self.set_limit:
            return None, list(allows)
        letter = "i" if direction == INGRESS else "e"
        audit = "u" if self._auditing is not None else ""  # an audit view's sets are its own
        name = f"{SET_PREFIX}g{family}{letter}{audit}{run}-{_short_hash(endpoint.key, 12)}"
        self._add_set(name, family, "hash:net,port", entries, canonical=True)
        # the peer is the packet's source (ingress) or destination (egress); the port its destination
        return f"-m set --match-set {name} {side},dst {target}", rest

    # -- rules --------------------------------------------------------------------------------

    @staticmethod
    def _protocol_match(allow: Allow, family: int) -> str:
        if allow.protocol == PROTO_ANY:
            return ""
        name = _PORT_PROTOCOLS.get(allow.protocol)
        if name is None:
            if allow.protocol == 58 and family == 6:
                return "-p ipv6-icmp"
            return f"-p {allow.protocol}"
        if allow.port_first <= 0 and allow.port_last >= 65535:
            return f"-p {name}"
        ports = (
            str(allow.port_first)
            if allow.port_first == allow.port_last
            else f"{allow.port_first}:{allow.port_last}"
        )
        return f"-p {name} -m {name} --dport {ports}"

    def _allow_rule(
        self, allow: Allow, family: int, side: str, target: str = f"{_comment(ALLOW)} -j RETURN"
    ) -> str | None:
        peer = allow.peer
        if isinstance(peer, IdentityPeer):
            address: str | None = self._identity_match(peer, family, side)
        else:
            if _family(peer.cidr) != family:
                return None
            address = self._cidr_match(peer, family, side)
        if address is None:
            return None
        if address.startswith(SET_MATCH):
            self.out.set_users.setdefault(address.split()[3], set()).add(allow.policy)
        parts = [address, self._protocol_match(allow, family), target]
        return " ".join(p for p in parts if p)

    def decided(self, family: int, action: int, name: RuleName) -> str:
        """The target of a rule that decides for `name`: RETURN (Accept) or DROP (Deny), through
        the log chain of its rule_ref when flow records are on (flowrecords.py). In an audit
        chain: an Accept is the enforced allow's own target, a Deny a counted RETURN (logged as
        audit-denied, naming the audit rule, when flow records are on)."""
        if self._auditing is not None:
            allow_target, key, direction = self._auditing
            if action == ACTION_ACCEPT:
                return allow_target
            counted = _comment(f"{AUDIT_DENY} {direction} {key}")
            if not self.flow_group:
                return f"{counted} -j RETURN"
            return f"{counted} -g {self._log_chain(family, FlowVerdict.AUDIT_DENIED, name)}"
        if self._audit_of is not None and action == ACTION_ACCEPT:
            enforced = self._enforced_target(family, action, name)
            return f"{_comment(ALLOW)} -g {self._audit_chain(family, enforced)}"
        return self._enforced_target(family, action, name)

    def _enforced_target(self, family: int, action: int, name: RuleName) -> str:
        if not self.flow_group:
            return TARGETS[action]
        verdict = FlowVerdict.ALLOWED if action == ACTION_ACCEPT else FlowVerdict.DENIED
        chain = self._log_chain(family, verdict, name)
        return f"{_comment(ALLOW if action == ACTION_ACCEPT else DENY)} -g {chain}"

    def dropped(self, family: int, direction: str, reason: str, why: str) -> str:
        """The target of a rule dropping for `reason` (a types.Reason name) rather than by a
        policy's rule: DROP, through a log chain naming the reason when flow records are on."""
        if not self.flow_group:
            return "-j DROP"
        return f"-g {self._log_chain(family, FlowVerdict.DENIED, RuleName(direction, '', '', why, reason))}"

    def _log_chain(self, family: int, verdict: FlowVerdict, name: RuleName) -> str:
        assert self.flow_group
        ref = rule_ref(name)
        chain, rules = log_chain(verdict, ref, self.flow_group)
        self.out.chains[family].setdefault(chain, rules)
        self.out.rule_names[ref] = name
        return chain

    def matching(
        self,
        endpoint: Endpoint,
        direction: str,
        family: int,
        allows: tuple[Allow, ...],
        target: str | int,
        run: str = "",
        tier: int = 0,
    ) -> list[str]:
        """Rules sending what any of `allows` matches to `target`: a rule target, or an action
        (ACTION_ACCEPT, ACTION_DENY) that each allow's rule decides (see `decided`). One set for
        the many single-port ones (see _grouped_allows), a rule for each other; with flow
        records on, allows are grouped by their rule so that each group's target names it."""
        plain = not self.flow_group and self._auditing is None and self._audit_of is None
        if isinstance(target, str) or plain:
            fixed = target if isinstance(target, str) else TARGETS[target]
            return self._matching(endpoint, direction, family, allows, fixed, run)
        groups: dict[RuleName, list[Allow]] = {}
        for allow in allows:
            groups.setdefault(rule_name(direction, tier, allow), []).append(allow)
        rules: list[str] = []
        for index, (name, members) in enumerate(groups.items()):
            group_run = run if len(groups) == 1 else f"{run}r{index}"
            rules += self._matching(
                endpoint, direction, family, tuple(members), self.decided(family, target, name), group_run
            )
        return rules

    def _matching(
        self,
        endpoint: Endpoint,
        direction: str,
        family: int,
        allows: tuple[Allow, ...],
        target: str,
        run: str,
    ) -> list[str]:
        side = "src" if direction == INGRESS else "dst"
        rules = []
        grouped, rest = self._grouped_allows(endpoint, direction, family, side, allows, run, target)
        if grouped is not None:
            rules.append(grouped)
        seen: set[str] = set()
        for allow in rest:
            rule = self._allow_rule(allow, family, side, target)
            if rule is not None and rule not in seen:
                seen.add(rule)
                rules.append(rule)
        return rules

    def _policy_rules(
        self, endpoint: Endpoint, direction: str, family: int, policy: DirectionPolicy
    ) -> list[str]:
        """What `policy` says of a new flow past the endpoint chain's head."""
        side = "src" if direction == INGRESS else "dst"
        rules: list[str] = []
        mapped = f"{_comment(DENY)} -j DROP"
        if self._auditing is not None:  # an audit chain never drops
            mapped = self.decided(family, ACTION_DENY, RuleName(direction, "networkpolicy", "", NO_RULE))
        if policy.tiered:
            if family == 6:
                flag = "-s" if side == "src" else "-d"
                rules.append(f"{flag} {V4_MAPPED_SPACE} {mapped}")
            rules += tiered_rules(self, endpoint, direction, family, policy)
        elif not policy.isolated:
            rules.append(self.decided(family, ACTION_ACCEPT, RuleName(direction, "default", "", NO_POLICY)))
        else:
            if family == 6:
                # an IPv4-mapped peer (::ffff:0:0/96) only deceives on the wire: never admitted
                # by an IPv6 allow such as ::/0 (the eBPF datapath drops it as malformed)
                flag = "-s" if side == "src" else "-d"
                rules.append(f"{flag} {V4_MAPPED_SPACE} {mapped}")
            rules += self.matching(endpoint, direction, family, policy.allows, ACTION_ACCEPT)
            rules.append(self.decided(family, ACTION_DENY, RuleName(direction, "networkpolicy", "", NO_RULE)))
        return rules

    def _audit_chain(self, family: int, allow_target: str) -> str:
        """The audit view of the endpoint direction being compiled, for the new flows of one
        enforced allow: its Accepts end as that allow would (`allow_target`), its Denies in a
        counted RETURN (AUDIT_DENY). Every exit passes: an audit policy changes no fate."""
        assert self._audit_of is not None
        endpoint, direction, _, audit = self._audit_of
        self._audit_of, self._auditing = None, (allow_target, endpoint.key, direction)
        try:
            rules = self._policy_rules(endpoint, direction, family, audit)
        finally:
            self._audit_of, self._auditing = (endpoint, direction, family, audit), None
        letter = "I" if direction == INGRESS else "E"
        name = f"{CHAIN_PREFIX}{letter}{_short_hash(endpoint.key)}-{_short_hash(chr(10).join(rules))}u"
        self.out.chains[family][name] = rules
        return name

    def _endpoint_chain(self, endpoint: Endpoint, direction: str, family: int) -> str:
        policy: DirectionPolicy = endpoint.ingress if direction == INGRESS else endpoint.egress
        rules = [f"-m conntrack --ctstate RELATED,ESTABLISHED {_comment(ALLOW)} -j RETURN"]
        if self.tcp_needs_syn:
            # Conntrack's loose pickup would turn a mid-stream packet into a new "established"
            # entry (from whichever side speaks first); refusing it makes a deleted entry final.
            rules.append(f"-p tcp ! --syn -m conntrack --ctstate NEW {_comment(DENY)} -j DROP")
        if self.flows_per_pod:
            # nf_conntrack is one table for the node: a pod filling it stops every new flow on
            # the node (an assured, established one is never evicted). connlimit counts the
            # connections this rule let through that conntrack still holds, per pod address.
            width, end = (32 if family == 4 else 128), "saddr" if direction == EGRESS else "daddr"
            rules.append(
                f"-m conntrack --ctstate NEW -m connlimit --connlimit-above {self.flows_per_pod} "
                f"--connlimit-mask {width} --connlimit-{end} {_comment(DENY)} "
                + self.dropped(family, direction, "flow_limit", "over the pod's flow bound")
            )
        # No exemption for the node's addresses here: what the node sends (kubelet probes) leaves
        # through OUTPUT and never meets these chains, which FORWARD alone reaches. A forwarded
        # packet with the node's address as its source was forged by whoever sent it (nothing
        # on the path checks an IPv6 source, nor a bridged frame's), as the eBPF dataplane
        # judges too (only what the node sent itself is node traffic).
        if policy.audit is None:
            rules += self._policy_rules(endpoint, direction, family, policy)
        else:
            # each enforced allow sends its new flows on to the audit view, which then returns or
            # logs them as that allow would (audit_chain)
            self._audit_of = (endpoint, direction, family, policy.audit)
            try:
                rules += self._policy_rules(endpoint, direction, family, policy)
            finally:
                self._audit_of = None
        letter = "I" if direction == INGRESS else "E"
        name = f"{CHAIN_PREFIX}{letter}{_short_hash(endpoint.key)}-{_short_hash(chr(10).join(rules))}"
        self.out.chains[family][name] = rules
        self.out.endpoint_chains.setdefault((endpoint.key, direction), {})[family] = name
        return name

    # -- dispatch -----------------------------------------------------------------------------

    @staticmethod
    def _from_match(interface: Interface) -> str:
        if interface.bridge is not None:
            return f"-m physdev --physdev-in {interface.name}"
        return f"-i {interface.name}"

    def _dispatch_endpoint(self, endpoint: Endpoint, interface: Interface, family: int) -> None:
        from_rules = self.out.chains[family][FROM_POD_CHAIN]
        to_rules = self.out.chains[family][TO_POD_CHAIN]
        egress = self._endpoint_chain(endpoint, EGRESS, family)
        ingress = self._endpoint_chain(endpoint, INGRESS, family)
        own_ips = [ip for ip in endpoint.ips if ip.version == family]
        came_from = self._from_match(interface)
        if family == 4:
            from_rules.append(
                f"{came_from} {_IP_OPTIONS_MATCH} {_comment(f'{IP_OPTIONS} {endpoint.key}')} "
                + self.dropped(family, EGRESS, "ip_options", "IPv4 options (a source route)")
            )
        for ip in own_ips:
            width = 32 if family == 4 else 128
            from_rules.append(
                f"{came_from} -s {ip}/{width} {_icmp_error_match(ip)} "
                f"{_comment(f'{ICMP_ERROR} {endpoint.key} {ip}')} -j DROP"
            )
            from_rules.append(
                f"{came_from} -s {ip}/{width} {_comment(f'{DISPATCH} {EGRESS} {endpoint.key}')} -g {egress}"
            )
        spoofed = self.dropped(family, EGRESS, "spoofed_source", "not the pod's source address")
        from_rules.append(f"{came_from} {_comment(f'{SPOOF} {endpoint.key}')} {spoofed}")
        if family == 6:
            self._neighbour_chain(endpoint, came_from)

        to_comment = _comment(f"{DISPATCH} {INGRESS} {endpoint.key}")
        if interface.bridge is None:
            to_rules.append(f"-o {interface.name} {to_comment} -g {ingress}")
            return
        # Bridged: pod-to-pod on the bridge is seen (with br_netfilter) as bridge->bridge with the
        # ports in physdev; traffic routed into the bridge only has the bridge as out-interface
        # (the port is chosen after FORWARD), so it is dispatched on the destination address.
        to_rules.append(
            f"-m physdev --physdev-out {interface.name} --physdev-is-bridged {to_comment} -g {ingress}"
        )
        for ip in own_ips:
            to_rules.append(
                f"-o {interface.bridge} -d {ip} -m physdev ! --physdev-is-bridged {to_comment} -g {ingress}"
            )

    def _neighbour_chain(self, endpoint: Endpoint, came_from: str) -> None:
        """The chain holding `endpoint`'s neighbour discovery to what address resolution needs
        (neighbour.py), and its rule in the neighbour dispatch."""
        spoofed = self.dropped(6, EGRESS, "spoofed_ndp", "advertises an address not the pod's")
        rogue = self.dropped(6, EGRESS, "rogue_ndp", "neighbour discovery a pod may not send")
        denied, passed = _comment(DENY), f"{_comment(NDP)} -j RETURN"
        rules = neighbour_rules(endpoint, passed, f"{denied} {spoofed}", f"{denied} {rogue}")
        name = f"{NEIGHBOUR_CHAIN}{_short_hash(endpoint.key)}-{_short_hash(chr(10).join(rules))}"
        self.out.chains[6][name] = rules
        dispatch = _comment(f"{DISPATCH} {EGRESS} {endpoint.key}")
        self._neighbour_dispatch.append(f"{came_from} {dispatch} -g {name}")

    @staticmethod
    def _ndp_rules(from_pod: bool) -> list[str]:
        # IPv6 neighbour discovery (from link-local, unspecified or global sources) never leaves
        # the link (hop limit 255 proves it was not routed); without it nothing else works.
        if from_pod:
            return [
                f"-p ipv6-icmp -m icmp6 --icmpv6-type {icmp_type} -m hl --hl-eq 255 "
                f"-m length --length {length} {_comment(NDP)} -j RETURN"
                for icmp_type, length in _ICMPV6_NDP_FROM_POD.items()
            ]
        return [
            f"-p ipv6-icmp -m icmp6 --icmpv6-type {icmp_type} -m hl --hl-eq 255 {_comment(NDP)} -j RETURN"
            for icmp_type in _ICMPV6_NDP_TYPES
        ]

    def _dispatch_unknown(self, interface: Interface, family: int) -> None:
        if self.unknown_endpoints == "allow":
            return
        comment = _comment(UNKNOWN)
        unknown = "interface of no known pod"
        egress = self.dropped(family, EGRESS, "unknown_endpoint", unknown)
        self.out.chains[family][FROM_POD_CHAIN].append(f"{self._from_match(interface)} {comment} {egress}")
        if interface.bridge is None:
            to = f"-o {interface.name}"
        else:
            to = f"-m physdev --physdev-out {interface.name} --physdev-is-bridged"
        ingress = self.dropped(family, INGRESS, "unknown_endpoint", unknown)
        self.out.chains[family][TO_POD_CHAIN].append(f"{to} {comment} {ingress}")

    def compile(self) -> DesiredState:
        claimed: dict[int, Endpoint] = {}
        for key in sorted(self.state.endpoints):
            endpoint = self.state.endpoints[key]
            if endpoint.ifindex is not None and endpoint.ifindex in self.interfaces:
                claimed.setdefault(endpoint.ifindex, endpoint)
        for family in FAMILIES:
            self.out.chains[family] = {
                FORWARD_CHAIN: [f"-j {FROM_POD_CHAIN}", f"-j {TO_POD_CHAIN}"],
                FROM_POD_CHAIN: self._ndp_rules(from_pod=True) if family == 6 else [],
                TO_POD_CHAIN: self._ndp_rules(from_pod=False) if family == 6 else [],
            }
            for ifindex in sorted(claimed):
                self._dispatch_endpoint(claimed[ifindex], self.interfaces[ifindex], family)
            for ifindex in sorted(self.state.pod_interfaces - claimed.keys()):
                if ifindex in self.interfaces:
                    self._dispatch_unknown(self.interfaces[ifindex], family)
        if self._neighbour_dispatch:
            # ICMPv6 that may be neighbour discovery (hop limit 255) meets its pod's chain first
            dispatch = f"{NEIGHBOUR_DISPATCH}{_short_hash(chr(10).join(self._neighbour_dispatch))}"
            self.out.chains[6][dispatch] = self._neighbour_dispatch
            self.out.chains[6][FROM_POD_CHAIN].insert(0, f"-p ipv6-icmp -m hl --hl-eq 255 -j {dispatch}")
        ports = [
            BridgePort(self.interfaces[i].name, claimed.get(i))
            for i in sorted(set(claimed) | set(self.state.pod_interfaces))
            if i in self.interfaces and self.interfaces[i].bridge is not None
        ]
        self.out.bridge = compile_bridge(sorted(ports, key=lambda p: p.name), self.unknown_endpoints)
        self.out.uses_bridges = any(
            self.interfaces[i].bridge is not None
            for i in (set(claimed) | set(self.state.pod_interfaces))
            if i in self.interfaces
        )
        return self.out


def compile_state(
    state: NodeState,
    interfaces: dict[int, Interface],
    unknown_endpoints: str = "drop",
    tcp_needs_syn: bool = False,
    set_limit: int = DEFAULT_SET_LIMIT,
    flows_per_pod: int = 0,
    flow_group: int | None = None,
) -> DesiredState:
    """The chains and sets that make the kernel enforce `state` on the given interfaces.

    tcp_needs_syn: a TCP flow conntrack does not know must start with a SYN (set when
    established connections are reset on policy change, so that a reset one stays cut).
    Endpoints whose interface is unknown (ifindex None or not in `interfaces`) get no dispatch:
    there is no interface to filter yet, and its traffic cannot exist either.
    set_limit: the most entries a grouped hash:net,port set may get (the sets' maxelem).
    flows_per_pod: the most connections a pod address may hold in conntrack per direction (its
    new ones beyond are dropped as denials); 0: no bound.
    flow_group: the NFLOG group the deciding rules log new flows to (flowrecords.py); None: no
    flow records, the deciding rules RETURN or DROP themselves."""
    if unknown_endpoints not in ("drop", "allow"):
        raise ValueError(f"unknown_endpoints must be 'drop' or 'allow', not {unknown_endpoints!r}")
    return _Compiler(
        state, interfaces, unknown_endpoints, tcp_needs_syn, set_limit, flows_per_pod, flow_group
    ).compile()
