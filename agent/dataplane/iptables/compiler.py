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

Beside this module: the names and the DesiredState it fills (layout.py), the checks that head
PF-FROM and PF-TO (frompod.py), the targets of deciding rules with flow records or an audit view
on (targets.py), ClusterNetworkPolicy tiers (tiers.py) and the bridge family's chains (bridge.py).
"""

from __future__ import annotations

import ipaddress
from dataclasses import replace
from typing import Any

from agent.dataplane.iptables.bridge import BridgePort, compile_bridge
from agent.dataplane.iptables.chain_memo import ChainMemo
from agent.dataplane.iptables.flowrecords import RuleName, rule_name
from agent.dataplane.iptables.frompod import IP_OPTIONS_MATCH, icmp_error_match, ndp_rules
from agent.dataplane.iptables.layout import (
    ALLOW,
    DENY,
    DISPATCH,
    EGRESS,
    FAMILIES,
    FORWARD_CHAIN,
    FROM_POD_CHAIN,
    ICMP_ERROR,
    INGRESS,
    IP_OPTIONS,
    NDP,
    SET_PREFIX,
    SPOOF,
    TO_POD_CHAIN,
    UNKNOWN,
    DesiredState,
    Interface,
    IpSetSpec,
    canonical_member,
    comment,
    endpoint_chain_name,
    short_hash,
)
from agent.dataplane.iptables.neighbour import NEIGHBOUR_CHAIN, NEIGHBOUR_DISPATCH, neighbour_rules
from agent.dataplane.iptables.targets import TARGETS, Targets
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

_PORT_PROTOCOLS = {6: "tcp", 17: "udp", 132: "sctp"}
GROUP_MIN_ALLOWS = 8
DEFAULT_SET_LIMIT = 65536  # a grouped set that would hold more entries is not built
def _family(item: IPAddress | IPNetwork) -> int:
    return item.version


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
        memo: ChainMemo | None = None,
    ) -> None:
        self.state = state
        self.memo = memo
        self.interfaces = interfaces
        self.unknown_endpoints = unknown_endpoints
        self._bridged_node = any(i.bridge is not None for i in interfaces.values())
        self._neighbour_dispatch: list[str] = []  # the IPv6 pods' neighbour chains, by interface
        self.tcp_needs_syn = tcp_needs_syn
        self.set_limit = set_limit
        self.flows_per_pod = flows_per_pod
        self.out = DesiredState()
        # what each deciding rule jumps to: flow-record log chains, audit chains (targets.py)
        self.targets = Targets(self.out, flow_group, self._policy_rules)

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
        name = f"pf-n{family}-{short_hash(key, 12)}"  # named by its content: built once
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
        target: str = f"{comment(ALLOW)} -j RETURN",
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
        audit = "u" if self.targets.auditing is not None else ""  # an audit view's sets are its own
        name = f"{SET_PREFIX}g{family}{letter}{audit}{run}-{short_hash(endpoint.key, 12)}"
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
        self, allow: Allow, family: int, side: str, target: str = f"{comment(ALLOW)} -j RETURN"
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
        (ACTION_ACCEPT, ACTION_DENY) that each allow's rule decides (Targets.decided). One set for
        the many single-port ones (see _grouped_allows), a rule for each other; with flow
        records on, allows are grouped by their rule so that each group's target names it."""
        if isinstance(target, str) or self.targets.plain:
            fixed = target if isinstance(target, str) else TARGETS[target]
            return self._matching(endpoint, direction, family, allows, fixed, run)
        groups: dict[RuleName, list[Allow]] = {}
        for allow in allows:
            groups.setdefault(rule_name(direction, tier, allow), []).append(allow)
        rules: list[str] = []
        for index, (name, members) in enumerate(groups.items()):
            group_run = run if len(groups) == 1 else f"{run}r{index}"
            decided = self.targets.decided(family, target, name)
            rules += self._matching(endpoint, direction, family, tuple(members), decided, group_run)
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
        mapped = TARGETS[ACTION_DENY]
        if self.targets.auditing is not None:  # an audit chain never drops
            mapped = self.targets.isolated_deny(family, direction)
        if policy.tiered:
            if family == 6:
                flag = "-s" if side == "src" else "-d"
                rules.append(f"{flag} {V4_MAPPED_SPACE} {mapped}")
            rules += tiered_rules(self, endpoint, direction, family, policy)
        elif not policy.isolated:
            rules.append(self.targets.default_allow(family, direction))
        else:
            if family == 6:
                # an IPv4-mapped peer (::ffff:0:0/96) only deceives on the wire: never admitted
                # by an IPv6 allow such as ::/0 (the eBPF datapath drops it as malformed)
                flag = "-s" if side == "src" else "-d"
                rules.append(f"{flag} {V4_MAPPED_SPACE} {mapped}")
            rules += self.matching(endpoint, direction, family, policy.allows, ACTION_ACCEPT)
            rules.append(self.targets.isolated_deny(family, direction))
        return rules

    def _endpoint_chain(self, endpoint: Endpoint, direction: str, family: int) -> str:
        if self.memo is None:
            return self._compile_endpoint_chain(endpoint, direction, family)
        flow_group = self.targets.flow_group
        settings = (self.tcp_needs_syn, self.flows_per_pod, flow_group, self.set_limit)

        def compile_alone(identities: Any) -> tuple[str, DesiredState]:
            alone = _Compiler(
                replace(self.state, identities=identities), self.interfaces, self.unknown_endpoints,
                self.tcp_needs_syn, self.set_limit, self.flows_per_pod, flow_group,
            )  # fmt: skip
            alone.out.chains[family] = {}
            return alone._compile_endpoint_chain(endpoint, direction, family), alone.out

        return self.memo.endpoint_chain(
            endpoint, direction, family, settings, self.state.node_ips, self.state.identities, self.out,
            compile_alone,
        )  # fmt: skip

    def _compile_endpoint_chain(self, endpoint: Endpoint, direction: str, family: int) -> str:
        policy: DirectionPolicy = endpoint.ingress if direction == INGRESS else endpoint.egress
        rules = [f"-m conntrack --ctstate RELATED,ESTABLISHED {comment(ALLOW)} -j RETURN"]
        if self.tcp_needs_syn:
            # Conntrack's loose pickup would turn a mid-stream packet into a new "established"
            # entry (from whichever side speaks first); refusing it makes a deleted entry final.
            rules.append(f"-p tcp ! --syn -m conntrack --ctstate NEW {comment(DENY)} -j DROP")
        if self.flows_per_pod:
            # nf_conntrack is one table for the node: a pod filling it stops every new flow on
            # the node (an assured, established one is never evicted). connlimit counts the
            # connections this rule let through that conntrack still holds, per pod address.
            width, end = (32 if family == 4 else 128), "saddr" if direction == EGRESS else "daddr"
            rules.append(
                f"-m conntrack --ctstate NEW -m connlimit --connlimit-above {self.flows_per_pod} "
                f"--connlimit-mask {width} --connlimit-{end} {comment(DENY)} "
                + self.targets.dropped(family, direction, "flow_limit", "over the pod's flow bound")
            )
        # No exemption for the node's addresses here: what the node sends (kubelet probes) leaves
        # through OUTPUT and never meets these chains, which FORWARD alone reaches. A forwarded
        # packet with the node's address as its source was forged by whoever sent it (nothing
        # on the path checks an IPv6 source, nor a bridged frame's), as the eBPF dataplane
        # judges too (only what the node sent itself is node traffic).
        # With an audit view, each enforced allow sends its new flows on to it, which then
        # returns or logs them as that allow would (targets.py).
        with self.targets.audited(endpoint, direction, policy.audit):
            rules += self._policy_rules(endpoint, direction, family, policy)
        name = endpoint_chain_name(endpoint.key, direction, rules)
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
                f"{came_from} {IP_OPTIONS_MATCH} {comment(f'{IP_OPTIONS} {endpoint.key}')} "
                + self.targets.dropped(family, EGRESS, "ip_options", "IPv4 options (a source route)")
            )
        for ip in own_ips:
            width = 32 if family == 4 else 128
            from_rules.append(
                f"{came_from} -s {ip}/{width} {icmp_error_match(ip)} "
                f"{comment(f'{ICMP_ERROR} {endpoint.key} {ip}')} -j DROP"
            )
            from_rules.append(
                f"{came_from} -s {ip}/{width} {comment(f'{DISPATCH} {EGRESS} {endpoint.key}')} -g {egress}"
            )
        spoofed = self.targets.dropped(family, EGRESS, "spoofed_source", "not the pod's source address")
        from_rules.append(f"{came_from} {comment(f'{SPOOF} {endpoint.key}')} {spoofed}")
        if family == 6:
            self._neighbour_chain(endpoint, came_from)

        to_comment = comment(f"{DISPATCH} {INGRESS} {endpoint.key}")
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
        spoofed = self.targets.dropped(6, EGRESS, "spoofed_ndp", "advertises an address not the pod's")
        rogue = self.targets.dropped(6, EGRESS, "rogue_ndp", "neighbour discovery a pod may not send")
        denied, passed = comment(DENY), f"{comment(NDP)} -j RETURN"
        rules = neighbour_rules(endpoint, passed, f"{denied} {spoofed}", f"{denied} {rogue}")
        name = f"{NEIGHBOUR_CHAIN}{short_hash(endpoint.key)}-{short_hash(chr(10).join(rules))}"
        self.out.chains[6][name] = rules
        dispatch = comment(f"{DISPATCH} {EGRESS} {endpoint.key}")
        self._neighbour_dispatch.append(f"{came_from} {dispatch} -g {name}")

    def _dispatch_unknown(self, interface: Interface, family: int) -> None:
        if self.unknown_endpoints == "allow":
            return
        counted, unknown = comment(UNKNOWN), "interface of no known pod"
        egress = self.targets.dropped(family, EGRESS, "unknown_endpoint", unknown)
        ingress = self.targets.dropped(family, INGRESS, "unknown_endpoint", unknown)
        port_from = f"-m physdev --physdev-in {interface.name}"
        port_to = f"-m physdev --physdev-out {interface.name} --physdev-is-bridged"
        if interface.bridge is not None:
            froms, tos = [port_from], [port_to]
        else:
            froms, tos = [f"-i {interface.name}"], [f"-o {interface.name}"]
            # A CNI makes a new veth a bridge port after creating it: seen before that, its
            # frames would then come in through the bridge and match no "-i" rule until the
            # agent noticed the new master. On a node with bridged pods the port is guarded too
            # (not on others: a physdev rule loads br_netfilter, which changes every bridge).
            if self._bridged_node:
                froms.append(port_from)
                tos.append(port_to)
        self.out.chains[family][FROM_POD_CHAIN] += [f"{match} {counted} {egress}" for match in froms]
        self.out.chains[family][TO_POD_CHAIN] += [f"{match} {counted} {ingress}" for match in tos]

    def compile(self) -> DesiredState:
        claimed: dict[int, Endpoint] = {}
        for key in sorted(self.state.endpoints):
            endpoint = self.state.endpoints[key]
            if endpoint.ifindex is not None and endpoint.ifindex in self.interfaces:
                claimed.setdefault(endpoint.ifindex, endpoint)
        for family in FAMILIES:
            self.out.chains[family] = {
                FORWARD_CHAIN: [f"-j {FROM_POD_CHAIN}", f"-j {TO_POD_CHAIN}"],
                FROM_POD_CHAIN: ndp_rules(from_pod=True) if family == 6 else [],
                TO_POD_CHAIN: ndp_rules(from_pod=False) if family == 6 else [],
            }
            for ifindex in sorted(claimed):
                self._dispatch_endpoint(claimed[ifindex], self.interfaces[ifindex], family)
            for ifindex in sorted(self.state.pod_interfaces - claimed.keys()):
                if ifindex in self.interfaces:
                    self._dispatch_unknown(self.interfaces[ifindex], family)
        if self._neighbour_dispatch:
            # ICMPv6 that may be neighbour discovery (hop limit 255) meets its pod's chain first
            dispatch = f"{NEIGHBOUR_DISPATCH}{short_hash(chr(10).join(self._neighbour_dispatch))}"
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
    memo: ChainMemo | None = None,
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
    flow records, the deciding rules RETURN or DROP themselves.
    memo: the endpoint chains of the last compile with this memo, taken again where their inputs
    are unchanged (chain_memo.py): the same result, in time proportional to what changed."""
    if unknown_endpoints not in ("drop", "allow"):
        raise ValueError(f"unknown_endpoints must be 'drop' or 'allow', not {unknown_endpoints!r}")
    compiler = _Compiler(
        state, interfaces, unknown_endpoints, tcp_needs_syn, set_limit, flows_per_pod, flow_group, memo
    )
    if memo is None:
        return compiler.compile()
    memo.begin()
    try:
        return compiler.compile()
    finally:
        memo.end()
