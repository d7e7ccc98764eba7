"""Flow records of the iptables dataplane without root: the log chains the compiler writes, the
NFLOG prefix, packet decoding, the netlink decoder, and the per-flow bookkeeping. The records of
real traffic are tested in tests/privileged/test_iptables_flows.py."""

from __future__ import annotations

import ipaddress
import logging
import socket
import struct
import time

import pytest

from agent.dataplane.flows import FlowRecord, FlowVerdict
from agent.dataplane.iptables import IptablesDataplane, nflog
from agent.dataplane.iptables.compiler import compile_state
from agent.dataplane.iptables.flowrecords import (
    NO_POLICY,
    NO_RULE,
    SET_RULE,
    AllowedFlows,
    DeniedFlows,
    RuleName,
    decode_tuple,
    nflog_prefix,
    parse_prefix,
    rule_ref,
)
from agent.dataplane.iptables.flowsource import FlowSource, FlowView, flow_view, record_of
from agent.dataplane.iptables.layout import DesiredState
from agent.dataplane.types import (
    ACTION_ACCEPT,
    ACTION_DENY,
    ACTION_PASS,
    TIER_ADMIN,
    Allow,
    CidrPeer,
    DirectionPolicy,
    Endpoint,
    NodeState,
    TieredAllow,
)
from agent.node.flowlog import FlowLogger
from tests.unit.test_iptables_compiler import IFACES, chain_of, state

GROUP = 1247


def test_the_prefix_round_trips_and_other_prefixes_are_not_ours() -> None:
    for verdict in FlowVerdict:
        for ref in (1, 0xABCDEF123456):
            prefix = nflog_prefix(verdict, ref)
            assert len(prefix) < 64 and parse_prefix(prefix) == (verdict, ref)
    for other in ("", "IN=eth0", "pf1 x 12", "pf1 a zz", "pf1 a", "pf2 a 12"):
        assert parse_prefix(other) is None


def test_rule_refs_are_stable_and_name_the_direction() -> None:
    name = RuleName("ingress", "networkpolicy", "ns/web", "ingress[0]")
    assert rule_ref(name) == rule_ref(RuleName("ingress", "networkpolicy", "ns/web", "ingress[0]"))
    assert rule_ref(name) != rule_ref(RuleName("egress", "networkpolicy", "ns/web", "ingress[0]"))
    assert 0 < rule_ref(name) < 1 << 48


def _rules(desired: DesiredState) -> int:
    return sum(len(rules) for rules in desired.chains[4].values())


def test_deciding_rules_go_through_log_chains_shared_by_endpoints() -> None:
    allow = DirectionPolicy(
        True, (Allow(CidrPeer(ipaddress.ip_network("10.9.0.0/16")), 6, 80, 80, "ns/web"),)
    )
    off = compile_state(state(allow), IFACES)
    on = compile_state(state(allow), IFACES, flow_group=GROUP)
    chain = on.chains[4][chain_of(on, "ns/a", "ingress")]
    # the same matches, only the deciding targets differ; established traffic still returns at once
    assert chain[0] == off.chains[4][chain_of(off, "ns/a", "ingress")][0]
    allowed = next(r for r in chain if "--dport 80" in r)
    assert '"podfence:allow" -g PF-LA' in allowed  # still counted as the endpoint's allow
    assert '"podfence:deny" -g PF-LD' in chain[-1]
    log_chains = {name: rules for name, rules in on.chains[4].items() if name.startswith("PF-L")}
    refs = {rule_ref(name): name for name in on.rule_names.values()}
    assert set(on.rule_names) == set(refs)
    # ns/a ingress: ns/web's rule and "no rule matched"; every other direction: no policy; and
    # the drops for other reasons than a policy (a source not the pod's, IP options, and in
    # IPv6 neighbour discovery a pod may not send)
    assert {
        (n.direction, n.policy, n.rule, n.reason) for n in on.rule_names.values() if n.reason == "policy"
    } == {
        ("ingress", "ns/web", "", "policy"),
        ("ingress", "", NO_RULE, "policy"),
        ("ingress", "", NO_POLICY, "policy"),
        ("egress", "", NO_POLICY, "policy"),
    }
    assert {n.reason for n in on.rule_names.values()} == {
        "policy", "spoofed_source", "ip_options", "spoofed_ndp", "rogue_ndp"
    }
    assert len(log_chains) == 6  # ns/b's ingress and both egresses share the "no policy" chains
    allowed_chain = log_chains[allowed.rsplit(" ", 1)[1]]
    assert allowed_chain[0].startswith("-m conntrack --ctstate NEW -j NFLOG --nflog-group 1247")
    assert allowed_chain[-1] == "-j RETURN"
    denied_chain = log_chains[chain[-1].rsplit(" ", 1)[1]]
    assert "--hashlimit-above" in denied_chain[0] and denied_chain[0].endswith("-j DROP")
    assert "-j NFLOG" in denied_chain[1] and denied_chain[2] == "-j DROP"


def test_ten_thousand_allows_of_a_hundred_rules_do_not_double_the_rules() -> None:
    allows = tuple(
        Allow(
            CidrPeer(ipaddress.ip_network(f"10.{i // 250}.{i % 250}.0/24")),
            6,
            1000 + i % 7,
            2000,
            f"ns/p{i % 100}",
        )
        for i in range(10_000)
    )
    off = compile_state(state(DirectionPolicy(True, allows)), IFACES)
    on = compile_state(state(DirectionPolicy(True, allows)), IFACES, flow_group=GROUP)
    assert _rules(off) > 10_000
    # two rules per allowing rule's log chain, three per denying one: 100 rules, "no rule
    # matched", "no policy" (ingress, egress), "spoofed source", "IP options"
    assert _rules(on) - _rules(off) == 2 * 100 + 3 + 2 * 2 + 3 * 2
    assert _rules(on) < 1.05 * _rules(off)


def test_single_port_allows_of_different_rules_get_a_set_each() -> None:
    def allows(policy: str, base: int) -> tuple[Allow, ...]:
        return tuple(
            Allow(CidrPeer(ipaddress.ip_network(f"10.{base}.{i}.0/24")), 6, 80, 80, policy) for i in range(8)
        )

    desired = compile_state(
        state(DirectionPolicy(True, allows("ns/one", 1) + allows("ns/two", 2))), IFACES, flow_group=GROUP
    )
    chain = desired.chains[4][chain_of(desired, "ns/a", "ingress")]
    grouped = [r for r in chain if "--match-set pf-g4i" in r]
    assert len(grouped) == 2 and len({r.rsplit(" ", 1)[1] for r in grouped}) == 2


def test_cluster_policy_sets_log_per_action_and_the_reader_names_the_rule() -> None:
    """A tier's precedence is one set per action (tiers.py); its matches log through one chain
    per (direction, tier, action), and the reader names the rule each packet's peer and port
    stand for, by rank. A Pass logs nothing (the next tier decides and logs)."""
    wide = CidrPeer(ipaddress.ip_network("10.9.0.0/16"))
    narrow = CidrPeer(ipaddress.ip_network("10.9.1.0/24"))
    tiered = (
        TieredAllow(TIER_ADMIN, 1, ACTION_DENY, narrow, 6, 22, 22, "no-ssh-lab", "deny-lab"),
        TieredAllow(TIER_ADMIN, 2, ACTION_ACCEPT, wide, 6, 22, 22, "ssh", "allow-ssh"),
        TieredAllow(TIER_ADMIN, 3, ACTION_PASS, wide, 6, 80, 80, "delegate", "pass"),
        TieredAllow(TIER_ADMIN, 4, ACTION_ACCEPT, wide, 6, 443, 443, "tls", "allow-tls"),
    )
    endpoint_state = state(DirectionPolicy(False, (), tiered))
    desired = compile_state(endpoint_state, IFACES, flow_group=GROUP)
    chain = desired.chains[4][chain_of(desired, "ns/a", "ingress")]
    sets = [r for r in chain if "--match-set pf-t4ia" in r]
    assert len(sets) == 3  # Accept, Deny, Pass: one lookup each, whatever the rule count
    assert "-g PF-LD" in next(r for r in sets if "pf-t4iad" in r)
    assert "-g PF-LA" in next(r for r in sets if "pf-t4iaa" in r)
    assert "PF-L" not in next(r for r in sets if "pf-t4iap" in r)
    assert not any(n.policy == "delegate" for n in desired.rule_names.values())
    view = flow_view(
        {"ns/a": (10, (ipaddress.ip_address("10.1.0.1"),))}, {10}, desired.rule_names, {},
        {("ns/a", "ingress", False): tiered}, endpoint_state.identities,
    )  # fmt: skip

    def named(verdict: FlowVerdict, source: str, port: int) -> tuple[str, str, str]:
        ref = rule_ref(RuleName("ingress", "admin", "", SET_RULE))
        payload = _ipv4(6, source, "10.1.0.1", struct.pack(">HH", 40000, port) + b"\0" * 16)
        packet = nflog.decode_packet(
            {nflog.NFULA_PREFIX: nflog_prefix(verdict, ref).encode() + b"\0", nflog.NFULA_PAYLOAD: payload}
        )
        record = record_of(packet, view)
        assert record is not None
        return record.tier, record.policy, record.rule

    assert named(FlowVerdict.DENIED, "10.9.1.5", 22) == ("admin", "no-ssh-lab", "deny-lab")
    assert named(FlowVerdict.ALLOWED, "10.9.2.5", 22) == ("admin", "ssh", "allow-ssh")
    assert named(FlowVerdict.ALLOWED, "10.9.2.5", 443) == ("admin", "tls", "allow-tls")


def _ipv4(protocol: int, source: str, destination: str, l4: bytes, fragment: int = 0) -> bytes:
    header = struct.pack(
        ">BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 1, fragment, 64, protocol, 0,
        socket.inet_aton(source), socket.inet_aton(destination),
    )  # fmt: skip
    return header + l4


def test_packets_decode_to_their_five_tuple() -> None:
    tcp = _ipv4(6, "10.1.0.1", "10.1.0.2", struct.pack(">HH", 40000, 80) + b"\0" * 16)
    assert decode_tuple(tcp) == decode_tuple(tcp[:24])  # the ports are all it needs
    parsed = decode_tuple(tcp)
    assert parsed is not None
    assert (parsed.protocol, parsed.source, parsed.source_port, parsed.destination_port) == (
        6,
        "10.1.0.1",
        40000,
        80,
    )
    icmp = decode_tuple(_ipv4(1, "10.1.0.1", "10.1.0.2", bytes([8, 0, 0, 0])))
    assert icmp is not None and (icmp.source_port, icmp.destination_port) == (8, 0)
    later = decode_tuple(_ipv4(17, "10.1.0.1", "10.1.0.2", b"\x01\x02\x03\x04", fragment=100))
    assert later is not None and (later.source_port, later.destination_port) == (0, 0)
    # IPv6 with a hop-by-hop header before UDP
    source, destination = ipaddress.IPv6Address("fd00::1"), ipaddress.IPv6Address("fd00::2")
    hop = bytes([17, 0]) + b"\0" * 6
    udp = struct.pack(">HHHH", 5353, 53, 8, 0)
    six = (
        struct.pack(">IHBB", 6 << 28, len(hop + udp), 0, 64) + source.packed + destination.packed + hop + udp
    )
    parsed6 = decode_tuple(six)
    assert parsed6 is not None and (parsed6.protocol, parsed6.destination, parsed6.destination_port) == (
        17, "fd00::2", 53,
    )  # fmt: skip
    for garbage in (b"", b"\x45" * 10, b"\x60" * 20, b"\x41" + b"\0" * 40, b"\xff" * 60):
        assert decode_tuple(garbage) is None


def _record(packets: int = 1, source_port: int = 1000) -> FlowRecord:
    return FlowRecord(0, "ns/a", "ingress", 17, "10.1.0.1", "10.1.0.2", source_port, 53, FlowVerdict.DENIED,
                      packets=packets, bytes=100 * packets)  # fmt: skip


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_denied_packets_are_summed_per_flow_and_reported_once_per_interval() -> None:
    clock = Clock()
    flows = DeniedFlows(interval_s=5.0, capacity=2, clock=clock)
    assert [r.packets for r in flows.add(_record())] == [1]  # the first packet: at once
    for _ in range(9):
        assert flows.add(_record()) == []
    assert flows.flush() == []  # within the interval
    clock.now = 5.0
    [summed] = flows.flush()
    assert (summed.packets, summed.bytes) == (9, 900)
    assert flows.flush() == []
    clock.now = 20.0
    assert flows.flush() == [] and len(flows) == 0  # quiet for two intervals: forgotten
    # full: the least recently seen flow is reported with what it has pending, and forgotten
    flows.add(_record(source_port=1))
    flows.add(_record(source_port=1))
    flows.add(_record(source_port=2))
    due = flows.add(_record(source_port=3))
    assert [(r.source_port, r.packets) for r in due] == [(1, 1), (3, 1)] and len(flows) == 2


def test_an_allowed_flow_logged_again_within_the_window_is_one_record() -> None:
    clock = Clock()
    allowed = AllowedFlows(window_s=30.0, capacity=2, clock=clock)
    assert allowed.first(_record()) and not allowed.first(_record())
    assert allowed.first(_record(source_port=2))
    clock.now = 31.0
    assert allowed.first(_record())


def _message(sequence: int, prefix: bytes, payload: bytes, indev: int = 0) -> bytes:
    attributes = (
        nflog._attribute(nflog.NFULA_PREFIX, prefix + b"\0")
        + nflog._attribute(nflog.NFULA_PAYLOAD, payload)
        + nflog._attribute(nflog.NFULA_SEQ, struct.pack(">I", sequence))
        + nflog._attribute(nflog.NFULA_IFINDEX_INDEV, struct.pack(">I", indev))
    )
    body = struct.pack("=BBH", socket.AF_INET, 0, socket.htons(GROUP)) + attributes
    kind = (nflog.NFNL_SUBSYS_ULOG << 8) | nflog.NFULNL_MSG_PACKET
    return struct.pack("=IHHII", 16 + len(body), kind, 0, 0, 0) + body


def test_netlink_messages_decode_and_sequence_gaps_count_as_lost() -> None:
    reader = object.__new__(nflog.NflogReader)  # the decoder alone: no socket
    reader.lost = reader.malformed = 0
    reader._next_seq = None
    payload = _ipv4(6, "10.1.0.1", "10.1.0.2", struct.pack(">HH", 40000, 80))
    ref = rule_ref(RuleName("egress", "networkpolicy", "ns/web", "egress[0]"))
    prefix = nflog_prefix(FlowVerdict.ALLOWED, ref).encode()
    data = (
        _message(7, prefix, payload, indev=10) + _message(8, prefix, payload) + _message(12, prefix, payload)
    )
    packets = list(reader._decode(data))
    assert len(packets) == 3 and reader.lost == 3 and packets[0].indev == 10 and packets[0].length == 24
    # a truncated message: counted, nothing raised, the whole ones kept
    reader._next_seq = None
    assert len(list(reader._decode(data[:-3]))) == 2 and reader.malformed == 1
    view = FlowView({10: "ns/a"}, {}, {ref: RuleName("egress", "networkpolicy", "ns/web", "egress[0]")})
    record = record_of(packets[0], view)
    assert record is not None
    assert (record.endpoint, record.direction, record.policy, record.rule, record.rule_ref) == (
        "ns/a", "egress", "ns/web", "egress[0]", ref,
    )  # fmt: skip
    assert (
        record_of(nflog.decode_packet({nflog.NFULA_PREFIX: b"other\0", nflog.NFULA_PAYLOAD: payload}), view)
        is None
    )


@pytest.mark.parametrize("group", [-1, 65536])
def test_a_group_out_of_range_is_refused(group: int) -> None:
    with pytest.raises(ValueError):
        nflog.NflogReader(group)


def test_no_policy_and_unselected_pods_compile_as_before_when_off() -> None:
    endpoint = Endpoint("ns/c", (ipaddress.ip_address("10.0.0.3"),), ifindex=10)
    off = compile_state(NodeState(1, {"ns/c": endpoint}), IFACES)
    assert "PF-L" not in repr(off.chains) and off.rule_names == {}


def test_the_deny_log_takes_the_denied_records_of_the_feed(caplog: pytest.LogCaptureFixture) -> None:
    logger = FlowLogger()
    with caplog.at_level(logging.INFO, logger="podfence.flow"):
        logger.handle_record(_record())
    assert logger.logged == 1
    assert "denied UDP 10.1.0.1:1000 -> 10.1.0.2:53 ingress ns/a" in caplog.text


def test_records_off_poll_waits_instead_of_spinning() -> None:
    dataplane = IptablesDataplane()  # no kernel touched: flow_group 0
    started = time.monotonic()
    assert dataplane.poll_flows(50) == [] and dataplane.poll_flows(50) == []
    assert time.monotonic() - started >= 0.09
    assert dataplane.flows_lost() == 0 and dataplane.events_lost() == 0 and dataplane.denied_unlogged() == 0


def test_another_group_is_another_log_chain_and_endpoint_chain() -> None:
    allow = DirectionPolicy(
        True, (Allow(CidrPeer(ipaddress.ip_network("10.9.0.0/16")), 6, 80, 80, "ns/web"),)
    )
    one = compile_state(state(allow), IFACES, flow_group=GROUP)
    other = compile_state(state(allow), IFACES, flow_group=GROUP + 1)
    assert not {c for c in one.chains[4] if c.startswith("PF-L")} & {
        c for c in other.chains[4] if c.startswith("PF-L")
    }
    assert chain_of(one, "ns/a", "ingress") != chain_of(other, "ns/a", "ingress")
    assert one.rule_names == other.rule_names  # the same rules, logged elsewhere


class _ReaderAcrossAnApply:
    """Stands in for the NFLOG socket (nflog.NflogReader.read): while the poll waits, an apply
    publishes a view naming its new rule, and a packet that rule logged comes in."""

    lost = 0

    def __init__(self, source: FlowSource, view: FlowView, packet: nflog.NflogPacket) -> None:
        self._source, self._view, self._packet = source, view, packet

    def read(self, timeout_ms: int) -> list[nflog.NflogPacket]:
        self._source.view = self._view
        return [self._packet]


def test_a_packet_logged_by_rules_applied_during_the_poll_is_named_by_them() -> None:
    """Named with the view of when it arrived: with the one of before the wait its rule was
    unknown, the record had no direction and the control service refused it."""
    rule = RuleName("egress", "admin", "staged", "no-http")
    ref = rule_ref(rule)
    payload = _ipv4(6, "10.1.0.1", "10.1.0.2", struct.pack(">HH", 40000, 80))
    packet = nflog.decode_packet({
        nflog.NFULA_PREFIX: nflog_prefix(FlowVerdict.AUDIT_DENIED, ref).encode() + b"\0",
        nflog.NFULA_PAYLOAD: payload, nflog.NFULA_IFINDEX_INDEV: struct.pack(">I", 10),
    })  # fmt: skip
    source = FlowSource(GROUP)
    source._reader = _ReaderAcrossAnApply(source, FlowView({10: "ns/a"}, {}, {ref: rule}), packet)  # type: ignore[assignment]
    [record] = source.poll_flows(200)
    assert (record.endpoint, record.direction, record.tier, record.policy, record.rule) == (
        "ns/a", "egress", "admin", "staged", "no-http",
    )  # fmt: skip
