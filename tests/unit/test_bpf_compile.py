"""The eBPF dataplane compiler as state lists: NodeState in, desired map contents out (no root)."""

from __future__ import annotations

import ipaddress
import random

import pytest

from agent.dataplane.bpf.cidr_classes import cidr_classes_of
from agent.dataplane.bpf.compiler import (
    NOT_ISOLATED,
    Allocation,
    compile_node_state,
    port_range_prefixes,
)
from agent.dataplane.bpf.structs import (
    EP_INGRESS_AUDIT,
    POLICY_PREFIX_ANY_PROTOCOL,
    POLICY_PREFIX_PROTOCOL,
    PeerKind,
    addr_bytes,
    network_prefix,
)
from agent.dataplane.types import (
    Allow,
    CidrPeer,
    DirectionPolicy,
    Endpoint,
    IdentityPeer,
    IPAddress,
    NodeState,
)

OPEN = DirectionPolicy()
net = ipaddress.ip_network
addr = ipaddress.ip_address


def covered(blocks: tuple[tuple[int, int], ...]) -> set[int]:
    ports: set[int] = set()
    for value, bits in blocks:
        size = 1 << (16 - bits)
        assert value % size == 0, "a prefix block must be aligned"
        ports.update(range(value, value + size))
    return ports


@pytest.mark.parametrize(
    ("first", "last"), [(0, 65535), (80, 80), (1000, 2000), (1, 65534), (0, 0), (65535, 65535), (1024, 2047)]
)
def test_port_range_prefixes_cover_exactly_the_range(first: int, last: int) -> None:
    blocks = port_range_prefixes(first, last)
    assert covered(blocks) == set(range(first, last + 1))
    assert len(blocks) <= 30


def test_port_range_prefixes_random_ranges_stay_exact_and_bounded() -> None:
    rng = random.Random(4)
    for _ in range(200):
        first = rng.randrange(65536)
        last = rng.randrange(first, 65536)
        blocks = port_range_prefixes(first, last)
        assert covered(blocks) == set(range(first, last + 1))
        assert len(blocks) <= 30


def test_port_range_rejects_inverted_range() -> None:
    with pytest.raises(ValueError):
        port_range_prefixes(10, 9)


def longest_match_class(classes: dict, address: IPAddress) -> frozenset:
    matches = [p for p in classes if p.version == address.version and address in p]
    if not matches:
        return frozenset()
    return classes[max(matches, key=lambda p: p.prefixlen)]


def test_cidr_classes_give_each_address_exactly_the_peers_containing_it() -> None:
    first = CidrPeer(net("10.0.0.0/8"), (net("10.1.0.0/16"),))
    second = CidrPeer(net("10.1.0.0/16"), (net("10.1.2.0/24"),))
    third = CidrPeer(net("10.1.2.3/32"))
    classes = cidr_classes_of([first, second, third])
    for text in ("10.0.0.1", "10.1.0.1", "10.1.2.1", "10.1.2.3", "11.0.0.1", "10.255.255.255"):
        address = addr(text)
        expected = {
            p
            for p in (first, second, third)
            if address in p.cidr and not any(address in e for e in p.excepts)
        }
        assert longest_match_class(classes, address) == expected, text


def test_except_of_another_peer_does_not_remove_an_address() -> None:
    wide = CidrPeer(net("10.0.0.0/8"))
    carved = CidrPeer(net("10.0.0.0/8"), (net("10.9.0.0/16"),))
    classes = cidr_classes_of([wide, carved])
    assert longest_match_class(classes, addr("10.9.0.1")) == {wide}
    assert longest_match_class(classes, addr("10.8.0.1")) == {wide, carved}


def test_an_ipv6_prefix_over_the_v4_mapped_space_is_never_an_ipv4_address_longest_match() -> None:
    everywhere6 = CidrPeer(net("::/0"))
    ten = CidrPeer(net("10.0.0.0/8"))
    classes = cidr_classes_of([everywhere6, ten])

    def datapath_match(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> frozenset:
        """The longest match in the datapath's single space, where IPv4 is v4-mapped."""
        value = int.from_bytes(addr_bytes(address), "big")
        matches = []
        for prefix in classes:
            length, raw = network_prefix(prefix)
            if value >> (128 - length) == int.from_bytes(raw, "big") >> (128 - length):
                matches.append((length, prefix))
        return classes[max(matches, key=lambda match: match[0])[1]] if matches else frozenset()

    assert datapath_match(addr("192.0.2.1")) == frozenset()
    assert datapath_match(addr("10.1.2.3")) == {ten}
    assert datapath_match(addr("2001:db8::1")) == {everywhere6}


def endpoint(
    key: str,
    ip: str,
    ifindex: int | None,
    ingress: DirectionPolicy = OPEN,
    egress: DirectionPolicy = OPEN,
) -> Endpoint:
    return Endpoint(key, (addr(ip),), ingress, egress, ifindex)


def iso(*allows: Allow) -> DirectionPolicy:
    return DirectionPolicy(True, allows)


def test_identical_allow_lists_share_one_policy_id_across_endpoints_and_directions() -> None:
    rules = iso(Allow(IdentityPeer(1), 6, 80, 80))
    state = NodeState(
        1,
        {
            "ns/a": endpoint("ns/a", "10.0.0.1", 5, ingress=rules),
            "ns/b": endpoint("ns/b", "10.0.0.2", 6, egress=rules),
            "ns/c": endpoint("ns/c", "10.0.0.3", 7),
        },
        {1: (addr("10.0.0.9"),)},
    )
    desired = compile_node_state(state)
    a, b, c = desired.endpoints[5], desired.endpoints[6], desired.endpoints[7]
    assert a.ingress_policy_id == b.egress_policy_id != NOT_ISOLATED
    assert a.egress_policy_id == b.ingress_policy_id == NOT_ISOLATED
    assert (c.ingress_policy_id, c.egress_policy_id) == (NOT_ISOLATED, NOT_ISOLATED)
    class_id = desired.ipcache[addr_bytes(addr("10.0.0.9"))]
    assert desired.policy == {
        (POLICY_PREFIX_PROTOCOL + 16, a.ingress_policy_id, class_id, PeerKind.IDENTITY, 6, 80): 1
    }


def test_isolated_without_allows_has_a_policy_id_but_no_entries() -> None:
    state = NodeState(1, {"ns/a": endpoint("ns/a", "10.0.0.1", 5, ingress=iso())})
    desired = compile_node_state(state)
    assert desired.endpoints[5].ingress_policy_id != NOT_ISOLATED
    assert desired.policy == {}


def test_protocol_any_is_one_short_prefix_and_cidr_excepts_become_class_zero() -> None:
    peer = CidrPeer(net("192.168.0.0/16"), (net("192.168.1.0/24"),))
    state = NodeState(1, {"ns/a": endpoint("ns/a", "10.0.0.1", 5, egress=iso(Allow(peer)))})
    desired = compile_node_state(state)
    policy_id = desired.endpoints[5].egress_policy_id
    outer = desired.cidr[network_prefix(net("192.168.0.0/16"))]
    assert desired.cidr[network_prefix(net("192.168.1.0/24"))] == 0
    assert desired.policy == {(POLICY_PREFIX_ANY_PROTOCOL, policy_id, outer, PeerKind.CIDR, 0, 0): 1}


def test_only_referenced_identities_reach_the_ipcache_and_shared_addresses_get_a_combined_class() -> None:
    state = NodeState(
        1,
        {
            "ns/a": endpoint(
                "ns/a", "10.0.0.1", 5, ingress=iso(Allow(IdentityPeer(1)), Allow(IdentityPeer(2)))
            )
        },
        {1: (addr("10.0.0.7"), addr("10.0.0.8")), 2: (addr("10.0.0.8"),), 3: (addr("10.0.0.9"),)},
    )
    desired = compile_node_state(state)
    assert set(desired.ipcache) == {addr_bytes(addr("10.0.0.7")), addr_bytes(addr("10.0.0.8"))}
    classes = desired.allocation.identity_classes
    assert desired.ipcache[addr_bytes(addr("10.0.0.8"))] == classes[frozenset({1, 2})]
    assert desired.ipcache[addr_bytes(addr("10.0.0.7"))] == classes[frozenset({1})]


def test_endpoints_without_interface_are_not_programmed_but_every_pod_interface_is_guarded() -> None:
    state = NodeState(1, {"ns/a": endpoint("ns/a", "10.0.0.1", None)}, pod_interfaces=frozenset({5, 9}))
    desired = compile_node_state(state)
    assert desired.endpoints == {}
    assert desired.interfaces == {5, 9}


def test_unchanged_content_keeps_its_ids_and_new_content_never_reuses_one() -> None:
    rules_a = iso(Allow(IdentityPeer(1), 6, 80, 80))
    rules_b = iso(Allow(IdentityPeer(1), 6, 443, 443))
    identities: dict[int, tuple[IPAddress, ...]] = {1: (addr("10.0.0.7"),)}
    first = compile_node_state(
        NodeState(1, {"ns/a": endpoint("ns/a", "10.0.0.1", 5, ingress=rules_a)}, identities)
    )
    second = compile_node_state(
        NodeState(2, {"ns/a": endpoint("ns/a", "10.0.0.1", 5, ingress=rules_b)}, identities), first.allocation
    )
    third = compile_node_state(
        NodeState(3, {"ns/a": endpoint("ns/a", "10.0.0.1", 5, ingress=rules_b)}, identities),
        second.allocation,
    )
    # every reader of the old list moved to the new one: it keeps the id (entries change in place)
    assert second.endpoints[5].ingress_policy_id == first.endpoints[5].ingress_policy_id
    assert third.endpoints[5] == second.endpoints[5]
    assert third.policy == second.policy
    assert second.endpoints[5].endpoint_id == first.endpoints[5].endpoint_id  # counters slot kept
    # without inheritance (what the double buffer needs), new content gets a never-used id
    fresh = compile_node_state(
        NodeState(2, {"ns/a": endpoint("ns/a", "10.0.0.1", 5, ingress=rules_b)}, identities),
        first.allocation,
        inherit=False,
    )
    assert fresh.endpoints[5].ingress_policy_id >= first.allocation.next_id
    assert fresh.allocation.next_id > first.allocation.next_id


def test_a_changed_list_keeps_its_id_only_when_all_its_readers_move_together() -> None:
    rules_a = iso(Allow(IdentityPeer(1), 6, 80, 80))
    rules_b = iso(Allow(IdentityPeer(1), 6, 443, 443))
    rules_c = iso(Allow(IdentityPeer(1), 6, 22, 22))
    two = {
        "ns/a": endpoint("ns/a", "10.0.0.1", 5, ingress=rules_a),
        "ns/b": endpoint("ns/b", "10.0.0.2", 6, ingress=rules_a),
    }
    first = compile_node_state(NodeState(1, two))
    split = {
        "ns/a": endpoint("ns/a", "10.0.0.1", 5, ingress=rules_b),
        "ns/b": endpoint("ns/b", "10.0.0.2", 6, ingress=rules_c),
    }
    second = compile_node_state(NodeState(2, split), first.allocation)
    old_id = first.endpoints[5].ingress_policy_id
    assert old_id not in (second.endpoints[5].ingress_policy_id, second.endpoints[6].ingress_policy_id)


def test_allocation_default_is_empty() -> None:
    assert Allocation().next_id == 1


def test_dual_stack_cidr_peers_compile_and_stay_per_family() -> None:
    v4 = CidrPeer(net("10.0.0.0/8"), (net("10.1.0.0/16"),))
    v6 = CidrPeer(net("fd00::/48"), (net("fd00:0:0:1::/64"),))
    state = NodeState(1, {"ns/a": endpoint("ns/a", "10.0.0.1", 5, egress=iso(Allow(v4), Allow(v6)))})
    desired = compile_node_state(state)
    assert desired.cidr[network_prefix(net("10.1.0.0/16"))] == 0
    assert desired.cidr[network_prefix(net("fd00:0:0:1::/64"))] == 0
    assert desired.cidr[network_prefix(net("10.0.0.0/8"))] != desired.cidr[network_prefix(net("fd00::/48"))]


def simulated_datapath_allows(desired, policy_id: int, peer, protocol: int, port: int) -> bool:  # type: ignore[no-untyped-def]
    """What bpf/lib/policy.h answers for these maps: ipcache + CIDR LPM, then policy LPM."""
    raw = addr_bytes(peer)
    value = int.from_bytes(raw, "big")
    cidr_matches = [
        (plen, cls)
        for (plen, prefix), cls in desired.cidr.items()
        if value >> (128 - plen) == int.from_bytes(prefix, "big") >> (128 - plen)
    ]
    cidr_class = max(cidr_matches)[1] if cidr_matches else 0
    for kind, class_id in ((PeerKind.IDENTITY, desired.ipcache.get(raw, 0)), (PeerKind.CIDR, cidr_class)):
        if not class_id:
            continue
        for plen, pid, cls, entry_kind, entry_protocol, entry_port in desired.policy:
            if (pid, cls, entry_kind) != (policy_id, class_id, kind):
                continue
            if plen == POLICY_PREFIX_ANY_PROTOCOL:
                return True
            bits = plen - POLICY_PREFIX_PROTOCOL
            if entry_protocol == protocol and port >> (16 - bits) == entry_port >> (16 - bits):
                return True
    return False


def reference_allows(allows, identities, peer, protocol: int, port: int) -> bool:  # type: ignore[no-untyped-def]
    for allow in allows:
        if isinstance(allow.peer, IdentityPeer):
            matched = peer in identities.get(allow.peer.identity, ())
        else:
            matched = (
                peer.version == allow.peer.cidr.version
                and peer in allow.peer.cidr
                and not any(peer.version == e.version and peer in e for e in allow.peer.excepts)
            )
        if matched and (
            allow.protocol == 0
            or (allow.protocol == protocol and allow.port_first <= port <= allow.port_last)
        ):
            return True
    return False


def test_compiled_maps_answer_like_the_allow_lists_on_random_states() -> None:
    rng = random.Random(20261122)
    pool = [addr(f"10.{a}.{b}.{c}") for a in (0, 1) for b in (0, 5) for c in (1, 9)]
    pool += [addr(f"fd00:{a}::{c}") for a in (0, 1) for c in (1, 9)]
    prefixes = [
        net("10.0.0.0/8"),
        net("10.1.0.0/16"),
        net("10.1.5.0/24"),
        net("10.0.0.9/32"),
        net("fd00::/16"),
        net("fd00:1::/32"),
        net("0.0.0.0/0"),
    ]
    outcomes = {True: 0, False: 0}
    for _ in range(60):
        identities = {i: tuple(rng.sample(pool, rng.randint(0, 4))) for i in range(1, 5)}
        allows = []
        for _ in range(rng.randint(0, 5)):
            if rng.random() < 0.5:
                peer: IdentityPeer | CidrPeer = IdentityPeer(rng.randint(1, 5))
            else:
                cidr = rng.choice(prefixes)
                excepts = tuple(
                    p
                    for p in prefixes
                    if p != cidr and p.version == cidr.version and p.subnet_of(cidr) and rng.random() < 0.5  # type: ignore[arg-type]
                )
                peer = CidrPeer(cidr, excepts)
            protocol = rng.choice([0, 6, 17, 132])
            first = rng.randint(0, 70)
            allows.append(Allow(peer, protocol, first, rng.randint(first, 80)) if protocol else Allow(peer))
        state = NodeState(1, {"ns/a": endpoint("ns/a", "10.9.9.9", 5, ingress=iso(*allows))}, identities)
        desired = compile_node_state(state)
        policy_id = desired.endpoints[5].ingress_policy_id
        for _ in range(60):
            probe = rng.choice(pool)
            protocol = rng.choice([1, 6, 17, 132])
            port = 0 if protocol == 1 else rng.randint(0, 90)
            expected = reference_allows(allows, identities, probe, protocol, port)
            outcomes[expected] += 1
            assert simulated_datapath_allows(desired, policy_id, probe, protocol, port) == expected, (
                allows,
                identities,
                probe,
                protocol,
                port,
            )
    assert outcomes[True] > 100 and outcomes[False] > 100  # both verdicts were exercised


def test_only_ingress_audit_views_reach_the_kernel() -> None:
    """The kernel judges ingress audit views (pf_audit[endpoint slot], PF_EP_INGRESS_AUDIT); the
    agent judges egress ones from the flow's record, so they get no slot, flag or policy id."""
    view, egress_view = iso(Allow(IdentityPeer(1), 6, 80, 80)), iso(Allow(IdentityPeer(2)))
    state = NodeState(
        1,
        {
            "ns/a": endpoint("ns/a", "10.0.0.1", 5, ingress=DirectionPolicy(audit=view)),
            "ns/b": endpoint("ns/b", "10.0.0.2", 6, egress=DirectionPolicy(audit=egress_view)),
        },
        {1: (addr("10.0.0.9"),), 2: (addr("10.0.0.8"),)},
    )
    desired = compile_node_state(state)
    a, b = desired.endpoints[5], desired.endpoints[6]
    assert a.flags & EP_INGRESS_AUDIT and not b.flags & 0x20  # 0x20: once PF_EP_EGRESS_AUDIT
    plain = compile_node_state(NodeState(1, {"ns/b": endpoint("ns/b", "10.0.0.2", 6)}))
    assert b.flags == plain.endpoints[6].flags
    (audit_id, _) = desired.audit[a.endpoint_id]
    assert desired.audit == {a.endpoint_id: (audit_id, 0)}
    assert {key[1] for key in desired.policy} == {audit_id}  # no entries for b's egress view
    assert addr_bytes(addr("10.0.0.8")) not in desired.ipcache
