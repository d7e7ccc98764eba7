"""Hostile frames from a pod, through the real kernel, on both dataplanes, routed and bridged.

Two phases per lab (one lab per dataplane and topology): every case unguarded first (it must
arrive: otherwise the case proves nothing and fails), then every case guarded by its policy (it
must not arrive, and the bpf datapath must count the documented drop reason). A guarded case
whose unguarded run did not deliver fails as well. Cases are grouped by policy in the second
phase so that the dataplane is reprogrammed once per policy, not once per case.
"""

from __future__ import annotations

import pytest
from scapy.layers.inet import GRE, ICMP, IP, IPOption_LSRR, IPOption_RR
from scapy.layers.inet6 import (
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    ICMPv6NIQueryNOOP,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)
from scapy.packet import Raw

from tests.adversarial import frames as fr
from tests.adversarial.cases import (
    POLICIES,
    UNOWNED4,
    UNOWNED6,
    Case,
    check_guarded,
    check_unguarded,
)
from tests.adversarial.harness import COMBOS, Lab

# ---- spoofed sources -----------------------------------------------------------------------------


def _node_ip(lab: Lab) -> str:
    return str(lab.node_ips[0])


CASES: list[Case] = [
    Case(
        "spoof4 the bystander",
        "victim_takes_bystander_only",
        lambda lab, m: [fr.frame(lab, fr.ip4(lab, src=lab.bystander.ip) / fr.udp(53) / Raw(m))],
        "spoofed_source",
    ),
    Case(
        "spoof6 the bystander",
        "victim_takes_bystander_only",
        lambda lab, m: [fr.frame(lab, fr.ip6(lab, src=lab.bystander.ip6) / fr.udp(53) / Raw(m))],
        "spoofed_source",
    ),
    Case(
        "spoof4 an address of an allowed ipBlock",
        "victim_takes_unowned_range",
        lambda lab, m: [fr.frame(lab, fr.ip4(lab, src=UNOWNED4) / fr.udp(53) / Raw(m))],
        "spoofed_source",
    ),
    Case(
        "spoof6 an address of an allowed ipBlock",
        "victim_takes_unowned_range",
        lambda lab, m: [fr.frame(lab, fr.ip6(lab, src=UNOWNED6) / fr.udp(53) / Raw(m))],
        "spoofed_source",
    ),
    Case(
        # routed, the node's own stack drops a packet claiming its address (a martian)
        "spoof4 the node's address (always admitted as kubelet traffic)",
        "victim_isolated",
        lambda lab, m: [fr.frame(lab, fr.ip4(lab, src=_node_ip(lab)) / fr.tcp(8080) / Raw(m))],
        "spoofed_source",
        topologies=("bridged",),
    ),
    Case(
        # issue 21 item 11 asks whether node addresses are safe for IPv6: from a pod they are not
        # accepted (and IPv6 has no martian check that would drop them on a routed node)
        "spoof6 the node's address (always admitted as kubelet traffic)",
        "victim_isolated",
        lambda lab, m: [fr.frame(lab, fr.ip6(lab, src=str(lab.node_ips[1])) / fr.tcp(8080) / Raw(m))],
        "spoofed_source",
    ),
    Case(
        # link-local sources name no pod; on a bridge they reach the victim's global address
        "ipv6 link-local source to an isolated pod",
        "victim_isolated",
        lambda lab, m: [fr.frame(lab, fr.ip6(lab, src="fe80::bad") / fr.udp(53) / Raw(m))],
        "policy",
        topologies=("bridged",),
    ),
    Case(
        "ipv6 link-local source past an isolated egress",
        "attacker_egress_isolated",
        lambda lab, m: [fr.frame(lab, fr.ip6(lab, src="fe80::bad") / fr.udp(53) / Raw(m))],
        "policy",
        topologies=("bridged",),
    ),
    Case(
        "ipv6 unspecified source past an isolated egress",
        "attacker_egress_isolated",
        lambda lab, m: [fr.frame(lab, fr.ip6(lab, src="::") / fr.udp(53) / Raw(m))],
        "policy",
        topologies=("bridged",),
    ),
    # ---- IPv4 options: the L4 header is where IHL says, and source routes are judged where they go
    Case(
        "ipv4 options whose bytes read as port 80 at offset 20",
        "victim_takes_tcp80_from_attacker",
        lambda lab, m: [
            fr.frame(lab, fr.ip4(lab, options=fr.raw_options(b"\x01\x01\x00\x50")) / fr.tcp(22) / Raw(m))
        ],
        "policy",
    ),
    Case(
        "loose source route through the node to a forbidden port",
        "victim_takes_tcp80_from_attacker",
        lambda lab, m: [
            fr.frame(
                lab,
                fr.ip4(lab, dst=_node_ip(lab), options=[IPOption_LSRR(routers=[lab.victim.ip])])
                / fr.tcp(22)
                / Raw(m),
                to_node=True,
            )
        ],
        "policy",
        passes_on=("iptables-bridged",),
    ),
    Case(
        "record route and timestamp options to a forbidden port",
        "victim_takes_tcp80_from_attacker",
        lambda lab, m: [
            fr.frame(
                lab,
                fr.ip4(
                    lab,
                    # record route with two free slots, then timestamps only (flag 0), two free
                    options=fr.raw_options(
                        bytes(IPOption_RR(routers=["0.0.0.0", "0.0.0.0"])) + b"\x44\x0c\x05\x00" + bytes(8)
                    ),
                )
                / fr.tcp(22)
                / Raw(m),
            )
        ],
        "policy",
    ),
    # ---- IPv6 extension header chains
    Case(
        "ipv6 hop-by-hop and destination options before a forbidden port",
        "victim_takes_tcp80_from_attacker",
        lambda lab, m: [
            fr.frame(lab, fr.ip6(lab) / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt() / fr.tcp(22) / Raw(m))
        ],
        "policy",
    ),
    Case(
        "ipv6 chain of 10 destination options headers",
        "victim_takes_tcp80_from_attacker",
        lambda lab, m: [fr.frame(lab, _chain(lab, [IPv6ExtHdrDestOpt() for _ in range(10)], 22, m))],
        "malformed",
    ),
    Case(
        "ipv6 routing header type 0 (no segments left)",
        "victim_takes_tcp80_from_attacker",
        lambda lab, m: [
            fr.frame(
                lab,
                fr.ip6(lab)
                / IPv6ExtHdrRouting(type=0, segleft=0, addresses=["fd00:99::1"])
                / fr.tcp(22)
                / Raw(m),
            )
        ],
        "policy",
    ),
    Case(
        "ipv6 atomic fragment header between destination options",
        "victim_takes_tcp80_from_attacker",
        lambda lab, m: [
            fr.frame(
                lab,
                _chain(
                    lab,
                    [IPv6ExtHdrDestOpt(), IPv6ExtHdrFragment(id=fr.ident32(m)), IPv6ExtHdrDestOpt()],
                    22,
                    m,
                ),
            )
        ],
        "policy",
    ),
    Case(
        "ipv6 two fragment headers",
        "victim_takes_tcp80_from_attacker",
        lambda lab, m: [
            fr.frame(
                lab, _chain(lab, [IPv6ExtHdrFragment(id=1), IPv6ExtHdrFragment(id=fr.ident32(m))], 22, m)
            )
        ],
    ),
    Case(
        "ipv6 hop-by-hop header out of place (after destination options)",
        "victim_takes_tcp80_from_attacker",
        lambda lab, m: [fr.frame(lab, _chain(lab, [IPv6ExtHdrDestOpt(), IPv6ExtHdrHopByHop()], 22, m))],
    ),
    # ---- fragments
    Case(
        "ipv4 first fragment to a forbidden port",
        "victim_takes_tcp80_from_attacker",
        lambda lab, m: fr.fragments4(lab, m, 22)[:1],
        "policy",
        incomplete=True,
        match=lambda m: fr.ipv4_fragment_with(fr.ident16(m), 0),
    ),
    Case(
        "ipv4 later fragment of a denied first fragment",
        "victim_takes_tcp80_from_attacker",
        lambda lab, m: fr.fragments4(lab, m, 22),
        "policy",
        match=lambda m: fr.ipv4_fragment_with(fr.ident16(m), 3),
    ),
    Case(
        "ipv4 orphan later fragment",
        "victim_takes_tcp80_from_attacker",
        lambda lab, m: fr.fragments4(lab, m, 22)[1:],
        "orphan_fragment",
        incomplete=True,
        match=lambda m: fr.ipv4_fragment_with(fr.ident16(m), 3),
    ),
    Case(
        "ipv4 tiny first fragment hiding the destination port",
        "victim_takes_tcp80_from_attacker",
        lambda lab, m: fr.fragments4(lab, m, 22, first_l4=3)[:1],
        "malformed",
        incomplete=True,
        match=lambda m: fr.ipv4_fragment_with(fr.ident16(m), 0),
    ),
    Case(
        "ipv4 allowed first fragment, then an overlapping first fragment to a forbidden port",
        "victim_takes_tcp80_from_attacker",
        lambda lab, m: fr.fragments4(lab, m, 80)[:1] + fr.fragments4(lab, m, 22)[:1],
        "policy",
        incomplete=True,
        match=lambda m: fr.ipv4_fragment_with(fr.ident16(m), 0, dport=22),
    ),
    Case(
        "ipv6 first fragment to a forbidden port",
        "victim_takes_tcp80_from_attacker",
        lambda lab, m: [_frag6(lab, m, 0, True, bytes(fr.tcp(22)) + m)],
        "policy",
        incomplete=True,
        match=lambda m: fr.ipv6_fragment_with(fr.ident32(m), 0),
    ),
    Case(
        "ipv6 orphan later fragment",
        "victim_takes_tcp80_from_attacker",
        lambda lab, m: [_frag6(lab, m, 3, False, m + b"." * 8)],
        "orphan_fragment",
        incomplete=True,
        match=lambda m: fr.ipv6_fragment_with(fr.ident32(m), 3),
    ),
    Case(
        "ipv6 first fragment whose TCP header is in the next fragment",
        "victim_takes_tcp80_from_attacker",
        lambda lab, m: [_frag6(lab, m, 0, True, bytes(IPv6ExtHdrDestOpt(nh=6)), next_header=60)],
        "malformed",
        incomplete=True,
        match=lambda m: fr.ipv6_fragment_with(fr.ident32(m), 0),
    ),
    # ---- tunnels: the outer protocol is what the policy judges, never the inner packet
    Case(
        "ipip carrying the bystander's packet",
        "victim_takes_tcp80_from_attacker",
        lambda lab, m: [
            fr.frame(lab, fr.ip4(lab) / IP(src=lab.bystander.ip, dst=lab.victim.ip) / fr.tcp(80) / Raw(m))
        ],
        "policy",
    ),
    Case(
        "gre carrying an allowed-looking packet",
        "victim_takes_tcp80_from_attacker",
        lambda lab, m: [fr.frame(lab, fr.ip4(lab) / GRE() / fr.ip4(lab) / fr.tcp(80) / Raw(m))],
        "policy",
    ),
    Case(
        "ipv6 in ipv4 (sit) carrying an allowed-looking packet",
        "victim_takes_tcp80_from_attacker",
        lambda lab, m: [fr.frame(lab, fr.ip4(lab) / fr.ip6(lab) / fr.tcp(80) / Raw(m))],
        "policy",
    ),
    Case(
        "ipv6 in ipv6 carrying an allowed-looking packet",
        "victim_takes_tcp80_from_attacker",
        lambda lab, m: [fr.frame(lab, fr.ip6(lab) / fr.ip6(lab) / fr.tcp(80) / Raw(m))],
        "policy",
    ),
    Case(
        "ipip to a pod whose egress is isolated",
        "attacker_egress_isolated",
        lambda lab, m: [fr.frame(lab, fr.ip4(lab) / fr.ip4(lab) / fr.udp(53) / Raw(m))],
        "policy",
    ),
    # ---- ICMP to a pod whose policy allows no ICMP
    Case(
        "icmp echo request",
        "victim_takes_tcp80_from_attacker",
        lambda lab, m: [fr.echo4(lab, m)],
        "policy",
    ),
    Case(
        "icmp timestamp request",
        "victim_takes_tcp80_from_attacker",
        lambda lab, m: [fr.frame(lab, fr.ip4(lab) / ICMP(type=13) / Raw(m))],
        "policy",
    ),
    Case(
        "unsolicited icmp echo reply",
        "victim_takes_tcp80_from_attacker",
        lambda lab, m: [fr.frame(lab, fr.ip4(lab) / ICMP(type=0, id=4242) / Raw(m))],
        "policy",
    ),
    Case(
        "icmp destination unreachable quoting no known flow",
        "victim_takes_tcp80_from_attacker",
        lambda lab, m: [
            fr.frame(
                lab,
                fr.ip4(lab)
                / ICMP(type=3, code=3)
                / IP(src=lab.victim.ip, dst="10.66.0.1")
                / fr.udp(9999)
                / Raw(m),
            )
        ],
    ),
    Case(
        "icmpv6 echo request",
        "victim_takes_tcp80_from_attacker",
        lambda lab, m: [fr.frame(lab, fr.ip6(lab) / ICMPv6EchoRequest(id=7) / Raw(m))],
        "policy",
    ),
    Case(
        "unsolicited icmpv6 echo reply",
        "victim_takes_tcp80_from_attacker",
        lambda lab, m: [fr.frame(lab, fr.ip6(lab) / ICMPv6EchoReply(id=4243) / Raw(m))],
        "policy",
    ),
    Case(
        "icmpv6 node information query",
        "victim_takes_tcp80_from_attacker",
        lambda lab, m: [fr.frame(lab, fr.ip6(lab) / ICMPv6NIQueryNOOP() / Raw(m))],
    ),
]

# ---- TCP without a SYN to an ingress-isolated pod, both families
for _name, _flags in fr.TCP_FLAGS.items():
    CASES.append(
        Case(
            f"tcp {_name} without a connection (ipv4)",
            "victim_isolated",
            (lambda flags: lambda lab, m: [fr.frame(lab, fr.ip4(lab) / fr.tcp(8080, flags) / Raw(m))])(
                _flags
            ),
            "policy",
        )
    )
    CASES.append(
        Case(
            f"tcp {_name} without a connection (ipv6)",
            "victim_isolated",
            (lambda flags: lambda lab, m: [fr.frame(lab, fr.ip6(lab) / fr.tcp(8080, flags) / Raw(m))])(
                _flags
            ),
            "policy",
        )
    )


def _chain(lab: Lab, headers: list, dport: int, mark: bytes) -> IPv6:  # type: ignore[type-arg]
    packet = fr.ip6(lab)
    for header in headers:
        packet = packet / header
    return packet / fr.tcp(dport) / Raw(mark)


def _frag6(lab: Lab, mark: bytes, offset: int, more: bool, body: bytes, next_header: int = 6) -> bytes:
    header = IPv6ExtHdrFragment(nh=next_header, offset=offset, m=int(more), id=fr.ident32(mark))
    return fr.frame(lab, IPv6(src=lab.attacker.ip6, dst=lab.victim.ip6) / header / Raw(body))


assert len({c.name for c in CASES}) == len(CASES)
assert all(c.policy in POLICIES for c in CASES)

# ---- the two phases -------------------------------------------------------------------------------

BY_POLICY = sorted(CASES, key=lambda c: c.policy)  # phase two reprograms once per policy


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("lab", COMBOS, indirect=True)
def test_delivered_without_podfence(lab: Lab, case: Case, unguarded_results: dict) -> None:  # type: ignore[type-arg]
    key = (lab.dataplane, lab.topology, case.name)
    lab.ensure_unguarded()
    unguarded_results[key] = False
    check_unguarded(lab, case)
    unguarded_results[key] = True


@pytest.mark.parametrize("case", BY_POLICY, ids=lambda c: c.name)
@pytest.mark.parametrize("lab", COMBOS, indirect=True)
def test_dropped_by_podfence(lab: Lab, case: Case, unguarded_results: dict) -> None:  # type: ignore[type-arg]
    key = (lab.dataplane, lab.topology, case.name)
    if key not in unguarded_results:  # run alone (-k): its unguarded run first
        lab.ensure_unguarded()
        check_unguarded(lab, case)
    assert unguarded_results.get(key, True), f"{case.name}: never delivered unguarded; proves nothing"
    lab.ensure_guarded(case.policy, POLICIES[case.policy])
    check_guarded(lab, case)
