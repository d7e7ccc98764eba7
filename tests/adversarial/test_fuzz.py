"""Differential fuzzing with real traffic: random policies, random hostile frames, the real kernel.

The BPF_PROG_TEST_RUN counterpart is tests/privileged/test_bpf_fuzz.py; this one sends the frames
through the labs of this tier (both dataplanes, routed and bridged), so that everything between
the pod and its peer takes part: the tc programs, the netfilter hooks or the iptables rules,
br_netfilter, the kernel's own forwarding and defragmentation.

Per example, hypothesis draws a policy for the three pods (isolated or not per direction; allows
of a pod's identity or a CIDR, any protocol, TCP, UDP or SCTP, ports and ranges), a sending pod
and up to eight frames from it: either family, TCP (any flags), UDP, SCTP, ICMP echo and errors,
other protocols, IPv4 options, IPv6 extension chains, whole or cut in two fragments, or a later
fragment alone, sometimes from a spoofed source, to a pod directly or routed through the node.
Conntrack is emptied first; every frame has its own source port or ICMP id and one pod sends
them all, so no frame is the reply of another. The oracle (test_bpf_fuzz's reading of
agent/dataplane/types.py) says what may pass; a frame that arrives where the oracle forbids it
fails the example. The check is one-sided: a dataplane may drop more (iptables drops a TCP
segment that opens nothing; defragmentation holds an orphan fragment).

Not drawn, because they pass today and are tested in test_pending_fixes.py: source routes,
VLAN tags, foreign MACs, neighbour discovery, flows seeded by discarded packets.

The bounded run (make test) is derandomized with a fixed number of examples per lab;
PODFENCE_FUZZ_EXAMPLES=N (make fuzz) runs N random examples per lab instead.
"""

from __future__ import annotations

import ipaddress
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6EchoRequest,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)
from scapy.layers.sctp import SCTP, SCTPChunkInit
from scapy.packet import Packet, Raw

from agent.dataplane.types import Allow, CidrPeer, DirectionPolicy, IdentityPeer, IPAddress, NodeState
from tests.adversarial import frames as fr
from tests.adversarial.harness import COMBOS, DROP_WAIT_S, Lab, Member, marker
from tests.privileged.test_bpf_fuzz import direction_admits

EXAMPLES = int(os.environ.get("PODFENCE_FUZZ_EXAMPLES", "0"))
FUZZ = settings(
    max_examples=EXAMPLES or 12,
    derandomize=not EXAMPLES,  # the bounded run tries the same examples every time
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

PORTS = (53, 80, 443, 8080, 9)  # destination ports; source ports are 41000 + the frame's index
PROTOCOLS = (0, 6, 17, 132)  # allows: any, TCP, UDP, SCTP
TCP_FLAG_SETS = ("S", "S", "SA", "A", "PA", "FA", "R", "", "FPU", "SF")
OTHER_PROTOCOLS = (4, 41, 47, 50, 103, 253)
V4_OPTIONS = (
    b"\x01\x01\x01\x01",  # NOPs
    b"\x94\x04\x00\x00",  # router alert
    b"\x07\x0b\x04" + bytes(8) + b"\x01",  # record route
    b"\x01\x01\x00\x50",  # NOP NOP EOL, then a byte that reads as port 80 past a fixed header
)
UNOWNED = ("10.77.0.9", "fd00:77::9")


# ---- policies -----------------------------------------------------------------------------------


@st.composite
def cidrs(draw: st.DrawFn, lab: Lab) -> CidrPeer:
    member = draw(st.sampled_from(lab.members))
    family = draw(st.sampled_from((4, 6)))
    address = member.ip if family == 4 else member.ip6
    width = 32 if family == 4 else 128
    length = draw(st.sampled_from((0, width - 8, width - 1, width)))
    network = ipaddress.ip_network(f"{address}/{length}", strict=False)
    excepts: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    if length < width and draw(st.booleans()):
        excepts = (ipaddress.ip_network(f"{address}/{width}"),)
    return CidrPeer(network, excepts)


@st.composite
def allows(draw: st.DrawFn, lab: Lab) -> Allow:
    peer = draw(st.one_of(st.integers(1, 3).map(IdentityPeer), cidrs(lab)))
    protocol = draw(st.sampled_from(PROTOCOLS))
    first = draw(st.sampled_from((0, *PORTS)))
    last = draw(st.sampled_from((first, 65535, min(first + 1000, 65535))))
    return Allow(peer, protocol, first, last)


@st.composite
def policies(draw: st.DrawFn, lab: Lab) -> NodeState:
    def direction() -> DirectionPolicy:
        return DirectionPolicy(draw(st.booleans()), tuple(draw(st.lists(allows(lab), max_size=3))))

    count = len(lab.members)
    return lab.state(
        ingress={i: direction() for i in range(count)}, egress={i: direction() for i in range(count)}
    )


# ---- frames -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Datagram:
    receiver: int
    family: int
    kind: str  # tcp, udp, sctp, echo, error, other
    dport: int
    flags: str = "S"
    protocol: int = 0  # for "other"
    spoof: str = ""  # "", "pod" (another pod's address) or "unowned"
    cut: str = "whole"  # whole, split (first + later), later (a later fragment alone)
    options: bytes = b""
    extensions: tuple[str, ...] = ()
    via_node: bool = False  # bridged: to the gateway's MAC, routed into the bridge by the node

    @property
    def ip_protocol(self) -> int:
        icmp = 1 if self.family == 4 else 58
        return {"tcp": 6, "udp": 17, "sctp": 132, "echo": icmp, "error": icmp}.get(self.kind, self.protocol)

    @property
    def judged_port(self) -> int:
        return self.dport if self.kind in ("tcp", "udp", "sctp") else 0


@st.composite
def datagrams(draw: st.DrawFn, sender: int) -> Datagram:
    family = draw(st.sampled_from((4, 6)))
    kind = draw(st.sampled_from(("tcp", "tcp", "udp", "udp", "sctp", "echo", "error", "other")))
    return Datagram(
        receiver=draw(st.sampled_from([i for i in range(3) if i != sender])),
        family=family,
        kind=kind,
        dport=draw(st.sampled_from(PORTS)),
        flags=draw(st.sampled_from(TCP_FLAG_SETS)),
        protocol=draw(st.sampled_from(OTHER_PROTOCOLS)),
        spoof=draw(st.sampled_from(("", "", "", "", "pod", "unowned"))),
        cut=draw(st.sampled_from(("whole", "whole", "whole", "split", "later"))),
        options=draw(st.sampled_from((b"", b"", *V4_OPTIONS))) if family == 4 else b"",
        extensions=tuple(draw(st.lists(st.sampled_from(("hbh", "dst", "rt", "frag")), max_size=3)))
        if family == 6
        else (),
        via_node=draw(st.booleans()),
    )


def addresses(member: Member, family: int) -> str:
    return member.ip if family == 4 else member.ip6


def l4_of(datagram: Datagram, index: int, payload: bytes, source: str, destination: str) -> bytes:
    sport = 41000 + index
    if datagram.kind == "tcp":
        layer: Packet = TCP(sport=sport, dport=datagram.dport, flags=datagram.flags, seq=7, ack=1)
    elif datagram.kind == "udp":
        layer = UDP(sport=sport, dport=datagram.dport)
    elif datagram.kind == "sctp":
        layer = SCTP(sport=sport, dport=datagram.dport) / SCTPChunkInit(init_tag=sport)
    elif datagram.kind == "echo":
        layer = ICMP(type=8, id=sport) if datagram.family == 4 else ICMPv6EchoRequest(id=sport)
    elif datagram.kind == "error":  # quoting a flow nobody has
        if datagram.family == 4:
            layer = ICMP(type=3, code=3) / IP(src=destination, dst="10.66.0.1") / UDP(sport=9, dport=sport)
        else:
            layer = (
                ICMPv6DestUnreach(code=4)
                / IPv6(src=destination, dst="fd00:66::1")
                / UDP(sport=9, dport=sport)
            )
    else:
        layer = Raw(bytes(8))
    outer = IP(src=source, dst=destination, proto=datagram.ip_protocol) if datagram.family == 4 else None
    if outer is not None:
        return bytes(outer / layer / Raw(payload))[20:]
    return bytes(IPv6(src=source, dst=destination, nh=datagram.ip_protocol) / layer / Raw(payload))[40:]


def build(lab: Lab, sender: Member, datagram: Datagram, index: int) -> list[tuple[bytes, bytes]]:
    """[(frame, its marker)] for one datagram: one frame, or two fragments with a marker each."""
    receiver = lab.members[datagram.receiver]
    family = datagram.family
    source = addresses(sender, family)
    if datagram.spoof == "pod":
        source = addresses(next(m for m in lab.members if m not in (sender, receiver)), family)
    elif datagram.spoof == "unowned":
        source = UNOWNED[0] if family == 4 else UNOWNED[1]
    destination = addresses(receiver, family)
    first_mark, later_mark = marker(), marker()
    l4 = l4_of(datagram, index, first_mark + bytes(16) + later_mark + bytes(5), source, destination)
    ident = 0x1000 + index

    def on_wire(l3: Packet) -> bytes:
        return fr.frame(lab, l3, sender, receiver, to_node=datagram.via_node and lab.topology == "bridged")

    def ip_header(**kw: Any) -> Packet:
        if family == 4:
            options = [IPOption(datagram.options)] if datagram.options else []
            return IP(
                src=source, dst=destination, proto=datagram.ip_protocol, id=ident, options=options, **kw
            )
        makers: dict[str, Callable[[], Packet]] = {
            "hbh": IPv6ExtHdrHopByHop,
            "dst": IPv6ExtHdrDestOpt,
            "rt": lambda: IPv6ExtHdrRouting(type=4, segleft=0),  # segment routing, none left
            "frag": lambda: IPv6ExtHdrFragment(id=ident),  # atomic: a whole datagram
        }
        header: Packet = IPv6(src=source, dst=destination)
        for name in datagram.extensions:
            header = header / makers[name]()
        return header

    if datagram.cut == "whole":
        return [(on_wire(ip_header() / Raw(l4)), first_mark)]
    cut = (l4.index(first_mark) + len(first_mark) + 7) // 8 * 8  # the first fragment holds one marker
    if family == 4:
        first = ip_header(flags="MF", frag=0) / Raw(l4[:cut])
        later = ip_header(frag=cut // 8) / Raw(l4[cut:])
    else:
        first = (
            ip_header() / IPv6ExtHdrFragment(nh=datagram.ip_protocol, offset=0, m=1, id=ident) / Raw(l4[:cut])
        )
        later = (
            ip_header()
            / IPv6ExtHdrFragment(nh=datagram.ip_protocol, offset=cut // 8, id=ident)
            / Raw(l4[cut:])
        )
    if datagram.cut == "later":
        return [(on_wire(later), later_mark)]
    return [(on_wire(first), first_mark), (on_wire(later), later_mark)]


# ---- the oracle -----------------------------------------------------------------------------------


def may_pass(state: NodeState, lab: Lab, sender: int, datagram: Datagram) -> bool:
    """May the frames of `datagram` from pod `sender` arrive, by the allow lists and the
    anti-spoofing promise? Whole datagrams and both fragments of a split one share the verdict
    of their tuple; a later fragment alone has no tuple, so it may pass only where neither side
    is isolated."""
    if datagram.spoof:
        return False
    source_endpoint = state.endpoints[f"adv/pod{sender}"]
    target_endpoint = state.endpoints[f"adv/pod{datagram.receiver}"]
    if datagram.cut == "later":
        return not source_endpoint.egress.isolated and not target_endpoint.ingress.isolated
    family = datagram.family
    source: IPAddress = ipaddress.ip_address(addresses(lab.members[sender], family))
    destination: IPAddress = ipaddress.ip_address(addresses(lab.members[datagram.receiver], family))
    protocol, port = datagram.ip_protocol, datagram.judged_port
    return direction_admits(source_endpoint.egress, destination, protocol, port, state) and direction_admits(
        target_endpoint.ingress, source, protocol, port, state
    )


def arrivals(lab: Lab, sent: list[tuple[int, bytes]], wait: float) -> set[bytes]:
    """Markers seen by each receiver's sniffer within `wait` after the last frame."""
    deadline = time.monotonic() + wait
    seen: set[bytes] = set()
    for receiver in {r for r, _ in sent}:
        expected = {m for r, m in sent if r == receiver}
        sniffer = lab.sniffer(lab.members[receiver])

        def record(frame: bytes, expected: set[bytes] = expected) -> bool:
            found = {m for m in expected if m in frame}
            seen.update(found)
            return not expected - seen  # stop once every marker of this receiver is in

        if not expected - seen:
            continue
        sniffer.wait_for(record, max(0.0, deadline - time.monotonic()))
    return seen


@pytest.mark.parametrize("lab", COMBOS, indirect=True)
@FUZZ
@given(data=st.data())
def test_no_frame_arrives_that_the_allow_lists_deny(lab: Lab, data: st.DataObject) -> None:
    state = data.draw(policies(lab), label="policy")
    sender = data.draw(st.integers(0, 2), label="sender")
    datagrams_ = data.draw(st.lists(datagrams(sender), min_size=1, max_size=8), label="frames")
    lab.guard(state, "fuzz")
    for member in lab.members:
        lab.sniffer(member).drain()
    out = lab.sender(lab.members[sender])
    sent: list[tuple[int, bytes]] = []
    verdicts: dict[bytes, tuple[Datagram, bool]] = {}
    for index, datagram in enumerate(datagrams_):
        allowed = may_pass(state, lab, sender, datagram)
        for frame, mark in build(lab, lab.members[sender], datagram, index):
            out.send(frame)
            sent.append((datagram.receiver, mark))
            verdicts[mark] = (datagram, allowed)
    arrived = arrivals(lab, sent, DROP_WAIT_S + 0.1)
    wrong = [verdicts[m][0] for m in arrived if not verdicts[m][1]]
    assert not wrong, f"{lab.dataplane}-{lab.topology}: arrived although the allow lists deny: {wrong}"
    # and the other way, where every dataplane must agree (so that a blind sniffer cannot pass):
    # a whole, plain UDP datagram or TCP SYN the allow lists admit arrives
    lost = [d for m, (d, allowed) in verdicts.items() if allowed and plain(d) and m not in arrived]
    assert not lost, f"{lab.dataplane}-{lab.topology}: allowed but never arrived: {lost}"


def plain(datagram: Datagram) -> bool:
    return (
        datagram.cut == "whole"
        and not datagram.options
        and not datagram.extensions
        and (datagram.kind == "udp" or (datagram.kind == "tcp" and datagram.flags == "S"))
    )
