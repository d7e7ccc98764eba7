"""`podfence inspect` on the bpf dataplane: a NodeState applied to real pinned maps, read back
from them by another process's view (the pins, the state file), compared with what was applied;
then one map entry tampered with the way root could (`bpftool map delete/update`), and the
difference reported, with the traffic showing the tampered entry is what the kernel enforces.
"""

from __future__ import annotations

import ctypes
import ipaddress
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from bcc import libbcc

from agent.dataplane.bpf.dataplane import BpfDataplane
from agent.dataplane.bpf.maps import htons, ntohs
from agent.dataplane.bpf.pinned import PinnedMap
from agent.dataplane.bpf.readback import read_endpoint
from agent.dataplane.readback import EndpointReadback, ProgrammedRule
from agent.dataplane.types import ACTION_DENY, TIER_ADMIN, Allow, CidrPeer, DirectionPolicy, TieredAllow
from tests.privileged import test_bpf_traffic
from tests.privileged.bpf_netns import Node
from tests.privileged.test_bpf_traffic import endpoint, from_pod, isolated, state

pytestmark = pytest.mark.needs("nsenter", "bpffs")  # and root (conftest.py)

TCP, UDP = 6, 17
REPO = Path(__file__).resolve().parents[2]

node, dataplane = test_bpf_traffic.node, test_bpf_traffic.dataplane  # three pods serving 8080, 9090


def apply_a_egress(node: Node, dataplane: BpfDataplane) -> None:
    """a may reach b on tcp/8080 and tcp/1000-2000 (identity), and 10.2.0.0/16 but c on udp/9090."""
    a, b, c = node.pods
    near = CidrPeer(ipaddress.ip_network("10.2.0.0/16"), (ipaddress.ip_network(f"{c.ip}/32"),))
    egress = isolated(
        from_pod(b, TCP, 8080, 8080), from_pod(b, TCP, 1000, 2000), Allow(near, UDP, 9090, 9090)
    )
    dataplane.apply(state(node, endpoint(a, egress=egress), endpoint(b), endpoint(c)))


def rules(readback: EndpointReadback, direction: str) -> list[ProgrammedRule]:
    (found,) = [d for d in readback.directions if d.direction == direction]
    return found.rules


def read(node: Node, key: str = "ns/pod1") -> EndpointReadback:
    return read_endpoint(node.pin_dir, Path(node.state_file), key)


def test_the_read_back_is_the_applied_allow_list_with_counters(node: Node, dataplane: BpfDataplane) -> None:
    a, b, c = node.pods
    apply_a_egress(node, dataplane)
    assert a.tcp(b.ip, 8080) and not a.tcp(c.ip, 8080)  # one allowed, one denied flow
    readback = read(node)
    assert readback.differences == []
    assert readback.ifindex == a.ifindex
    assert set(readback.addresses) == {a.ip, a.ip6}
    egress = {(r.protocol, r.ports): r for r in rules(readback, "egress")}
    assert set(egress) == {("tcp", "1000-2000, 8080"), ("udp", "9090")}, egress
    identity = egress[("tcp", "1000-2000, 8080")]
    assert b.ip in identity.peer and b.ip6 in identity.peer and c.ip not in identity.peer
    assert identity.meaning == "identities 102"
    cidr = egress[("udp", "9090")]
    assert "10.2.0.0/16" in cidr.peer and cidr.meaning == f"cidr 10.2.0.0/16 except {c.ip}/32"
    assert cidr.packets is None  # no per-entry counter: the direction's are given
    (egress_side,) = [d for d in readback.directions if d.direction == "egress"]
    assert egress_side.mode == "isolated"
    assert egress_side.allowed_packets > 0 and egress_side.denied_packets > 0
    (ingress_side,) = [d for d in readback.directions if d.direction == "ingress"]
    assert ingress_side.mode == "open" and ingress_side.rules == []
    # b has no restriction: nothing programmed, nothing differs
    assert read(node, "ns/pod2").differences == []


def _delete(pin_dir: str, name: str, key: Any) -> None:
    with PinnedMap(pin_dir, name) as table:
        assert libbcc.lib.bpf_delete_elem(table.fd, ctypes.byref(key)) == 0


def _tcp_8080_entry(pin_dir: str) -> Any:
    with PinnedMap(pin_dir, "pf_policy_exact") as table:
        (key,) = [k for k in table if k.protocol == TCP and ntohs(k.dport_be) == 8080]
    return key


def inspect(node: Node, key: str = "ns/pod1") -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "agent.cli", "inspect", "--dataplane", "bpf", "--pin-dir", node.pin_dir,
            "--state-file", node.state_file, "--pod", key, "--json"]  # fmt: skip
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=60, check=False)


def test_a_deleted_entry_is_reported_and_is_what_the_kernel_enforces(
    node: Node, dataplane: BpfDataplane
) -> None:
    a, b, _ = node.pods
    apply_a_egress(node, dataplane)
    clean = inspect(node)
    assert clean.returncode == 0, clean.stderr
    assert json.loads(clean.stdout)["differences"] == []
    assert a.tcp(b.ip, 8080)
    _delete(node.pin_dir, "pf_policy_exact", _tcp_8080_entry(node.pin_dir))
    assert not a.tcp(b.ip, 8080), "the lab must show the deleted entry is what allowed"
    (found,) = read(node).differences
    assert "egress" in found and "tcp 8080" in found and "missing in the kernel" in found, found
    tampered = inspect(node)
    assert tampered.returncode == 1
    shown = json.loads(tampered.stdout)
    assert shown["differences"] == [found]
    (egress,) = [d for d in shown["directions"] if d["direction"] == "egress"]
    assert {(r["protocol"], r["ports"]) for r in egress["rules"]} == {("tcp", "1000-2000"), ("udp", "9090")}


def test_a_stray_entry_is_reported(node: Node, dataplane: BpfDataplane) -> None:
    """An allow written into the maps by hand (another port for b's class) is not on record."""
    a, b, _ = node.pods
    apply_a_egress(node, dataplane)
    assert not a.tcp(b.ip, 9090)
    key = _tcp_8080_entry(node.pin_dir)
    key.dport_be = htons(9090)
    with PinnedMap(node.pin_dir, "pf_policy_exact") as table:
        value = table.value_type(1, 0)
        assert libbcc.lib.bpf_update_elem(table.fd, ctypes.byref(key), ctypes.byref(value), 0) == 0
    assert a.tcp(b.ip, 9090), "the lab must show the stray entry allows"
    (found,) = read(node).differences
    assert "tcp 9090" in found and "in the kernel but not recorded" in found, found


def test_tier_verdicts_and_audit_views_are_read_back(node: Node, dataplane: BpfDataplane) -> None:
    """c's ingress: an Admin-tier Deny of a on tcp/8080; b's ingress: open, with an audit view
    that would admit a only."""
    a, b, c = node.pods
    guardrail = TieredAllow(TIER_ADMIN, 0, ACTION_DENY, from_pod(a).peer, TCP, 8080, 8080)
    staged = DirectionPolicy(audit=isolated(from_pod(a)))
    dataplane.apply(
        state(
            node,
            endpoint(a),
            endpoint(b, ingress=staged),
            endpoint(c, ingress=DirectionPolicy(tiered=(guardrail,))),
        )
    )
    assert not a.tcp(c.ip, 8080) and a.tcp(c.ip, 9090)
    on_c = read(node, "ns/pod3")
    assert on_c.differences == []
    (ingress_c,) = [d for d in on_c.directions if d.direction == "ingress"]
    assert ingress_c.mode == "tiered"
    assert [(r.protocol, r.ports, r.action) for r in ingress_c.rules] == [("tcp", "8080", "admin#0 deny")]
    assert a.ip in ingress_c.rules[0].peer
    on_b = read(node, "ns/pod2")
    assert on_b.differences == []
    (ingress_b,) = [d for d in on_b.directions if d.direction == "ingress"]
    assert ingress_b.mode == "open"
    assert [(r.protocol, r.ports, r.action) for r in ingress_b.rules] == [("tcp", "any", "audit: allow")]
    assert any(note.startswith("audit view: policy id") for note in ingress_b.notes)


def test_the_read_back_stays_clean_across_updates(node: Node, dataplane: BpfDataplane) -> None:
    """Each apply builds the new peer generation beside the old one and flips the endpoints: the
    record and the kernel must agree after every step (no stale class or entry reported)."""
    a, b, c = node.pods
    apply_a_egress(node, dataplane)
    for version, port in ((2, 9090), (3, 7070)):
        grown = state(
            node,
            endpoint(a, egress=isolated(from_pod(b, TCP, 8080, 8080), from_pod(b, TCP, port, port))),
            endpoint(b),
            endpoint(c),
            version=version,
        )
        # identity 102 now also holds c's addresses: a new generation of the peer maps
        identities = {**grown.identities, 102: grown.identities[102] + grown.identities[103]}
        dataplane.apply(replace(grown, identities=identities))
        readback = read(node)
        assert readback.differences == [], (version, readback.differences)
        (rule,) = rules(readback, "egress")
        assert (
            rule.ports == f"{min(port, 8080)}, {max(port, 8080)}" and c.ip in rule.peer and b.ip in rule.peer
        )
    assert a.tcp(c.ip, 8080) and not a.tcp(c.ip, 9090)  # c serves 8080 and 9090; 9090 left the list
