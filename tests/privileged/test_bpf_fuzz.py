"""Property tests of the compiled datapath: random policies and hostile packets through
BPF_PROG_TEST_RUN, judged against an oracle written from the allow-list semantics.

Differential: hypothesis draws a small NodeState (endpoints isolated or not per direction, allows
of identity and CIDR peers with excepts, protocols any/TCP/UDP/SCTP, port ranges, both families)
and well-formed first packets. BpfDataplane.apply programs the maps exactly as the agent does;
each packet runs through the program of the hook that judges it, and its verdict must equal
`oracle_*` below, which reads agent/dataplane/types.py's meaning (never the compiler's output).
Conntrack and fragment maps are emptied before every packet, so each one is a first packet.
The egress verdict is drawn from either egress program (the netfilter-link one and the xt_bpf
one), so both must answer the oracle. The same differential runs against the
established_on_change="reset" build too, where a TCP packet that no flow knows must be a bare SYN.

Hostile: one endpoint isolated both ways with a narrow allow list. Mutated frames (truncated at
every length, random header bytes, any IHL, long IPv6 extension chains, fragments out of order,
spoofed sources) never pass unless the oracle admits the tuple the frame claims, as read by
`claim()`, an independent parser of the RFC 791/8200 layouts. A frame that parser finds malformed
is dropped, and counted under the reason (dataplane.types.Reason) the datapath documents. The two egress
programs give every hostile frame the same verdict.

The endpoints sit behind veths in a private "pfb-" netns. A test run names the host-side ifindex
in the skb context, and the kernel resolves it in the caller's network namespace, so each run is
made from the test thread moved into that netns for the call (setns is per thread).
"""

from __future__ import annotations

import errno
import ipaddress
import secrets
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.dataplane.bpf import loader
from agent.dataplane.bpf.dataplane import BpfDataplane
from agent.dataplane.bpf.settings import BpfSettings
from agent.dataplane.bpf.testrun import NF_ACCEPT, TC_ACT_OK, TC_ACT_SHOT, run_netfilter_program, run_program
from agent.dataplane.netns import inside
from agent.dataplane.types import (
    PROTO_ANY,
    Allow,
    CidrPeer,
    DirectionPolicy,
    Endpoint,
    IdentityPeer,
    IPAddress,
    NodeState,
    Peer,
    Reason,
)
from agent.lab import wiring
from tests.privileged import bpf_frames as f

pytestmark = pytest.mark.needs("bpffs")


FUZZ = settings(
    max_examples=200,
    deadline=None,
    derandomize=False,
    # `hostile` programs one fixed state per test function; no example changes it
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)

# ---- addresses ------------------------------------------------------------------------------------

SLOTS = 3  # endpoint slots; one more veth is a guarded interface that no endpoint claims
POD4 = tuple(ipaddress.ip_address(f"10.0.0.{i + 1}") for i in range(SLOTS))
POD6 = tuple(ipaddress.ip_address(f"fd00::{i + 1}") for i in range(SLOTS))
NODE4, NODE6 = ipaddress.ip_address("10.0.9.1"), ipaddress.ip_address("fd00:9::1")
REMOTE4 = tuple(
    ipaddress.ip_address(a)
    for a in ("10.0.1.7", "10.0.1.8", "10.1.0.5", "10.1.5.9", "10.1.255.1", "192.0.2.1", "203.0.113.200")
)
REMOTE6 = tuple(
    ipaddress.ip_address(a)
    for a in ("fd00:1::7", "fd00:1::8", "fd00:1:0:5::9", "2001:db8::1", "2001:db8:ffff::2", "2a00::5")
)
POOL = {4: (*POD4, NODE4, *REMOTE4), 6: (*POD6, NODE6, *REMOTE6)}
# IPv4 in IPv6 clothing: a pod's, a remote's and the node's IPv4 address, v4-mapped. Packets
# carry them (where they must be judged malformed, never as the IPv4 address), CIDRs spell them
# (CidrPeer reads those as IPv4, like Go); no identity or pod owns one.
MAPPED6 = tuple(ipaddress.ip_address(f"::ffff:{a}") for a in (POD4[0], REMOTE4[2], NODE4))
PACKET_POOL = {4: POOL[4], 6: (*POOL[6], *MAPPED6)}
IDENTITY_IDS = (1, 2, 3, 4, 5)  # 5 is never given addresses: an allow of it matches nothing
PORTS = (0, 1, 53, 80, 443, 1023, 1024, 5000, 8080, 32768, 65535)
PEER_PROTOCOLS = (PROTO_ANY, f.TCP, f.UDP, f.SCTP)
OTHER_PROTOCOLS = (2, 4, 41, 47, 50, 59, 89, 103, 112, 115, 253)
EXTENSION_TYPES = (0, 43, 44, 51, 60)  # hop-by-hop, routing, fragment, AH, destination options
DOCUMENTED_EXTENSION_BOUND = 8  # bpf/README.md: "more than 8 is malformed"
# SYN, SYN+ACK, ACK, PSH+ACK, FIN+ACK, RST, none, SYN+FIN
TCP_FLAGS = (0x02, 0x02, 0x12, 0x10, 0x18, 0x11, 0x04, 0x00, 0x03)


def family_of(address: IPAddress) -> int:
    return address.version


# ---- the oracle: agent/dataplane/types.py's allow lists, read literally ---------------------------


def peer_holds(peer: Peer, address: IPAddress, identities: dict[int, tuple[IPAddress, ...]]) -> bool:
    if isinstance(peer, IdentityPeer):
        return address in identities.get(peer.identity, ())
    # ipaddress answers False across families, as the semantics want
    return address in peer.cidr and not any(address in excluded for excluded in peer.excepts)


def allow_admits(allow: Allow, address: IPAddress, protocol: int, dport: int, state: NodeState) -> bool:
    if not peer_holds(allow.peer, address, state.identities):
        return False
    if allow.protocol == PROTO_ANY:
        return True
    return allow.protocol == protocol and allow.port_first <= dport <= allow.port_last


def direction_admits(
    policy: DirectionPolicy, address: IPAddress, protocol: int, dport: int, state: NodeState
) -> bool:
    return not policy.isolated or any(allow_admits(a, address, protocol, dport, state) for a in policy.allows)


def oracle_to_pod(state: NodeState, endpoint: Endpoint, source: IPAddress, protocol: int, dport: int) -> bool:
    """The pod's ingress: open, or the node itself (kubelet probes), or an allow matching."""
    if source in state.node_ips:
        return True
    return direction_admits(endpoint.ingress, source, protocol, dport, state)


def oracle_egress(
    state: NodeState, endpoint: Endpoint, destination: IPAddress, protocol: int, dport: int
) -> bool:
    return direction_admits(endpoint.egress, destination, protocol, dport, state)


# ---- frames ------------------------------------------------------------------------------------------


def l4_bytes(
    kind: str, family: int, sport: int, dport: int, icmp_id: int = 7, tcp_flags: int = 0x02
) -> tuple[int, bytes]:
    """(IP protocol, L4 header) of a well-formed first packet of `kind` (TCP: a SYN by default)."""
    if kind == "tcp":
        return f.TCP, f.l4(f.TCP, sport, dport, tcp_flags=tcp_flags)
    if kind == "udp":
        return f.UDP, f.l4(f.UDP, sport, dport)
    if kind == "sctp":
        init = struct.pack("!BBHIIHHI", 1, 0, 20, 0x1234, 65535, 1, 1, 1)  # INIT chunk
        return f.SCTP, struct.pack("!HHII", sport, dport, 0, 0) + init
    if kind == "echo":
        protocol = f.ICMP if family == 4 else f.ICMP6
        return protocol, f.l4(protocol, icmp_type=8 if family == 4 else 128, icmp_id=icmp_id)
    raise ValueError(kind)


def extension_chain(types: tuple[tuple[int, int], ...], upper: int) -> tuple[int, bytes]:
    """(first next-header value, bytes) of IPv6 extension headers ending in protocol `upper`;
    each entry is (header type, size parameter)."""
    chain = b""
    following = upper
    for header_type, size in reversed(types):
        if header_type in (0, 60):
            block = f.ext_header(following, size)
        elif header_type == 43:  # routing header, type 4, no segments left: passed over
            block = struct.pack("!BBBB", following, size, 4, 0) + b"\0" * ((size + 1) * 8 - 4)
        elif header_type == 51:  # AH: length in 4-byte units minus 2, a multiple of 8 bytes for IPv6
            total = 16 + 8 * size
            block = struct.pack("!BBHII", following, total // 4 - 2, 0, 0x100, 1) + b"\0" * (total - 12)
        else:  # 44: an atomic fragment (offset 0, no more fragments): a whole datagram
            block = f.frag6_header(following, 0, False, 0x5000 + size)
        chain = block + chain
        following = header_type
    return following, chain


def ip_frame(
    family: int,
    source: IPAddress,
    destination: IPAddress,
    protocol: int,
    payload: bytes,
    options: bytes = b"",
    extensions: tuple[tuple[int, int], ...] = (),
) -> bytes:
    if family == 4:
        return f.eth(f.ETH_IP, f.ipv4(str(source), str(destination), protocol, payload, options=options))
    first, chain = extension_chain(extensions, protocol)
    return f.eth(f.ETH_IP6, f.ipv6(str(source), str(destination), first, chain + payload))


# ---- an independent reading of what a frame claims -------------------------------------------------


@dataclass
class Claim:
    """What a frame says about itself, read from the RFC layouts (not from the datapath)."""

    # "ip", "arp", "vlan" (an 802.1Q/802.1ad tag), "other" (another ethertype) or "bad_l3" (no
    # usable IP header)
    layer: str
    family: int = 0
    source: IPAddress | None = None
    destination: IPAddress | None = None
    protocol: int = 0
    dport: int = 0
    malformed: bool = False  # addresses readable, the rest (options length, L4, extensions) not
    later_fragment: bool = False
    first_fragment: bool = False
    fragment_id: int = 0
    link_plumbing: bool = False  # NDP (hop limit 255) or MLD (hop limit 1)
    advert_target: IPAddress | None = None
    arp_sender: IPAddress | None = None
    refused_options: bool = False  # IPv4 options a pod may not send (all but a lone Router Alert)


def claim(frame: bytes) -> Claim:
    if len(frame) < 14:
        return Claim("other")
    ethertype = struct.unpack("!H", frame[12:14])[0]
    body = frame[14:]
    if ethertype == f.ETH_ARP:
        if len(body) < 28:
            return Claim("arp", malformed=True)
        return Claim("arp", arp_sender=ipaddress.IPv4Address(body[14:18]))
    if ethertype == f.ETH_IP:
        return _claim_ipv4(body)
    if ethertype == f.ETH_IP6:
        return _claim_ipv6(body)
    if ethertype in (0x8100, 0x88A8):  # 802.1Q, 802.1ad: refused from a pod as tagged
        return Claim("vlan")
    return Claim("other")


def _claim_ipv4(ip: bytes) -> Claim:
    if len(ip) < 20 or ip[0] >> 4 != 4 or ip[0] & 0x0F < 5:
        return Claim("bad_l3")
    header_length = (ip[0] & 0x0F) * 4
    total_length, ident, fragment = struct.unpack("!HHH", ip[2:8])
    result = Claim(
        "ip",
        4,
        ipaddress.IPv4Address(ip[12:16]),
        ipaddress.IPv4Address(ip[16:20]),
        ip[9],
        fragment_id=ident,
        refused_options=header_length > 20 and not (header_length == 24 and ip[20:24] == ROUTER_ALERT),
    )
    if total_length < header_length:
        result.malformed = True
        return result
    if fragment & 0x1FFF:
        result.later_fragment = True
        return result
    result.first_fragment = bool(fragment & 0x2000)
    _claim_l4(result, ip, header_length)
    return result


def _claim_ipv6(ip: bytes) -> Claim:
    if len(ip) < 40 or ip[0] >> 4 != 6:
        return Claim("bad_l3")
    result = Claim("ip", 6, ipaddress.IPv6Address(ip[8:24]), ipaddress.IPv6Address(ip[24:40]), ip[6])
    if result.source.ipv4_mapped is not None:  # type: ignore[union-attr]
        return Claim("bad_l3")  # names no one (Linux drops it on receive)
    # a v4-mapped destination is malformed, never judged as the IPv4 address it spells
    result.malformed = result.destination.ipv4_mapped is not None  # type: ignore[union-attr]
    hop_limit = ip[7]
    offset = 40
    walked = 0
    while result.protocol in EXTENSION_TYPES:
        if walked == DOCUMENTED_EXTENSION_BOUND:
            result.malformed = True
            return result
        walked += 1
        if result.protocol == 44:
            if len(ip) < offset + 8:
                result.malformed = True
                return result
            fragment, ident = struct.unpack("!HI", ip[offset + 2 : offset + 8])
            result.protocol = ip[offset]
            result.fragment_id = ident
            offset += 8
            if fragment & 0xFFF8:
                result.later_fragment = True
                return result
            result.first_fragment = result.first_fragment or bool(fragment & 1)
            continue
        if len(ip) < offset + 2:
            result.malformed = True
            return result
        units = ip[offset + 1]
        next_header = ip[offset]
        offset += (units + 2) * 4 if result.protocol == 51 else (units + 1) * 8
        result.protocol = next_header
    _claim_l4(result, ip, offset, hop_limit)
    return result


def _claim_l4(result: Claim, ip: bytes, offset: int, hop_limit: int = 0) -> None:
    """Ports of TCP (a full 20-byte header: data offset and flags), UDP and SCTP; the 8-byte
    header of ICMP; an ICMP error must quote an IP header; an NA must carry its target."""
    l4 = ip[offset:]
    protocol = result.protocol
    if protocol in (f.TCP, f.UDP, f.SCTP):
        if len(l4) < 4 or (protocol == f.TCP and (len(l4) < 14 or l4[12] >> 4 < 5)):
            result.malformed = True
            return
        result.dport = struct.unpack("!H", l4[2:4])[0]
        return
    if protocol not in (f.ICMP, f.ICMP6):
        return
    if len(l4) < 8:
        result.malformed = True
        return
    icmp_type = l4[0]
    is_error = (protocol == f.ICMP and icmp_type in (3, 11, 12)) or (
        protocol == f.ICMP6 and 1 <= icmp_type <= 4
    )
    if is_error:
        quoted = l4[8:]
        if result.family == 4 and (len(quoted) < 20 or quoted[0] & 0x0F < 5):
            result.malformed = True
        if result.family == 6 and len(quoted) < 40:
            result.malformed = True
    if protocol == f.ICMP6 and (
        (133 <= icmp_type <= 137 and hop_limit == 255)
        or (icmp_type in (130, 131, 132, 143) and hop_limit == 1)
    ):
        result.link_plumbing = True
    if protocol == f.ICMP6 and icmp_type == 136:
        if len(l4) < 24:
            result.malformed = True
        else:
            result.advert_target = ipaddress.IPv6Address(l4[8:24])


# ---- the kernel side ----------------------------------------------------------------------------------


@dataclass
class Bench:
    plane: BpfDataplane
    netns: str
    ifindexes: tuple[int, ...]  # host-side veths in the netns; the last one no endpoint claims
    version: int = 0
    refused: set[int] = field(default_factory=set)  # frame lengths the kernel would not test-run
    egress: str = "nf_egress_link"  # which egress program egress_path runs (EGRESS_PROGRAMS)

    def apply(self, state: NodeState) -> None:
        self.version += 1
        self.plane.apply(
            NodeState(
                self.version, state.endpoints, state.identities, state.node_ips, frozenset(self.ifindexes)
            )
        )

    def forget_flows(self) -> None:
        """Empty conntrack and fragment memory: the next packet is a first packet."""
        for name in (b"pf_ct", b"pf_frag"):
            self.plane._module[name].clear()

    def passes(self, hook: str, frame: bytes, ifindex: int = 0) -> bool | None:
        """Does `hook` let the frame pass? None if the kernel refuses to test-run it at all."""
        programs = self.plane._programs  # the loaded programs the tc filters and iptables run
        name = {"to_pod": loader.PROGRAM_TO_POD, "from_pod": loader.PROGRAM_FROM_POD}.get(
            hook, loader.PROGRAM_NF_EGRESS
        )
        try:
            with inside(self.netns):
                if hook == "nf_egress_link":
                    result = run_netfilter_program(self.plane.hook.links.program_fd, frame)
                else:
                    result = run_program(programs[name].fd, frame, ifindex)
        except OSError as error:
            if error.errno not in (errno.EINVAL, errno.EPROTO):  # EPROTO: not IP, no netfilter hook runs
                raise
            self.refused.add(len(frame))
            return None
        if hook == "nf_egress_link":
            return result == NF_ACCEPT
        if hook == "nf_egress":
            return result == 0
        assert result in (TC_ACT_OK, TC_ACT_SHOT)
        return result == TC_ACT_OK

    def egress_path(self, frame: bytes, ifindex: int) -> bool | None:
        """A packet from a pod: tc ingress of its veth, then the netfilter egress judge."""
        first = self.passes("from_pod", frame, ifindex)
        return first and self.passes(self.egress, frame)

    def drop_reasons(self) -> dict[str, int]:
        return self.plane.drop_reason_counts()


@contextmanager
def _bench(established_on_change: str, **overrides: Any) -> Iterator[Bench]:
    """`overrides`: other BpfSettings fields."""
    prefix = f"pfb-{secrets.token_hex(3)}"
    netns = f"{prefix}-fuzz"
    wiring.create(netns, loopback_up=False)
    plane = BpfDataplane(
        BpfSettings(
            pin_dir=f"/sys/fs/bpf/{prefix}",
            netns=netns,
            state_file=f"/run/podfence-tests/{prefix}.json",
            established_on_change=established_on_change,
            **overrides,
        )
    )
    try:
        ifindexes = []
        for index in range(SLOTS + 1):
            host, pod = f"pfz{index}", f"pfz{index}p"
            ifindexes.append(wiring.add_veth(netns, host, None, pod, up=False))
        plane.start()  # one BCC compile for the whole module
        yield Bench(plane, netns, tuple(ifindexes))
    finally:
        plane.teardown()
        wiring.remove(netns)


@pytest.fixture(scope="module")
def bench() -> Iterator[Bench]:
    with _bench("keep") as made:
        yield made


@pytest.fixture(scope="module")
def reset_bench() -> Iterator[Bench]:
    """The build of established_on_change="reset" (-DPF_TCP_NEEDS_SYN=1)."""
    with _bench("reset") as made:
        yield made


# ---- strategies ---------------------------------------------------------------------------------------


@st.composite
def cidr_peers(draw: st.DrawFn) -> CidrPeer:
    family = draw(st.sampled_from((4, 6)))
    width = 32 if family == 4 else 128
    interesting = (0, 8, 16, 24, 28, 31, 32) if family == 4 else (0, 16, 32, 48, 64, 96, 112, 127, 128)
    base = draw(st.sampled_from(PACKET_POOL[family]))
    # the whole address space of a family is common in policies ("0.0.0.0/0", "::/0")
    length = draw(st.one_of(st.just(0), st.sampled_from(interesting), st.integers(0, width)))
    cidr = ipaddress.ip_network(f"{base}/{length}", strict=False)
    inside = [a for a in PACKET_POOL[family] if a in cidr]
    excepts = []
    for _ in range(draw(st.integers(0, 2))):
        address = draw(st.sampled_from(inside))
        except_length = draw(st.integers(length, width))
        excepts.append(ipaddress.ip_network(f"{address}/{except_length}", strict=False))
    return CidrPeer(cidr, tuple(excepts))


@st.composite
def allows(draw: st.DrawFn) -> Allow:
    peer: Peer = draw(st.one_of(st.sampled_from(IDENTITY_IDS).map(IdentityPeer), cidr_peers()))
    protocol = draw(st.sampled_from(PEER_PROTOCOLS))
    # protocol 0 carries ports too, which must then be ignored
    first, last = draw(
        st.one_of(
            st.just((0, 65535)),
            st.sampled_from(PORTS).map(lambda p: (p, p)),
            st.tuples(st.sampled_from(PORTS), st.integers(0, 65535)).map(lambda r: (min(r), max(r))),
        )
    )
    return Allow(peer, protocol, first, last)


def directions() -> st.SearchStrategy[DirectionPolicy]:
    return st.builds(DirectionPolicy, st.booleans(), st.lists(allows(), max_size=4).map(tuple))


@st.composite
def node_states(draw: st.DrawFn) -> NodeState:
    slots = draw(st.lists(st.integers(0, SLOTS - 1), min_size=1, max_size=SLOTS, unique=True))
    endpoints = {}
    for slot in slots:
        families = draw(st.sampled_from(((4,), (6,), (4, 6))))
        ips = tuple(POD4[slot] if family == 4 else POD6[slot] for family in families)
        # ifindex holds the slot here; Bench maps it to a veth (see with_ifindexes)
        endpoints[f"ns/pod{slot}"] = Endpoint(
            f"ns/pod{slot}", ips, draw(directions()), draw(directions()), slot
        )
    addresses = st.sampled_from(POOL[4] + POOL[6])
    identities = {
        identity: tuple(draw(st.lists(addresses, max_size=4, unique=True))) for identity in IDENTITY_IDS[:-1]
    }
    return NodeState(0, endpoints, identities, (NODE4, NODE6))


def with_ifindexes(state: NodeState, bench: Bench) -> NodeState:
    endpoints = {
        key: Endpoint(e.key, e.ips, e.ingress, e.egress, bench.ifindexes[e.ifindex or 0])
        for key, e in state.endpoints.items()
    }
    return NodeState(0, endpoints, state.identities, state.node_ips)


@dataclass(frozen=True)
class Probe:
    hook: str  # "to_pod", "egress" (tc ingress then netfilter) or "from_pod" (anti-spoofing)
    slot: int  # endpoint slot; SLOTS = the interface no endpoint claims
    family: int
    remote: IPAddress  # the peer: source of to_pod, destination otherwise
    own: IPAddress  # the pod's side: destination of to_pod, (claimed) source otherwise
    kind: str  # tcp, udp, sctp, echo, other
    protocol: int
    sport: int
    dport: int
    options: bytes = b""
    extensions: tuple[tuple[int, int], ...] = ()
    tcp_flags: int = 0x02

    @property
    def opens_no_tcp_flow(self) -> bool:
        """A TCP packet that is not a bare SYN (SYN without ACK): it cannot start a flow."""
        return self.kind == "tcp" and self.tcp_flags & 0x12 != 0x02

    def frame(self) -> bytes:
        if self.kind == "other":
            protocol, payload = self.protocol, b"\0" * 8
        else:
            protocol, payload = l4_bytes(
                self.kind, self.family, self.sport, self.dport, icmp_id=self.sport, tcp_flags=self.tcp_flags
            )
        if self.hook == "to_pod":
            source, destination = self.remote, self.own
        else:
            source, destination = self.own, self.remote
        return ip_frame(self.family, source, destination, protocol, payload, self.options, self.extensions)

    def l4(self) -> tuple[int, int]:
        """(protocol, destination port) the oracle judges."""
        if self.kind == "other":
            return self.protocol, 0
        protocol, _ = l4_bytes(self.kind, self.family, 0, 0)
        return protocol, self.dport if self.kind in ("tcp", "udp", "sctp") else 0


ROUTER_ALERT = b"\x94\x04\x00\x00"
IPV4_OPTION_BLOCKS = (
    ROUTER_ALERT,
    b"\x01\x01\x01\x01",  # NOPs
    b"\x07\x0b\x04" + b"\0" * 8 + b"\x01",  # record route (one slot free) + NOP
    b"\x01\x01\x01\x00",  # NOPs then end of options
)


@st.composite
def probes(draw: st.DrawFn, state: NodeState) -> Probe:
    hook = draw(st.sampled_from(("to_pod", "egress", "from_pod")))
    slot = draw(st.integers(0, SLOTS))
    endpoint = state.endpoints.get(f"ns/pod{slot}")
    family = draw(st.sampled_from((4, 6)))
    if endpoint is not None and not any(family_of(a) == family for a in endpoint.ips):
        family = family_of(endpoint.ips[0])
    own = (POD4 if family == 4 else POD6)[min(slot, SLOTS - 1)] if slot < SLOTS else POOL[family][0]
    if hook == "from_pod":
        own = draw(st.sampled_from(PACKET_POOL[family]))  # its own address, or a spoofed one
    remote = draw(st.sampled_from(PACKET_POOL[family]))
    kind = draw(st.sampled_from(("tcp", "udp", "sctp", "echo", "other")))
    blocks = draw(st.lists(st.sampled_from(IPV4_OPTION_BLOCKS), max_size=3)) if family == 4 else []
    extensions = (
        draw(
            st.lists(
                st.tuples(st.sampled_from(EXTENSION_TYPES), st.integers(0, 3)),
                max_size=DOCUMENTED_EXTENSION_BOUND,
            )
        )
        if family == 6
        else []
    )
    return Probe(
        hook,
        slot,
        family,
        remote,
        own,
        kind,
        draw(st.sampled_from(OTHER_PROTOCOLS)),
        draw(st.integers(1, 65535)),
        draw(st.one_of(st.sampled_from(PORTS), st.integers(0, 65535))),
        b"".join(blocks),
        tuple(extensions),
        draw(st.sampled_from(TCP_FLAGS)),
    )


# ---- 1. differential ----------------------------------------------------------------------------------

EGRESS_PROGRAMS = ("nf_egress_link", "nf_egress")  # netfilter link; xt_bpf (where links cannot be used)


def expected(state: NodeState, probe: Probe, tcp_needs_syn: bool = False) -> bool:
    """`tcp_needs_syn`: the reset-mode build, where a TCP packet no flow knows must be a bare SYN
    wherever a verdict is given (to_pod, egress), isolated or not, from the node too."""
    endpoint = state.endpoints.get(f"ns/pod{probe.slot}")
    # bpf/README.md: an IPv6 header carrying a v4-mapped address is malformed (a source: always
    # dropped from a pod), so it passes only a direction that is not isolated
    mapped_remote = probe.remote in MAPPED6
    refused_mid_stream = tcp_needs_syn and probe.opens_no_tcp_flow and not mapped_remote
    if probe.hook == "to_pod":
        if endpoint is None:
            return False  # a guarded interface no endpoint claims (unknown_endpoints="drop")
        if mapped_remote:
            return not endpoint.ingress.isolated
        if refused_mid_stream:
            return False
        return oracle_to_pod(state, endpoint, probe.remote, *probe.l4())
    # bpf/README.md: a pod may send no IPv4 options but a lone Router Alert (source routes)
    refused_options = probe.family == 4 and probe.options not in (b"", ROUTER_ALERT)
    if probe.hook == "from_pod":
        own = endpoint is not None and probe.own in endpoint.ips  # anti-spoofing
        return own and not refused_options and not (mapped_remote and endpoint.egress.isolated)  # type: ignore[union-attr]
    if endpoint is None or refused_options:
        return False  # dropped on its veth already
    if mapped_remote:
        return not endpoint.egress.isolated
    if refused_mid_stream:
        return False
    return oracle_egress(state, endpoint, probe.remote, *probe.l4())


@FUZZ
@given(data=st.data())
def test_first_packet_verdicts_match_the_allow_list_semantics(bench: Bench, data: st.DataObject) -> None:
    check_first_packets(bench, data, tcp_needs_syn=False)


@FUZZ
@given(data=st.data())
def test_reset_mode_build_refuses_mid_stream_tcp_and_otherwise_matches(
    reset_bench: Bench, data: st.DataObject
) -> None:
    check_first_packets(reset_bench, data, tcp_needs_syn=True)


def check_first_packets(bench: Bench, data: st.DataObject, tcp_needs_syn: bool) -> None:
    state = with_ifindexes(data.draw(node_states(), label="state"), bench)
    bench.apply(state)
    bench.egress = data.draw(st.sampled_from(EGRESS_PROGRAMS), label="egress program")
    for probe in data.draw(st.lists(probes(state), min_size=1, max_size=8), label="probes"):
        bench.forget_flows()
        frame = probe.frame()
        ifindex = bench.ifindexes[probe.slot]
        if probe.hook == "to_pod":
            verdict = bench.passes("to_pod", frame, ifindex)
        elif probe.hook == "from_pod":
            verdict = bench.passes("from_pod", frame, ifindex)
        else:
            verdict = bench.egress_path(frame, ifindex)
        assert verdict is not None, f"the kernel refused a well-formed frame {frame.hex()}"
        shown = f"{probe} -> {'pass' if verdict else 'drop'}: {frame.hex()}"
        assert verdict == expected(state, probe, tcp_needs_syn), shown


# ---- 2. hostile ---------------------------------------------------------------------------------------

PEER7_4, PEER7_6 = REMOTE4[0], REMOTE6[0]
GUARDED = Endpoint(
    "ns/pod0",
    (POD4[0], POD6[0]),
    DirectionPolicy(
        True,
        (
            Allow(IdentityPeer(7), f.TCP, 80, 80),
            Allow(
                CidrPeer(ipaddress.ip_network("10.1.0.0/16"), (ipaddress.ip_network("10.1.5.0/24"),)),
                f.UDP,
                53,
                53,
            ),
        ),
    ),
    DirectionPolicy(
        True,
        (
            Allow(IdentityPeer(7), f.TCP, 443, 443),
            Allow(CidrPeer(ipaddress.ip_network("fd00:1::/64")), f.UDP, 53, 53),
        ),
    ),
    0,
)
NEIGHBOUR = Endpoint("ns/pod1", (POD4[1], POD6[1]), ifindex=1)  # open: its addresses are worth spoofing
HOSTILE_STATE = NodeState(
    0, {GUARDED.key: GUARDED, NEIGHBOUR.key: NEIGHBOUR}, {7: (PEER7_4, PEER7_6)}, (NODE4, NODE6)
)
POD_4, POD_6 = POD4[0], POD6[0]


def tcp(family: int, source: IPAddress, destination: IPAddress, dport: int, **kw: object) -> bytes:
    return ip_frame(family, source, destination, f.TCP, f.l4(f.TCP, 40000, dport), **kw)  # type: ignore[arg-type]


def udp(family: int, source: IPAddress, destination: IPAddress, dport: int) -> bytes:
    return ip_frame(family, source, destination, f.UDP, f.l4(f.UDP, 40000, dport))


HOSTILE_BASES = (  # (hook, frame): allowed and denied well-formed frames of the guarded pod
    ("to_pod", tcp(4, PEER7_4, POD_4, 80, options=IPV4_OPTION_BLOCKS[2])),
    ("to_pod", tcp(6, PEER7_6, POD_6, 80, extensions=((0, 0), (60, 1)))),
    ("to_pod", udp(4, REMOTE4[2], POD_4, 53)),
    ("to_pod", udp(4, REMOTE4[3], POD_4, 53)),  # inside the except
    ("to_pod", tcp(4, REMOTE4[1], POD_4, 80)),
    ("to_pod", ip_frame(4, PEER7_4, POD_4, f.ICMP, f.l4(f.ICMP))),
    ("egress", tcp(4, POD_4, PEER7_4, 443)),
    ("egress", tcp(6, POD_6, PEER7_6, 443, extensions=((43, 0), (51, 0)))),
    ("egress", udp(6, POD_6, REMOTE6[2], 53)),
    ("egress", tcp(4, POD_4, PEER7_4, 80)),
    ("to_pod", tcp(6, MAPPED6[1], POD_6, 80)),  # IPv4 in IPv6 clothing, both ways
    ("egress", udp(6, POD_6, ipaddress.ip_address("::ffff:10.1.0.5"), 53)),
)


def link_local_or_unspecified(address: IPAddress | None) -> bool:
    return address is not None and address.version == 6 and (address.is_link_local or address.is_unspecified)


def check_egress_programs_agree(bench: Bench, frame: bytes, ifindex: int) -> None:
    """From a clean start, the frame leaving the pod gets the same egress verdict from both programs."""
    verdicts = []
    for program in EGRESS_PROGRAMS:
        bench.forget_flows()
        verdicts.append(bench.passes("from_pod", frame, ifindex) and bench.passes(program, frame))
    assert verdicts[0] == verdicts[1], f"{frame.hex()}: {dict(zip(EGRESS_PROGRAMS, verdicts, strict=True))}"


def hostile_verdict(bench: Bench, hook: str, frame: bytes) -> bool:
    """Run one frame at the guarded pod; assert no allow the claimed tuple does not earn, and
    the documented drop reason for frames that are not even well-formed. False if the kernel
    refused to test-run the frame."""
    state, said = HOSTILE_STATE, claim(frame)
    bench.forget_flows()
    before = bench.drop_reasons()
    ifindex = bench.ifindexes[0]
    if hook == "to_pod":
        verdict = bench.passes("to_pod", frame, ifindex)
    else:
        verdict = bench.passes("from_pod", frame, ifindex)
        if verdict and said.layer == "ip" and not link_local_or_unspecified(said.source):
            verdict = bench.passes("nf_egress", frame)
    if verdict is None:
        return False  # the kernel refused to run it: no program ever sees such a frame
    counted = {k: v - before[k] for k, v in bench.drop_reasons().items() if v != before[k]}
    if hook != "to_pod" and said.layer == "ip" and not link_local_or_unspecified(said.source):
        check_egress_programs_agree(bench, frame, ifindex)
    shown = f"{hook} {frame.hex()} claims {said} -> {'pass' if verdict else 'drop'} {counted}"

    expected_reason = None  # a drop whose reason the datapath documents
    if said.layer == "other" or (said.layer == "vlan" and hook == "to_pod"):
        expected_reason = Reason.UNSUPPORTED_L2
    elif said.layer == "vlan":
        expected_reason = Reason.VLAN_TAGGED  # tc_from_pod refuses tags (lib/neigh.h)
    elif said.layer == "bad_l3" or (said.layer == "arp" and said.malformed):
        expected_reason = Reason.MALFORMED
    if hook == "to_pod":
        if said.layer == "arp":
            admissible = True  # ARP to a pod always passes (tc_to_pod)
        elif said.layer == "ip" and (said.link_plumbing or said.source in state.node_ips):
            admissible = True  # NDP/MLD, the node itself
        elif said.layer == "ip" and said.malformed:
            admissible, expected_reason = False, Reason.MALFORMED
        elif said.layer == "ip" and said.later_fragment:
            admissible, expected_reason = False, Reason.ORPHAN_FRAGMENT  # nothing remembered
        elif said.layer != "ip":
            admissible = False
        else:
            assert said.source is not None  # every "ip" claim names both addresses
            admissible = oracle_to_pod(state, GUARDED, said.source, said.protocol, said.dport)
    elif said.layer == "arp":
        admissible = said.arp_sender in (ipaddress.IPv4Address(0), POD_4)
        if not said.malformed and not admissible:
            expected_reason = Reason.SPOOFED_ARP
    elif said.layer != "ip":
        admissible = False
    elif said.source not in GUARDED.ips and not link_local_or_unspecified(said.source):
        admissible, expected_reason = False, Reason.SPOOFED_SOURCE
    elif said.refused_options:
        admissible, expected_reason = False, Reason.IP_OPTIONS
    elif said.advert_target is not None and not (
        said.advert_target.is_link_local or said.advert_target in GUARDED.ips
    ):
        admissible, expected_reason = False, Reason.SPOOFED_NDP
    elif said.malformed:
        admissible, expected_reason = False, Reason.MALFORMED
    elif said.later_fragment:
        admissible, expected_reason = False, Reason.ORPHAN_FRAGMENT
    else:
        # link-local or unspecified sources included: tc_from_pod judges those itself
        assert said.destination is not None  # every "ip" claim names both addresses
        admissible = said.link_plumbing or oracle_egress(
            state, GUARDED, said.destination, said.protocol, said.dport
        )
    assert admissible or not verdict, f"allowed what the claimed tuple does not earn: {shown}"
    if expected_reason is not None:
        assert not verdict and counted == {expected_reason.name.lower(): 1}, shown
    return True


@pytest.fixture
def hostile(bench: Bench) -> Bench:
    bench.apply(with_ifindexes(HOSTILE_STATE, bench))
    return bench


def test_truncation_at_every_length_never_allows_what_the_frame_does_not_carry(hostile: Bench) -> None:
    for hook, frame in HOSTILE_BASES:
        fixed_header = 14 + (20 if frame[12:14] == b"\x08\x00" else 40)
        for length in range(14, len(frame) + 1):
            ran = hostile_verdict(hostile, hook, frame[:length])
            # BPF_PROG_TEST_RUN refuses a frame whose fixed IP header is cut (a pod can still send
            # one: there the bounds-checked loads make it malformed); every longer one runs
            assert ran == (length >= fixed_header), f"{hook} {frame[:length].hex()} ran: {ran}"


@pytest.mark.parametrize("tag", [b"\x81\x00", b"\x88\xa8"])
@pytest.mark.parametrize("hook", ["egress", "to_pod"])
def test_a_tag_where_the_ethertype_was_is_refused_as_tagged(hostile: Bench, hook: str, tag: bytes) -> None:
    """What the random edits below found once (CI, 2026-12-08): bytes 12-13 edited into an
    802.1Q or 802.1ad tag, refused from a pod as tagged, to a pod as another ethertype."""
    frame = next(frame for kind, frame in HOSTILE_BASES if kind == hook and frame[12:14] == b"\x08\x00")
    assert hostile_verdict(hostile, hook, frame[:12] + tag + frame[14:])


@FUZZ
@given(
    base=st.sampled_from(HOSTILE_BASES),
    edits=st.lists(st.tuples(st.integers(12, 100), st.integers(0, 255)), min_size=1, max_size=6),
)
def test_random_header_bytes_never_earn_an_allow(
    hostile: Bench, base: tuple[str, bytes], edits: list
) -> None:
    hook, frame = base
    mutated = bytearray(frame)
    for position, value in edits:
        if position < len(mutated):
            mutated[position] = value
    hostile_verdict(hostile, hook, bytes(mutated))


@FUZZ
@given(
    base=st.sampled_from([b for b in HOSTILE_BASES if b[1][12:14] == b"\x08\x00"]),
    ihl=st.integers(0, 15),
    tail=st.binary(max_size=64),
)
def test_any_ihl_is_read_as_the_header_length_it_claims(
    hostile: Bench, base: tuple[str, bytes], ihl: int, tail: bytes
) -> None:
    hook, frame = base
    mutated = bytearray(frame + tail)
    mutated[14] = 0x40 | ihl
    hostile_verdict(hostile, hook, bytes(mutated))


@FUZZ
@given(
    to_pod=st.booleans(),
    chain=st.lists(st.tuples(st.sampled_from(EXTENSION_TYPES), st.integers(0, 4)), max_size=14),
    dport=st.sampled_from((53, 80, 443, 81)),
    kind=st.sampled_from(("tcp", "udp")),
)
def test_ipv6_extension_chains_of_any_length(
    hostile: Bench, to_pod: bool, chain: list, dport: int, kind: str
) -> None:
    protocol, payload = l4_bytes(kind, 6, 40000, dport)
    if to_pod:
        hostile_verdict(
            hostile, "to_pod", ip_frame(6, PEER7_6, POD_6, protocol, payload, extensions=tuple(chain))
        )
    else:
        frame = ip_frame(6, POD_6, PEER7_6, protocol, payload, extensions=tuple(chain))
        hostile_verdict(hostile, "egress", frame)


@FUZZ
@given(
    source=st.sampled_from(
        (
            *POOL[4],
            *POOL[6],
            ipaddress.ip_address("fe80::2"),
            ipaddress.ip_address("::"),
            ipaddress.ip_address("0.0.0.0"),
        )
    ),
    destination=st.sampled_from((PEER7_4, PEER7_6, REMOTE4[2], REMOTE6[2], NODE4, NODE6)),
    dport=st.sampled_from((53, 443, 80)),
    kind=st.sampled_from(("tcp", "udp", "arp", "advert")),
    target=st.sampled_from((POD_6, POD6[1], ipaddress.ip_address("fe80::2"), PEER7_6)),
)
def test_spoofed_sources_from_the_pod_are_dropped(
    hostile: Bench, source: IPAddress, destination: IPAddress, dport: int, kind: str, target: IPAddress
) -> None:
    if kind == "arp":
        sender = source if source.version == 4 else ipaddress.ip_address("10.0.0.99")
        hostile_verdict(hostile, "egress", f.arp(str(sender), "10.0.0.254"))
        return
    if kind == "advert":
        if source.version == 4:
            return
        body = struct.pack("!BBHI16s", 136, 0, 0, 0x60000000, target.packed)
        frame = f.eth(f.ETH_IP6, f.ipv6(str(source), "fe80::1", f.ICMP6, body, hop_limit=255))
        hostile_verdict(hostile, "egress", frame)
        return
    if destination.version != source.version:
        destination = PEER7_4 if source.version == 4 else PEER7_6
    protocol, payload = l4_bytes(kind, source.version, 40000, dport)
    hostile_verdict(hostile, "egress", ip_frame(source.version, source, destination, protocol, payload))


def fragment(family: int, source: IPAddress, ident: int, dport: int | None) -> bytes:
    """The first fragment of a TCP datagram to port `dport`, or (None) a later fragment."""
    body = b"x" * 16 if dport is None else f.l4(f.TCP, 40000, dport)
    if family == 4:
        return f.eth(
            f.ETH_IP,
            f.ipv4(
                str(source),
                str(POD_4),
                f.TCP,
                body,
                frag_id=ident,
                more_fragments=dport is not None,
                frag_offset=0 if dport is not None else 24,
            ),
        )
    header = f.frag6_header(f.TCP, 0 if dport is not None else 24, dport is not None, ident)
    return f.eth(f.ETH_IP6, f.ipv6(str(source), str(POD_6), 44, header + body))


@FUZZ
@given(
    events=st.lists(
        st.tuples(
            st.sampled_from((4, 6)),
            st.sampled_from((1, 2, 3)),
            st.sampled_from(("first allowed", "first denied", "later", "later from another source")),
        ),
        min_size=1,
        max_size=12,
    )
)
def test_fragments_in_any_order_follow_only_their_own_first_fragment(hostile: Bench, events: list) -> None:
    hostile.forget_flows()
    remembered: dict[tuple[int, int], bool] = {}  # (family, id) -> verdict of the last first fragment
    for family, ident, event in events:
        peer = PEER7_4 if family == 4 else PEER7_6
        if event.startswith("first"):
            allowed = event == "first allowed"
            frame = fragment(family, peer, ident, 80 if allowed else 81)
            expected, reason = allowed, Reason.POLICY
            remembered[(family, ident)] = allowed
        elif event == "later":
            frame = fragment(family, peer, ident, None)
            seen = remembered.get((family, ident))
            expected, reason = bool(seen), Reason.ORPHAN_FRAGMENT if seen is None else Reason.POLICY
        else:  # same id, another sender: a datagram of its own, whose first fragment never came
            frame = fragment(family, REMOTE4[1] if family == 4 else REMOTE6[1], ident, None)
            expected, reason = False, Reason.ORPHAN_FRAGMENT
        before = hostile.drop_reasons()
        verdict = hostile.passes("to_pod", frame, hostile.ifindexes[0])
        counted = {k: v - before[k] for k, v in hostile.drop_reasons().items() if v != before[k]}
        assert verdict == expected, f"{event} {family} {ident}: {'pass' if verdict else 'drop'}"
        assert counted == ({} if expected else {reason.name.lower(): 1}), f"{event}: {counted}"
