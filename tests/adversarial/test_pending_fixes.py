"""The ways past the filters of issue 21, as real frames: fixed ones, and ones main does not
close yet.

Each case follows the protocol of every adversarial case (cases.run_twice: delivered unguarded,
then it must be dropped guarded). Where a case gets through today it is marked xfail(strict,
raises=GotThrough) on exactly those labs (`passes_on`): the suite stays green, and the mark turns
into a failure (XPASS) the day the fix lands, so that `passes_on` is emptied and the case becomes
an ordinary test. Elsewhere it is an ordinary test already: the filter holds and must keep
holding. Items 3-5 (layer 2) were fixed by the merge of h-l2 and run as ordinary tests.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6ND_NS,
    ICMPv6ND_RA,
    ICMPv6ND_Redirect,
    ICMPv6NDOptSrcLLAddr,
    IPv6,
)
from scapy.layers.l2 import ARP, Dot1AD, Dot1Q, Ether
from scapy.packet import Packet, Raw

from tests.adversarial import frames as fr
from tests.adversarial.cases import Case, Frames, run_twice
from tests.adversarial.harness import ATTACKER, BYSTANDER, COMBOS, Lab, Member

FLOW_SPORT, FLOW_DPORT = 5353, 7000  # the victim's tracked flow to the bystander
SEED_SPORT, SEED_DPORT = 6000, 7001  # the flow the attacker seeds towards the bystander
BCT = "fixed on main for the eBPF dataplane (merge of h-bpfct)"
# nf_conntrack takes an ICMP error from any source as related (a router on the path): the iptables
# dataplane drops a related error from a pod unless it quotes a packet sent to that pod (u32)
IPTABLES_RELATED = "iptables: a pod's related errors must quote a packet to the pod (u32 in PF-FROM)"
L2 = "fixed on main (merge of h-l2)"
L2_IPTABLES = "fixed on main for the iptables dataplane by ebtables rules (merge of h-ebt)"


@dataclass(frozen=True)
class Pending:
    case: Case
    item: str  # "issue 21 item N: what"
    passes_on: tuple[str, ...]  # labs where the frame gets through on main
    fixed_on: str = ""

    @property
    def topologies(self) -> tuple[str, ...]:
        return self.case.topologies

    @property
    def reason(self) -> str:
        return self.item + (f"; {self.fixed_on}" if self.fixed_on else "; not fixed yet")


def _send(lab: Lab, sender: Member, receiver: Member, l3: Packet) -> None:
    lab.sender(sender).send(fr.frame(lab, l3, sender, receiver))
    time.sleep(0.05)  # the flow state is written while the frame crosses the node


# ---- item 1: forged ICMP errors quoting a tracked flow -------------------------------------------


def _victim_flow(lab: Lab) -> None:
    """The victim opens a UDP flow to the bystander (its egress is open)."""
    v, b = lab.victim, lab.bystander
    _send(lab, v, b, IP(src=v.ip, dst=b.ip) / UDP(sport=FLOW_SPORT, dport=FLOW_DPORT) / Raw(b"flow"))
    _send(lab, v, b, IPv6(src=v.ip6, dst=b.ip6) / UDP(sport=FLOW_SPORT, dport=FLOW_DPORT) / Raw(b"flow"))


def _forged_error4(lab: Lab, mark: bytes) -> list[bytes]:
    v, b = lab.victim, lab.bystander
    quoted = IP(src=v.ip, dst=b.ip) / UDP(sport=FLOW_SPORT, dport=FLOW_DPORT)
    return [fr.frame(lab, fr.ip4(lab) / ICMP(type=3, code=3) / quoted / Raw(mark))]


def _forged_error6(lab: Lab, mark: bytes) -> list[bytes]:
    v, b = lab.victim, lab.bystander
    quoted = IPv6(src=v.ip6, dst=b.ip6) / UDP(sport=FLOW_SPORT, dport=FLOW_DPORT)
    return [fr.frame(lab, fr.ip6(lab) / ICMPv6DestUnreach(code=4) / quoted / Raw(mark))]


# ---- item 2: conntrack seeded by packets the kernel discards before the egress verdict ---------


def _seed(**ip_fields: Any) -> Callable[[Lab], None]:
    def setup(lab: Lab) -> None:
        a, b = lab.attacker, lab.bystander
        l3 = IP(src=a.ip, dst=b.ip, **ip_fields) / UDP(sport=SEED_SPORT, dport=SEED_DPORT) / Raw(b"seed")
        _send(lab, a, b, l3)

    return setup


def _seed6_hop_limit_1(lab: Lab) -> None:
    a, b = lab.attacker, lab.bystander
    _send(lab, a, b, IPv6(src=a.ip6, dst=b.ip6, hlim=1) / UDP(sport=SEED_SPORT, dport=SEED_DPORT))


def _seed_foreign_mac(lab: Lab) -> None:
    a, b = lab.attacker, lab.bystander
    l3 = IP(src=a.ip, dst=b.ip) / UDP(sport=SEED_SPORT, dport=SEED_DPORT) / Raw(b"seed")
    lab.sender(a).send(bytes(Ether(src=a.mac, dst="02:00:5e:00:99:99") / l3))
    time.sleep(0.05)


def _reply4(lab: Lab, mark: bytes) -> list[bytes]:
    """The bystander's "reply" to the seeded flow, to the attacker."""
    a, b = lab.attacker, lab.bystander
    l3 = IP(src=b.ip, dst=a.ip) / UDP(sport=SEED_DPORT, dport=SEED_SPORT) / Raw(mark)
    return [fr.frame(lab, l3, b, a)]


def _reply6(lab: Lab, mark: bytes) -> list[bytes]:
    a, b = lab.attacker, lab.bystander
    l3 = IPv6(src=b.ip6, dst=a.ip6) / UDP(sport=SEED_DPORT, dport=SEED_SPORT) / Raw(mark)
    return [fr.frame(lab, l3, b, a)]


# ---- items 3-5: layer 2 on a bridge ----------------------------------------------------------------


def _tagged(tag: Packet) -> Frames:
    def frames(lab: Lab, mark: bytes) -> list[bytes]:
        a, v = lab.attacker, lab.victim
        l3 = fr.ip4(lab) / fr.udp(53) / Raw(mark)
        return [bytes(Ether(src=a.mac, dst=v.mac) / tag / l3)]

    return frames


def _foreign_source_mac(lab: Lab, mark: bytes) -> list[bytes]:
    """The attacker's own addresses in a frame carrying the victim's MAC (the bridge learns it)."""
    b, v = lab.bystander, lab.victim
    return [bytes(Ether(src=v.mac, dst=b.mac) / fr.ip4(lab, dst=b.ip) / fr.udp(53) / Raw(mark))]


def _link_local(member: Member) -> str:
    return "fe80::" + ":".join(member.mac.replace(":", "")[i : i + 4] for i in (0, 4, 8))


def _ndp(kind: str) -> Frames:
    def frames(lab: Lab, mark: bytes) -> list[bytes]:
        a, v = lab.attacker, lab.victim
        src = _link_local(a)
        body: Packet
        if kind == "ra":  # a router advertisement to all nodes, hop limit 1 for the neighbours
            body = ICMPv6ND_RA(chlim=1) / ICMPv6NDOptSrcLLAddr(lladdr=a.mac) / Raw(mark)
            return [
                bytes(
                    Ether(src=a.mac, dst="33:33:00:00:00:01") / IPv6(src=src, dst="ff02::1", hlim=255) / body
                )
            ]
        if kind == "redirect":  # "reach the bystander through me"
            body = ICMPv6ND_Redirect(tgt=src, dst=lab.bystander.ip6) / Raw(mark)
            return [bytes(Ether(src=a.mac, dst=v.mac) / IPv6(src=src, dst=v.ip6, hlim=255) / body)]
        # a neighbour solicitation for the victim's address, carrying a payload
        body = ICMPv6ND_NS(tgt=v.ip6) / ICMPv6NDOptSrcLLAddr(lladdr=a.mac) / Raw(mark)
        return [bytes(Ether(src=a.mac, dst=v.mac) / IPv6(src=a.ip6, dst=v.ip6, hlim=255) / body)]

    return frames


def _arp_with_payload(lab: Lab, mark: bytes) -> list[bytes]:
    a, v = lab.attacker, lab.victim
    request = ARP(op=1, hwsrc=a.mac, psrc=a.ip, pdst=v.ip)
    return [bytes(Ether(src=a.mac, dst=v.mac) / request / Raw(mark * 4))]


# ---- source routes through the node -----------------------------------------------------------------


def _lsrr(dport: int) -> Frames:
    from scapy.layers.inet import IPOption_LSRR

    def frames(lab: Lab, mark: bytes) -> list[bytes]:
        options = [IPOption_LSRR(routers=[lab.victim.ip])]
        l3 = fr.ip4(lab, dst=str(lab.node_ips[0]), options=options) / fr.tcp(dport) / Raw(mark)
        return [fr.frame(lab, l3, to_node=True)]

    return frames


def _forbidden_via_gateway(lab: Lab, mark: bytes) -> list[bytes]:
    """Routed into the bridge by the node (the attacker sends to the gateway's MAC)."""
    return [fr.frame(lab, fr.ip4(lab) / fr.tcp(22) / Raw(mark), to_node=True)]


PENDING = [
    Pending(
        Case(
            "forged icmp error quoting the victim's flow",
            "victim_isolated",
            _forged_error4,
            setup=_victim_flow,
        ),
        "issue 21 item 1: an ICMP error from a pod that is no hop of the quoted flow is admitted as related",
        passes_on=(),
        fixed_on=f"{BCT}; {IPTABLES_RELATED}",
    ),
    Pending(
        Case(
            "forged icmpv6 error quoting the victim's flow",
            "victim_isolated",
            _forged_error6,
            setup=_victim_flow,
        ),
        "issue 21 item 1: an ICMPv6 error from a pod that is no hop of the quoted flow is admitted"
        " as related",
        passes_on=(),
        fixed_on=f"{BCT}; {IPTABLES_RELATED}",
    ),
    Pending(
        Case(
            "reply to a flow seeded with ttl 1",
            "attacker_isolated",
            _reply4,
            setup=_seed(ttl=1),
            sender=BYSTANDER,
            receiver=ATTACKER,
            topologies=("routed",),
        ),
        "issue 21 item 2: a TTL-1 packet the node discards before the egress verdict seeds a flow",
        passes_on=(),
        fixed_on=BCT,
    ),
    Pending(
        Case(
            "reply to a flow seeded with hop limit 1",
            "attacker_isolated",
            _reply6,
            setup=_seed6_hop_limit_1,
            sender=BYSTANDER,
            receiver=ATTACKER,
            topologies=("routed",),
        ),
        "issue 21 item 2: a hop-limit-1 packet the node discards before the egress verdict seeds a flow",
        passes_on=(),
        fixed_on=BCT,
    ),
    Pending(
        Case(
            "reply to a flow seeded with a bad ip checksum",
            "attacker_isolated",
            _reply4,
            setup=_seed(chksum=0x1234),
            sender=BYSTANDER,
            receiver=ATTACKER,
        ),
        "issue 21 item 2: a packet with a bad IP checksum, discarded before the egress verdict, seeds a flow",
        passes_on=(),
        fixed_on=BCT,
    ),
    Pending(
        Case(
            "reply to a flow seeded to a foreign destination mac",
            "attacker_isolated",
            _reply4,
            setup=_seed_foreign_mac,
            sender=BYSTANDER,
            receiver=ATTACKER,
            topologies=("routed",),
        ),
        "issue 21 item 2: a frame to another MAC, discarded before the egress verdict, seeds a flow",
        passes_on=(),
        fixed_on=BCT,
    ),
    Pending(
        Case(
            "802.1q vlan 0 tagged frame",
            "attacker_egress_isolated",
            _tagged(Dot1Q(vlan=0)),
            topologies=("bridged",),
        ),
        "issue 21 item 3: a VLAN-tagged frame is bridged without the egress verdict",
        passes_on=(),
        fixed_on=L2,
    ),
    Pending(
        Case(
            "802.1q vlan 5 tagged frame",
            "attacker_egress_isolated",
            _tagged(Dot1Q(vlan=5)),
            topologies=("bridged",),
        ),
        "issue 21 item 3: a VLAN-tagged frame is bridged without the egress verdict",
        passes_on=(),
        fixed_on=L2,
    ),
    Pending(
        Case(
            "802.1ad double tagged frame",
            "attacker_egress_isolated",
            _tagged(Dot1AD(vlan=7) / Dot1Q(vlan=5)),
            topologies=("bridged",),
        ),
        # bpf: the kernel moves the outer tag into metadata, the inner one is left for tc to see
        "issue 21 item 3: an 802.1ad (QinQ) frame is bridged without the egress verdict: iptables "
        "judges 802.1Q-tagged frames (bridge-nf-filter-vlan-tagged) but br_netfilter has no such "
        "switch for 802.1ad",
        passes_on=(),
        fixed_on=f"{L2}; {L2_IPTABLES}",
    ),
    Pending(
        Case(
            "frame with the victim's source mac",
            "everyone_open",
            _foreign_source_mac,
            receiver=BYSTANDER,
            topologies=("bridged",),
        ),
        "issue 21 item 4: the source MAC of a pod's frames is not checked",
        passes_on=(),
        fixed_on=f"{L2}; {L2_IPTABLES}",
    ),
    Pending(
        Case("router advertisement from a pod", "everyone_isolated", _ndp("ra"), topologies=("bridged",)),
        "issue 21 item 5: router advertisements from pods pass as neighbour discovery",
        passes_on=(),
        fixed_on=L2,
    ),
    Pending(
        Case("redirect from a pod", "everyone_isolated", _ndp("redirect"), topologies=("bridged",)),
        # iptables admits types 133-136 only
        "issue 21 item 5: redirects from pods pass as neighbour discovery",
        passes_on=(),
        fixed_on=L2,
    ),
    Pending(
        Case(
            "neighbour solicitation carrying a payload",
            "everyone_isolated",
            _ndp("ns"),
            topologies=("bridged",),
        ),
        "issue 21 item 5: neighbour discovery carries payload between isolated pods",
        passes_on=(),
        fixed_on=L2,
    ),
    Pending(
        Case(
            "arp request with trailing payload",
            "everyone_isolated",
            _arp_with_payload,
            topologies=("bridged",),
        ),
        "issue 21 item 5: ARP with trailing bytes carries payload between isolated pods",
        passes_on=(),
        fixed_on=f"{L2}; iptables: nft's ARP guard marks it, the port's ebtables chain drops it",
    ),
    Pending(
        Case(
            "loose source route through the node to a forbidden port",
            "victim_takes_tcp80_from_attacker",
            _lsrr(22),
        ),
        "found by this tier: a source-routed packet is judged at FORWARD with the node's address as its "
        "destination (the kernel rewrites it after the hook); the iptables dispatch to the victim's "
        "ingress chain on a bridge matches the destination address and misses it",
        passes_on=(),
        fixed_on="IPv4 options from pods are dropped (ip_options)",
    ),
    Pending(
        Case(
            "loose source route past an egress that allows only the node",
            "attacker_reaches_only_the_node",
            _lsrr(80),
        ),
        "found by this tier: a source-routed packet is judged at FORWARD with the node's address as its "
        "destination (the kernel rewrites it after the hook), so an egress policy allowing the node "
        "lets a pod reach every pod through it",
        passes_on=(),
        fixed_on="IPv4 options from pods are dropped (ip_options)",
    ),
    Pending(
        Case(
            "routed into the bridge while the victim's mac is not learnt (flooded)",
            "victim_takes_tcp80_from_attacker",
            _forbidden_via_gateway,
            setup=Lab.forget_macs,
            topologies=("bridged",),
        ),
        "found by this tier: a flooded frame meets the attacker's own port first, whose open ingress "
        "admits the flow in pf_ct; the copy at the victim's port then passes as that flow's",
        passes_on=(),
        fixed_on="a flow's admission is bound to the admitting pod's counter slot",
    ),
]


@pytest.mark.parametrize("pending", PENDING, ids=lambda p: p.case.name)
@pytest.mark.parametrize("lab", COMBOS, indirect=True)
def test_pending(lab: Lab, pending: Pending) -> None:
    """xfail(strict, raises=GotThrough) where `passes_on` names the lab (see conftest.py)."""
    run_twice(lab, pending.case)
