"""Hostile pods against the BPF conntrack, through BPF_PROG_TEST_RUN (issue 21, items 1 and 2).

- A packet tc_from_pod passes but the kernel drops before the egress hook (TTL 1, a bad checksum,
  a foreign MAC: here simply never run through "egress") must open no reply path.
- A Service (DNAT) reply passes only once the egress verdict admitted the DNATed packet, and a
  packet to another destination on the same port in between is never taken for it.
- An ICMP error passes as related only back to the sender of a packet that was admitted, from
  that packet's destination or a router (a pod is none).

The hooks of one packet run on one CPU in the kernel, and the notes of tc_from_pod are kept per
CPU: the test pins itself to one CPU so that its "from_pod" and "egress" runs share one.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Iterator

import pytest

from agent.dataplane.bpf.dataplane import BpfDataplane
from tests.privileged import bpf_frames as f
from tests.privileged.test_bpf_packets import (
    NODE,
    PEER7,
    PEER7_6,
    PEER8,
    POD,
    POD6,
    apply,
    ident,
    iso,
    started_plane,
    verdict,
)

pytestmark = pytest.mark.needs("bpffs")

SERVICE = "10.96.0.10"  # a ClusterIP: the pod sends to it, the egress hook sees the backend
ROUTER, ROUTER6 = "192.0.2.99", "2001:db8::99"  # no pod's address: may report on flows it routes
EXPECT_SECONDS = 0.1  # PF_CT_EXPECT_NS


@pytest.fixture(scope="module")
def plane() -> Iterator[BpfDataplane]:
    cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cpus)})
    try:
        yield from started_plane("keep")
    finally:
        os.sched_setaffinity(0, cpus)


def tcp(src: str, dst: str, sport: int, dport: int, flags: int = 0x02) -> bytes:
    return f.packet4(src, dst, f.TCP, sport=sport, dport=dport, tcp_flags=flags)


def icmp6_error(src: str, dst: str, embedded: bytes) -> bytes:
    """ICMPv6 destination unreachable (port) quoting an IPv6 packet (header + 8 bytes)."""
    body = struct.pack("!BBHI", 1, 4, 0, 0) + embedded[: 40 + 8]
    return f.eth(f.ETH_IP6, f.ipv6(src, dst, f.ICMP6, body))


def test_a_packet_that_never_met_the_egress_verdict_opens_no_reply_path(plane: BpfDataplane) -> None:
    apply(plane, iso(), iso())  # isolated both ways: nothing in, nothing out
    cases = [
        (tcp(POD, PEER7, 47000, 80), tcp(PEER7, POD, 80, 47000, flags=0x12)),
        (
            f.packet4(POD, PEER7, f.UDP, sport=47001, dport=53),
            f.packet4(PEER7, POD, f.UDP, sport=53, dport=47001),
        ),
        (
            f.packet4(POD, PEER8, f.ICMP, icmp_type=8, icmp_id=4700),
            f.packet4(PEER8, POD, f.ICMP, icmp_type=0, icmp_id=4700),
        ),
        (
            f.eth(f.ETH_IP6, f.ipv6(POD6, PEER7_6, f.UDP, f.l4(f.UDP, 47002, 53))),
            f.eth(f.ETH_IP6, f.ipv6(PEER7_6, POD6, f.UDP, f.l4(f.UDP, 53, 47002))),
        ),
    ]
    for sent, answer in cases:
        # tc ingress passes it (its verdict is the egress hook's); the kernel then drops it
        # before the hook (TTL 1, bad checksum, foreign MAC...): "egress" never runs
        assert verdict(plane, "from_pod", sent)
        assert not verdict(plane, "to_pod", answer), f"a reply to an unjudged packet: {answer.hex()}"
        # nor does an error quoting it pass as related
        quoted = f.strip_eth(sent)
        v4 = quoted[0] >> 4 == 4
        error = f.icmp4_error(ROUTER, POD, quoted) if v4 else icmp6_error(ROUTER6, POD6, quoted)
        assert not verdict(plane, "to_pod", error)
    # the same packets, judged and denied by the egress verdict, open nothing either
    for sent, answer in cases:
        assert verdict(plane, "from_pod", sent)
        assert not verdict(plane, "egress", sent)
        assert not verdict(plane, "to_pod", answer)


def test_a_service_reply_passes_once_the_egress_verdict_admitted_the_dnat_packet(plane: BpfDataplane) -> None:
    apply(plane, iso(), iso(ident(7, f.TCP, 8080, 8080)), version=2)  # the backend PEER7:8080 only
    syn, dnat = tcp(POD, SERVICE, 47100, 80), tcp(POD, PEER7, 47100, 8080)
    syn_ack = tcp(SERVICE, POD, 80, 47100, flags=0x12)  # conntrack reversed the DNAT
    assert verdict(plane, "from_pod", syn)
    assert not verdict(plane, "to_pod", syn_ack)  # noted, not admitted
    assert verdict(plane, "egress", dnat)
    assert verdict(plane, "to_pod", syn_ack)
    assert verdict(plane, "to_pod", tcp(SERVICE, POD, 80, 47100, flags=0x10))
    # the Service's errors come back from the ClusterIP too, quoting the packet as sent
    assert verdict(plane, "to_pod", f.icmp4_error(SERVICE, POD, f.strip_eth(syn)))

    # a backend the egress policy denies: no reply path through the Service
    syn, dnat = tcp(POD, SERVICE, 47101, 80), tcp(POD, PEER8, 47101, 8080)
    assert verdict(plane, "from_pod", syn)
    assert not verdict(plane, "egress", dnat)
    assert not verdict(plane, "to_pod", tcp(SERVICE, POD, 80, 47101, flags=0x12))


def test_a_packet_to_another_destination_on_the_same_port_is_never_taken_for_the_service(
    plane: BpfDataplane,
) -> None:
    """With list receive, tc ingress runs for a batch before the hook runs for any of it: a
    packet the kernel drops before the hook, sent from the Service connection's port to another
    destination, must not have its destination admitted when the Service packet is."""
    apply(plane, iso(), iso(ident(7, f.TCP, 8080, 8080)), version=3)
    syn, dnat = tcp(POD, SERVICE, 47200, 80), tcp(POD, PEER7, 47200, 8080)
    forged = tcp(POD, PEER8, 47200, 9999)  # TTL 1: tc passes it, the kernel drops it
    syn_ack = tcp(SERVICE, POD, 80, 47200, flags=0x12)
    for first, second in ((syn, forged), (forged, syn)):
        assert verdict(plane, "from_pod", first) and verdict(plane, "from_pod", second)
        assert verdict(plane, "egress", dnat)  # the backend is allowed
        assert not verdict(plane, "to_pod", tcp(PEER8, POD, 9999, 47200, flags=0x12))
        assert not verdict(plane, "to_pod", syn_ack)  # which one it was is not known: fail closed
        time.sleep(EXPECT_SECONDS * 1.5)  # the ambiguity lasts PF_CT_EXPECT_NS
    # alone, the retransmitted SYN is judged again and its Service reply passes
    assert verdict(plane, "from_pod", syn)
    assert verdict(plane, "egress", dnat)
    assert verdict(plane, "to_pod", syn_ack)
    assert not verdict(plane, "to_pod", tcp(PEER8, POD, 9999, 47200, flags=0x12))


def test_icmp_errors_pass_only_back_to_the_sender_of_an_admitted_packet(plane: BpfDataplane) -> None:
    # PEER8's identity is named by a policy here (SCTP only: it opens nothing tested below), so
    # the node knows PEER8 is a pod
    ingress = iso(ident(7, f.UDP, 53, 53), ident(8, f.SCTP, 1, 1))
    apply(plane, ingress, iso(ident(7, f.TCP, 80, 80)), version=4)
    request = tcp(POD, PEER7, 47300, 80)
    assert verdict(plane, "from_pod", request) and verdict(plane, "egress", request)
    quoted = f.strip_eth(request)
    assert verdict(plane, "to_pod", f.icmp4_error(PEER7, POD, quoted))  # from the destination
    assert verdict(plane, "to_pod", f.icmp4_error(ROUTER, POD, quoted))  # from a router on the path
    assert verdict(plane, "to_pod", f.icmp4_error(NODE, POD, quoted))  # the node routes too
    # a pod is no router: PEER8 (a pod this node knows) cannot claim to report on the flow
    assert not verdict(plane, "to_pod", f.icmp4_error(PEER8, POD, quoted))
    # an error must go back to the quoted packet's sender: not one quoting the peer's packet
    assert not verdict(plane, "to_pod", f.icmp4_error(PEER7, POD, f.strip_eth(tcp(PEER7, POD, 80, 47300))))
    # nor about a packet the pod sent that its egress denied
    denied = tcp(POD, PEER7, 47301, 81)
    assert verdict(plane, "from_pod", denied) and not verdict(plane, "egress", denied)
    assert not verdict(plane, "to_pod", f.icmp4_error(PEER7, POD, f.strip_eth(denied)))

    # from the pod: its error about a datagram its ingress admitted goes back to the sender only
    inbound = f.packet4(PEER7, POD, f.UDP, sport=47302, dport=53)
    assert verdict(plane, "to_pod", inbound)
    assert verdict(plane, "egress", f.icmp4_error(POD, PEER7, f.strip_eth(inbound)))
    assert not verdict(plane, "egress", f.icmp4_error(POD, PEER8, f.strip_eth(inbound)))
    refused = f.packet4(PEER8, POD, f.UDP, sport=47303, dport=53)  # ingress denies PEER8
    assert not verdict(plane, "to_pod", refused)
    assert not verdict(plane, "egress", f.icmp4_error(POD, PEER8, f.strip_eth(refused)))

    # the same for IPv6
    request6 = f.eth(f.ETH_IP6, f.ipv6(POD6, PEER7_6, f.TCP, f.l4(f.TCP, 47304, 80)))
    assert verdict(plane, "from_pod", request6) and verdict(plane, "egress", request6)
    quoted6 = f.strip_eth(request6)
    assert verdict(plane, "to_pod", icmp6_error(PEER7_6, POD6, quoted6))
    assert verdict(plane, "to_pod", icmp6_error(ROUTER6, POD6, quoted6))
    reverse6 = f.strip_eth(f.eth(f.ETH_IP6, f.ipv6(PEER7_6, POD6, f.TCP, f.l4(f.TCP, 80, 47304))))
    assert not verdict(plane, "to_pod", icmp6_error(PEER7_6, POD6, reverse6))


def test_a_retransmitted_syn_promotes_what_its_first_copy_could_not(plane: BpfDataplane) -> None:
    """Without its note (taken to another CPU by a queue, or evicted), a Service SYN is admitted on
    its post-DNAT tuple only; its retransmit, on the egress fast path, promotes it."""
    apply(plane, iso(), iso(ident(7, f.TCP, 8080, 8080)), version=5)
    syn, dnat = tcp(POD, SERVICE, 47400, 80), tcp(POD, PEER7, 47400, 8080)
    syn_ack = tcp(SERVICE, POD, 80, 47400, flags=0x12)
    assert verdict(plane, "from_pod", syn)
    plane._module[b"pf_ct_expect"].clear()
    assert verdict(plane, "egress", dnat)
    assert not verdict(plane, "to_pod", syn_ack)
    assert verdict(plane, "from_pod", syn) and verdict(plane, "egress", dnat)  # the retransmit
    assert verdict(plane, "to_pod", syn_ack)
