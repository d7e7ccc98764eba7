"""The iptables compiler without root: NodeState in, chains and ipsets out (no kernel involved).

Traffic-level behaviour is tested in tests/privileged/test_iptables_dataplane.py; these pin the
properties the writer relies on: stable chain names, set sharing, and the semantic traps.
"""

from __future__ import annotations

import ipaddress

from agent.dataplane.iptables.compiler import GROUP_MIN_ALLOWS, compile_state
from agent.dataplane.iptables.layout import (
    FROM_POD_CHAIN,
    TO_POD_CHAIN,
    Interface,
    canonical_member,
    member_address,
)
from agent.dataplane.types import Allow, CidrPeer, DirectionPolicy, Endpoint, IdentityPeer, NodeState

IFACES = {
    10: Interface(10, "veth-a"),
    11: Interface(11, "veth-b"),
    12: Interface(12, "veth-c", bridge="cni0"),
}


def net(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(text)


OPEN = DirectionPolicy()


def state(ingress_a: DirectionPolicy = OPEN, **kwargs: object) -> NodeState:
    endpoints = {
        "ns/a": Endpoint("ns/a", (ipaddress.ip_address("10.0.0.1"),), ingress=ingress_a, ifindex=10),
        "ns/b": Endpoint("ns/b", (ipaddress.ip_address("10.0.0.2"),), ifindex=11),
    }
    identities = kwargs.pop("identities", {1: (ipaddress.ip_address("10.0.0.2"),)})
    return NodeState(version=1, endpoints=endpoints, identities=identities, **kwargs)  # type: ignore[arg-type]


def chain_of(desired: object, key: str, direction: str, family: int = 4) -> str:
    return desired.endpoint_chains[key, direction][family]  # type: ignore[attr-defined,no-any-return]


def test_chain_names_change_with_the_policy_only() -> None:
    allow_b = DirectionPolicy(True, (Allow(IdentityPeer(1), 6, 80, 80),))
    first = compile_state(state(allow_b), IFACES)
    same = compile_state(state(allow_b, identities={1: (ipaddress.ip_address("10.0.0.9"),)}), IFACES)
    changed = compile_state(state(DirectionPolicy(True, (Allow(IdentityPeer(1), 6, 81, 81),))), IFACES)
    assert chain_of(first, "ns/a", "ingress") == chain_of(same, "ns/a", "ingress")
    assert first.sets["pf-i4-1"].members != same.sets["pf-i4-1"].members  # membership: a set swap
    assert chain_of(first, "ns/a", "ingress") != chain_of(changed, "ns/a", "ingress")
    assert chain_of(first, "ns/b", "ingress") == chain_of(changed, "ns/b", "ingress")


def test_each_cidr_peer_with_excepts_has_its_own_set() -> None:
    policy = DirectionPolicy(
        True,
        (
            Allow(CidrPeer(net("10.1.0.0/16"), (net("10.1.2.0/24"),))),
            Allow(CidrPeer(net("10.1.2.0/24"))),  # inside the first one's except: still allowed
            Allow(CidrPeer(net("0.0.0.0/0"), (net("192.168.0.0/16"),))),
        ),
    )
    desired = compile_state(state(policy), IFACES)
    rules = desired.chains[4][chain_of(desired, "ns/a", "ingress")]
    net_sets = {name: spec for name, spec in desired.sets.items() if name.startswith("pf-n4-")}
    assert len(net_sets) == 2
    members = sorted(sorted(spec.members) for spec in net_sets.values())
    assert members == [
        ["0.0.0.0/1", "128.0.0.0/1", "192.168.0.0/16 nomatch"],  # hash:net cannot hold a /0
        ["10.1.0.0/16", "10.1.2.0/24 nomatch"],
    ]
    assert any("-s 10.1.2.0/24" in r and "RETURN" in r for r in rules)
    assert rules[-1].endswith("-j DROP")


def test_an_except_covering_the_whole_cidr_matches_nothing() -> None:
    policy = DirectionPolicy(True, (Allow(CidrPeer(net("10.1.0.0/24"), (net("10.1.0.0/16"),))),))
    desired = compile_state(state(policy), IFACES)
    rules = desired.chains[4][chain_of(desired, "ns/a", "ingress")]
    assert not any("10.1.0.0" in r for r in rules)


def test_protocols_and_ports() -> None:
    policy = DirectionPolicy(
        True,
        (
            Allow(IdentityPeer(1), 132, 80, 80),
            Allow(IdentityPeer(1), 17, 1000, 2000),
            Allow(IdentityPeer(1), 6, 0, 65535),
            Allow(IdentityPeer(1)),
        ),
    )
    rules = compile_state(state(policy), IFACES).chains[4]
    chain = next(r for name, r in rules.items() if name.startswith("PF-I") and len(r) > 4)
    allows = [r for r in chain if "--match-set pf-i4-1 src" in r]
    assert "-p sctp -m sctp --dport 80 " in allows[0] and "tcp" not in allows[0]
    assert "-p udp -m udp --dport 1000:2000 " in allows[1]
    assert "-p tcp " in allows[2] and "--dport" not in allows[2]
    assert " -p " not in allows[3]  # protocol 0: every protocol, ICMP included


def test_dispatch_anti_spoofing_unknown_and_bridged_interfaces() -> None:
    base = state(pod_interfaces=frozenset({10, 11, 12}))
    multi = Endpoint("ns/m", (ipaddress.ip_address("10.0.0.5"), ipaddress.ip_address("10.0.0.6")), ifindex=12)
    with_bridged = NodeState(
        1, {**base.endpoints, "ns/m": multi}, base.identities, (), frozenset({10, 11, 12, 13})
    )
    desired = compile_state(with_bridged, {**IFACES, 13: Interface(13, "veth-new")})
    from_rules = desired.chains[4][FROM_POD_CHAIN]
    to_rules = desired.chains[4][TO_POD_CHAIN]
    veth_a = [r for r in from_rules if "-i veth-a " in r]
    # IPv4 options (but a lone Router Alert) first: a source route would slip past the dispatch
    assert "podfence:ipopts ns/a" in veth_a[0] and "--u32" in veth_a[0] and veth_a[0].endswith("-j DROP")
    # then, per own address, the related ICMP errors that do not quote a packet to it
    assert "-s 10.0.0.1/32" in veth_a[1] and "podfence:icmperr ns/a 10.0.0.1" in veth_a[1]
    assert "-s 10.0.0.1/32" in veth_a[2] and "-g PF-E" in veth_a[2]
    assert "podfence:spoof ns/a" in veth_a[-1] and veth_a[-1].endswith("-j DROP")
    assert not any("podfence:ipopts" in r for r in desired.chains[6][FROM_POD_CHAIN])
    bridged = [r for r in from_rules if "--physdev-in veth-c " in r]
    assert "podfence:ipopts ns/m" in bridged[0]
    dispatch = [r for r in bridged if "-g PF-E" in r]
    assert [r.split(" -s ")[1].split()[0] for r in dispatch] == ["10.0.0.5/32", "10.0.0.6/32"]
    assert bridged[-1].endswith("-j DROP")
    assert any("--physdev-out veth-c --physdev-is-bridged" in r for r in to_rules)
    assert any("-o cni0 -d 10.0.0.5" in r and "! --physdev-is-bridged" in r for r in to_rules)
    assert '-i veth-new -m comment --comment "podfence:unknown" -j DROP' in from_rules
    assert '-o veth-new -m comment --comment "podfence:unknown" -j DROP' in to_rules
    allowed = compile_state(
        with_bridged, {**IFACES, 13: Interface(13, "veth-new")}, unknown_endpoints="allow"
    )
    assert not any(
        "veth-new" in r for r in allowed.chains[4][FROM_POD_CHAIN] + allowed.chains[4][TO_POD_CHAIN]
    )
    assert desired.uses_bridges


def test_families_are_separate_and_interfaces_unknown_to_the_kernel_get_no_dispatch() -> None:
    policy = DirectionPolicy(True, (Allow(CidrPeer(net("10.1.0.0/16"))), Allow(CidrPeer(net("fd00::/64")))))
    unresolved = Endpoint("ns/x", (ipaddress.ip_address("10.0.0.7"),), ifindex=None)
    base = state(policy)
    desired = compile_state(NodeState(1, {**base.endpoints, "ns/x": unresolved}, base.identities), IFACES)
    v4 = desired.chains[4][chain_of(desired, "ns/a", "ingress", 4)]
    v6 = desired.chains[6][chain_of(desired, "ns/a", "ingress", 6)]
    assert any("10.1.0.0/16" in r for r in v4) and not any("fd00::" in r for r in v4)
    assert any("fd00::/64" in r for r in v6) and not any("10.1.0.0" in r for r in v6)
    assert ("ns/x", "ingress") not in desired.endpoint_chains
    # IPv4-only pod: every IPv6 packet from it is spoofed, except neighbour discovery.
    v6_from = desired.chains[6][FROM_POD_CHAIN]
    assert v6_from[0].startswith("-p ipv6-icmp") and "--hl-eq 255" in v6_from[0]
    assert [r for r in v6_from if "veth-a" in r] == [
        '-i veth-a -m comment --comment "podfence:spoof ns/a" -j DROP'
    ]


def test_reset_mode_refuses_tcp_pickup_mid_stream() -> None:
    keep = compile_state(state(), IFACES)
    reset = compile_state(state(), IFACES, tcp_needs_syn=True)
    rules = reset.chains[4][chain_of(reset, "ns/a", "egress")]
    assert "-p tcp ! --syn -m conntrack --ctstate NEW" in rules[1]
    assert chain_of(keep, "ns/a", "egress") != chain_of(reset, "ns/a", "egress")


def test_a_pods_new_connections_beyond_its_bound_are_dropped_as_its_denials() -> None:
    """Issue 21 item 10: connlimit by the pod's own address, source for egress, destination for
    ingress, right after the established flows pass; no rule without a bound."""
    bounded = compile_state(state(), IFACES, flows_per_pod=100)
    for family, width in ((4, 32), (6, 128)):
        for direction, end in (("egress", "saddr"), ("ingress", "daddr")):
            rules = bounded.chains[family][chain_of(bounded, "ns/a", direction, family)]
            assert rules[1] == (
                "-m conntrack --ctstate NEW -m connlimit --connlimit-above 100 "
                f'--connlimit-mask {width} --connlimit-{end} -m comment --comment "podfence:deny" -j DROP'
            )
    unbounded = compile_state(state(), IFACES)
    assert not any("connlimit" in rule for rules in unbounded.chains[4].values() for rule in rules)


def test_an_ipv4_mapped_peer_is_refused_before_any_ipv6_allow() -> None:
    everything6 = DirectionPolicy(True, (Allow(CidrPeer(net("::/0"))),))
    desired = compile_state(state(everything6), IFACES)
    ingress6 = desired.chains[6][chain_of(desired, "ns/a", "ingress", 6)]
    mapped = [i for i, r in enumerate(ingress6) if r.startswith("-s ::ffff:0:0/96 ") and r.endswith(" DROP")]
    allow_all = [i for i, r in enumerate(ingress6) if r.endswith("-j RETURN") and "--match-set" not in r]
    assert mapped and allow_all[-1] > mapped[0], ingress6  # ::/0 comes after the refusal
    assert not any("::ffff:0:0/96" in r for r in desired.chains[4][chain_of(desired, "ns/a", "ingress")])
    open_chain = desired.chains[6][chain_of(desired, "ns/b", "ingress", 6)]
    assert not any("::ffff:0:0/96" in r for r in open_chain)  # not isolated: untouched


def many_port_allows(count: int) -> tuple[Allow, ...]:
    """`count` allows of one port each, alternating identity 1 and a CIDR without excepts."""
    return tuple(
        Allow(IdentityPeer(1), 6, 1000 + i, 1000 + i)
        if i % 2 == 0
        else Allow(CidrPeer(net(f"10.9.{i}.0/24")), 17, 53, 53)
        for i in range(count)
    )


def test_many_single_port_allows_are_matched_through_one_hash_net_port_set() -> None:
    others = (
        Allow(IdentityPeer(1), 6, 2000, 2010),  # a range
        Allow(CidrPeer(net("10.8.0.0/16"), (net("10.8.1.0/24"),)), 6, 80, 80),  # excepts
        Allow(CidrPeer(net("0.0.0.0/0")), 6, 443, 443),  # a /0
        Allow(IdentityPeer(1), 1, 0, 65535),  # no ports
    )
    policy = DirectionPolicy(True, many_port_allows(GROUP_MIN_ALLOWS) + others)
    identities = {1: (ipaddress.ip_address("10.0.0.2"), ipaddress.ip_address("fd00::2"))}
    desired = compile_state(state(policy, identities=identities), IFACES)
    chain = desired.chains[4][chain_of(desired, "ns/a", "ingress")]
    grouped = [r for r in chain if "--match-set pf-g4i-" in r]
    assert len(grouped) == 1 and " src,dst " in grouped[0] and grouped[0].endswith("-j RETURN")
    spec = desired.sets[grouped[0].split("--match-set ", 1)[1].split(" ", 1)[0]]
    assert spec.kind == "hash:net,port" and spec.family == 4
    assert spec.members == {f"10.0.0.2/32,tcp:{1000 + i}" for i in range(0, GROUP_MIN_ALLOWS, 2)} | {
        f"10.9.{i}.0/24,udp:53" for i in range(1, GROUP_MIN_ALLOWS, 2)
    }
    # what a set cannot hold keeps its own rule, after the set's, before the final DROP
    assert "--dport 2000:2010" in chain[-5] and "pf-n4-" in chain[-4] and "--dport 443" in chain[-3]
    assert "-p 1 " in chain[-2] and chain[-1].endswith("-j DROP")
    # IPv6: the v4 CIDRs match nothing, so only half the allows are for this family: below the
    # threshold, a rule each
    chain6 = desired.chains[6][chain_of(desired, "ns/a", "ingress", 6)]
    assert not [n for n in desired.sets if n.startswith("pf-g6")]
    assert (
        sum("--match-set pf-i6-1 src -p tcp -m tcp --dport 10" in r for r in chain6) == GROUP_MIN_ALLOWS // 2
    )


def test_grouped_set_is_named_by_endpoint_so_a_peer_moving_is_a_set_swap() -> None:
    policy = DirectionPolicy(True, many_port_allows(GROUP_MIN_ALLOWS))
    before = compile_state(state(policy), IFACES)
    moved = compile_state(state(policy, identities={1: (ipaddress.ip_address("10.0.0.9"),)}), IFACES)
    assert chain_of(before, "ns/a", "ingress") == chain_of(moved, "ns/a", "ingress")
    name = next(n for n in before.sets if n.startswith("pf-g4i-"))
    assert "10.0.0.2/32,tcp:1000" in before.sets[name].members
    assert "10.0.0.9/32,tcp:1000" in moved.sets[name].members


def test_few_allows_or_too_many_entries_keep_a_rule_each() -> None:
    few = compile_state(state(DirectionPolicy(True, many_port_allows(GROUP_MIN_ALLOWS - 1))), IFACES)
    assert not [n for n in few.sets if n.startswith("pf-g")]
    policy = DirectionPolicy(True, many_port_allows(GROUP_MIN_ALLOWS))
    too_big = compile_state(state(policy), IFACES, set_limit=GROUP_MIN_ALLOWS - 1)
    assert not [n for n in too_big.sets if n.startswith("pf-g")]
    rules = too_big.chains[4][chain_of(too_big, "ns/a", "ingress")]
    assert sum(r.endswith("-j RETURN") and "podfence:allow" in r for r in rules) >= GROUP_MIN_ALLOWS


def test_set_entries_have_one_spelling() -> None:
    assert (
        canonical_member("10.9.0.1,tcp:80") == canonical_member("10.9.0.1/32,tcp:80") == "10.9.0.1/32,tcp:80"
    )
    assert canonical_member("fd00::1,udp:53") == "fd00::1/128,udp:53"
    assert canonical_member("10.9.0.0/24 nomatch") == "10.9.0.0/24 nomatch"
    assert member_address("10.9.0.1/32,tcp:80") == "10.9.0.1/32"


def test_a_pods_related_icmp_errors_must_quote_a_packet_sent_to_it() -> None:
    """nf_conntrack takes an error from any router as related; a pod is none (issue 21 item 1)."""
    endpoint = Endpoint(
        "ns/e", (ipaddress.ip_address("10.0.0.5"), ipaddress.ip_address("fd00::5")), ifindex=10
    )
    desired = compile_state(NodeState(1, {"ns/e": endpoint}, {}, (), frozenset({10})), IFACES)
    (v4,) = [r for r in desired.chains[4][FROM_POD_CHAIN] if "podfence:icmperr" in r]
    assert v4.startswith("-i veth-a -s 10.0.0.5/32 -p icmp -m conntrack --ctstate RELATED ")
    assert '! --u32 "0>>22&0x3C@24=0xa000005"' in v4 and v4.endswith("-j DROP")
    (v6,) = [r for r in desired.chains[6][FROM_POD_CHAIN] if "podfence:icmperr" in r]
    assert "-s fd00::5/128 -p ipv6-icmp -m conntrack --ctstate RELATED " in v6
    # no extension headers (next header ICMPv6), then the quoted destination word by word
    assert '! --u32 "4>>8&0xFF=58&&72=0xfd000000&&76=0x0&&80=0x0&&84=0x5"' in v6
