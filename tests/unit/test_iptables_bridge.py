"""The iptables dataplane's layer-2 rules (bridge.py) without root: what compile_state puts into
the bridge family for bridged pod ports, and the scripts written to ebtables-nft-restore.

The frames themselves are tested in tests/privileged/test_l2_attacks.py.
"""

from __future__ import annotations

import ipaddress

from agent.dataplane.iptables import bridge
from agent.dataplane.iptables.compiler import compile_state
from agent.dataplane.iptables.kernel import BridgeTable, Rule
from agent.dataplane.iptables.layout import Interface
from agent.dataplane.types import Endpoint, NodeState

MAC = "02:00:00:00:00:05"
IFACES = {
    10: Interface(10, "veth-routed"),
    12: Interface(12, "veth-m", bridge="cni0"),
    13: Interface(13, "veth-unknown", bridge="cni0"),
}


def node(mac: str | None = MAC, unknown: bool = True) -> NodeState:
    ips = tuple(ipaddress.ip_address(a) for a in ("10.0.0.5", "fd00::5", "10.0.0.6"))
    endpoints = {
        "ns/m": Endpoint("ns/m", ips, ifindex=12, mac=mac),
        "ns/r": Endpoint("ns/r", (ipaddress.ip_address("10.0.1.1"),), ifindex=10, mac="02:00:00:00:00:01"),
    }
    return NodeState(1, endpoints, {}, (), frozenset({10, 12, 13} if unknown else {10, 12}))


def test_a_bridged_endpoint_gets_mac_binding_no_tags_and_arp_for_its_own_addresses() -> None:
    desired = compile_state(node(), IFACES).bridge
    (chain,) = desired.owners
    assert desired.owners == {chain: "ns/m"}
    assert chain.startswith(bridge.L2_PREFIX)
    assert desired.chains[bridge.L2_CHAIN] == [
        "-i veth-m -j " + chain,
        "-i veth-unknown -p 802_1Q -j DROP",  # a port no endpoint claims: at least no tags
        "-i veth-unknown -p 0x88a8 -j DROP",
    ]
    arp = "-p ARP --arp-htype 1 --arp-ptype 0x0800"
    assert desired.chains[chain] == [
        "-p 802_1Q -j DROP",
        "-p 0x88a8 -j DROP",
        f"-s ! {MAC} -j DROP",
        "-p ARP --mark 0x100000/0x100000 -j DROP",  # not address resolution's length (ARP_GUARD)
        f"{arp} --arp-op Request --arp-mac-src {MAC} --arp-ip-src 10.0.0.5 -j RETURN",
        f"{arp} --arp-op Reply --arp-mac-src {MAC} --arp-ip-src 10.0.0.5 -j RETURN",
        f"{arp} --arp-op Request --arp-mac-src {MAC} --arp-ip-src 10.0.0.6 -j RETURN",
        f"{arp} --arp-op Reply --arp-mac-src {MAC} --arp-ip-src 10.0.0.6 -j RETURN",
        f"{arp} --arp-op Request --arp-mac-src {MAC} --arp-ip-src 0.0.0.0 -j RETURN",
        "-p ARP -j DROP",
        "-p IPv4 -j RETURN",  # on to the IP verdict
        "-p IPv6 -j RETURN",
        "-j DROP",  # any other ethertype, and 802.3 length frames
    ]
    assert not any("veth-routed" in rule for rules in desired.chains.values() for rule in rules)


def test_unbound_mac_checks_tags_and_arp_addresses_only() -> None:
    rules = compile_state(node(mac=None), IFACES).bridge.chains
    endpoint_rules = next(r for c, r in rules.items() if c != bridge.L2_CHAIN)
    assert not any("-s !" in r or "--arp-mac-src" in r for r in endpoint_rules)
    assert (
        "-p ARP --arp-htype 1 --arp-ptype 0x0800 --arp-op Reply --arp-ip-src 10.0.0.5 -j RETURN"
        in endpoint_rules
    )


def test_unknown_ports_are_left_alone_when_unknown_endpoints_are_allowed() -> None:
    desired = compile_state(node(), IFACES, unknown_endpoints="allow").bridge
    assert not any("veth-unknown" in r for r in desired.chains[bridge.L2_CHAIN])


def test_chain_names_follow_the_rules() -> None:
    first = set(compile_state(node(), IFACES).bridge.owners)
    assert set(compile_state(node(), IFACES).bridge.owners) == first
    assert set(compile_state(node(mac="02:00:00:00:00:06"), IFACES).bridge.owners) != first


def test_no_bridged_port_no_bridge_rules() -> None:
    routed = compile_state(node(unknown=False), {10: IFACES[10], 12: Interface(12, "veth-m")}).bridge
    assert routed.chains == {bridge.L2_CHAIN: []} and routed.owners == {}


def rule(chain: str, spec: str, packets: int = 0) -> Rule:
    return Rule(chain, spec, packets, packets * 60)


def test_commit_builds_new_chains_deletes_stale_ones_and_puts_the_hook_first() -> None:
    desired = compile_state(node(), IFACES).bridge
    (chain,) = desired.owners
    empty = bridge.commit_script(desired, BridgeTable()).splitlines()
    assert empty[0] == "*nat" and empty[-1] == "COMMIT"
    assert f":{bridge.L2_CHAIN} RETURN" in empty and f":{chain} RETURN" in empty
    assert "-I PREROUTING 1 -j PF-L2" in empty
    # the hook below another tool's rule: moved back to the top; a stale chain flushed and deleted
    kernel = BridgeTable(
        {"PREROUTING", bridge.L2_CHAIN, chain, "PF-L2-old", "OTHER"},
        [rule("PREROUTING", "-i x -j ACCEPT"), rule("PREROUTING", "-j PF-L2"), rule(chain, "-p ARP -j DROP")],
    )
    script = bridge.commit_script(desired, kernel).splitlines()
    assert f":{chain} RETURN" not in script  # unchanged: not flushed, keeps its counters
    assert script.index(":PF-L2-old RETURN") < script.index("-X PF-L2-old")
    assert "-D PREROUTING -j PF-L2" in script and "-I PREROUTING 1 -j PF-L2" in script
    assert not any("OTHER" in line for line in script)
    # everything in place: no hook lines at all
    kernel.rules = [rule("PREROUTING", "-j PF-L2"), rule("PREROUTING", "-i x -j ACCEPT")]
    assert not any("PREROUTING" in line for line in bridge.commit_script(desired, kernel).splitlines())


def test_teardown_removes_only_podfences_hook_and_chains() -> None:
    kernel = BridgeTable(
        {"PREROUTING", "PF-L2", "PF-L2-aaaa-bbbb", "OTHER"},
        [rule("PREROUTING", "-i x -j OTHER"), rule("PREROUTING", "-j PF-L2")],
    )
    script = bridge.teardown_script(kernel).splitlines()
    assert script == [
        "*nat",
        ":PF-L2 RETURN",
        ":PF-L2-aaaa-bbbb RETURN",
        "-D PREROUTING -j PF-L2",
        "-X PF-L2",
        "-X PF-L2-aaaa-bbbb",
        "COMMIT",
    ]
    assert (
        bridge.teardown_script(BridgeTable({"PREROUTING", "OTHER"}, [rule("PREROUTING", "-j OTHER")])) == ""
    )


def test_drops_are_counted_per_endpoint() -> None:
    kernel = BridgeTable(
        {"PF-L2-a", "PF-L2-b"},
        [
            rule("PF-L2-a", "-p 802_1Q -j DROP", 2),
            rule("PF-L2-a", "-s ! 02:00:00:00:00:01 -j DROP", 3),
            rule("PF-L2-a", "-p ARP --arp-ip-src 10.0.0.1 -j RETURN", 50),  # admitted: no drop
            rule("PF-L2-b", "-p ARP -j DROP", 1),
            rule("PF-L2", "-i veth-u -p 802_1Q -j DROP", 7),  # no endpoint's
        ],
    )
    assert bridge.drops(kernel, {"PF-L2-a": "ns/a", "PF-L2-b": "ns/b"}) == {"ns/a": (5, 300), "ns/b": (1, 60)}


def test_hook_repair_puts_the_jump_back_first_and_only_where_the_chain_is() -> None:
    flushed = BridgeTable({"PREROUTING", "PF-L2"}, [rule("PREROUTING", "-i x -j ACCEPT")])
    assert bridge.hooks_script(flushed).splitlines() == ["*nat", "-I PREROUTING 1 -j PF-L2", "COMMIT"]
    assert bridge.hooks_script(BridgeTable({"PREROUTING"}, [])) == ""
    in_place = BridgeTable({"PREROUTING", "PF-L2"}, [rule("PREROUTING", "-j PF-L2")])
    assert bridge.hooks_script(in_place) == ""
