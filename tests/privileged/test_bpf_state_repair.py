"""The state check on the bpf dataplane: pieces removed by hand come back (agent/node/repair.py).

A node netns with three pod netns (bpf_netns.py). Each test removes one piece the way root in
the node's namespace would (`tc filter del`, `tc qdisc del ... clsact`, `rm` of a pin) and shows
enforcement back, and says whether a denied flow could pass in between: a removed tc filter or
qdisc opens its hook until the repair (the kernel offers no way to forbid it); a removed pin
opens nothing (the programs hold their maps).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from bcc import libbcc

from agent.dataplane import xtables
from agent.dataplane.bpf import attach, loader, verify
from agent.dataplane.bpf.dataplane import BpfDataplane
from agent.node.repair import StateGuard
from tests.privileged import test_bpf_traffic
from tests.privileged.bpf_netns import Node
from tests.privileged.netns_node import wait_until
from tests.privileged.test_bpf_traffic import endpoint, from_pod, isolated, state

pytestmark = pytest.mark.needs("nsenter", "bpffs")  # and root (conftest.py)

TCP = 6


node = test_bpf_traffic.node  # the fixture: a node netns with three pods serving 8080 and 9090


def _dataplane(node: Node, egress_hook: str) -> Iterator[BpfDataplane]:
    plane = BpfDataplane(node.settings(egress_hook=egress_hook))
    plane.start()
    try:
        yield plane
    finally:
        plane.teardown()


@pytest.fixture
def dataplane(node: Node) -> Iterator[BpfDataplane]:
    yield from _dataplane(node, "auto")


@pytest.fixture
def xt_dataplane(node: Node) -> Iterator[BpfDataplane]:
    yield from _dataplane(node, "iptables")


def b_isolated(node: Node, dataplane: BpfDataplane) -> None:
    """b admits a only: c -> b is the denied flow, a -> b the allowed one."""
    a, b, c = node.pods
    dataplane.apply(state(node, endpoint(a), endpoint(b, ingress=isolated(from_pod(a, TCP))), endpoint(c)))
    assert dataplane.repair_state() == [], "a fresh apply must verify clean"
    assert not c.tcp(b.ip, 8080) and a.tcp(b.ip, 8080)


@pytest.mark.parametrize("removal", ["filter", "clsact"])
def test_a_removed_tc_filter_or_clsact_is_put_back(node: Node, dataplane: BpfDataplane, removal: str) -> None:
    a, b, c = node.pods
    b_isolated(node, dataplane)
    if removal == "filter":
        node.run("tc", "filter", "del", "dev", b.host_if, "egress")
    else:
        node.run("tc", "qdisc", "del", "dev", b.host_if, "clsact")
    # Not defended: without the filter nothing judges b's ingress until the repair.
    assert c.tcp(b.ip, 8080), "the lab must show the removed piece is what filtered"
    found = dataplane.repair_state()
    kind = "tc_filter" if removal == "filter" else "clsact"
    assert [k for k, _ in found] == [kind], found
    assert str(b.ifindex) in found[0][1]
    assert not c.tcp(b.ip, 8080) and a.tcp(b.ip, 8080)
    assert dataplane.repair_state() == []


def test_a_filter_running_another_program_is_replaced(node: Node, dataplane: BpfDataplane) -> None:
    _a, b, c = node.pods
    b_isolated(node, dataplane)
    # Someone swaps another program in at podfence's priority and handle (here: our from-pod one).
    programs = {name: verify.object_id(dataplane._programs[name].fd)
                for name in (loader.PROGRAM_FROM_POD, loader.PROGRAM_TO_POD)}
    other = f"{node.pin_dir}/another_program"
    assert libbcc.lib.bpf_obj_pin(dataplane._programs[loader.PROGRAM_FROM_POD].fd, other.encode()) == 0
    node.run("tc", "filter", "replace", "dev", b.host_if, "egress", "pref", str(attach.TC_PRIORITY),
             "handle", "1", "bpf", "da", "object-pinned", other)
    os.unlink(other)
    found = dataplane.repair_state()
    assert found == [("tc_filter", f"interface {b.ifindex}: egress (to pod) filter runs program "
                                   f"{programs[loader.PROGRAM_FROM_POD]}, not ours")], found
    with attach.netlink(node.netns) as sock:
        assert verify._our_program_ids(sock, b.ifindex) == {
            attach.TC_PARENT_INGRESS: programs[loader.PROGRAM_FROM_POD],
            attach.TC_PARENT_EGRESS: programs[loader.PROGRAM_TO_POD],
        }
    assert not c.tcp(b.ip, 8080)


def test_the_guard_repairs_a_deleted_filter_on_the_tc_notification(
    node: Node, dataplane: BpfDataplane
) -> None:
    _a, b, c = node.pods
    b_isolated(node, dataplane)
    guard = StateGuard(dataplane, interval_s=60)  # the timer never fires here: only the event can
    stop = threading.Event()
    threads = [threading.Thread(target=guard.run, args=(stop,)),
               threading.Thread(target=guard.watch_tc, args=(stop, node.netns))]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.3)  # subscribed
        started = time.monotonic()
        node.run("tc", "filter", "del", "dev", b.host_if, "egress")
        assert wait_until(lambda: guard.by_kind["tc_filter"] >= 1, timeout=3), "no repair on the notification"
        elapsed = time.monotonic() - started
        assert not c.tcp(b.ip, 8080)
        assert "tc_filter" in guard.last and guard.repairs == 1
        print(f"filter back {elapsed * 1000:.0f} ms after `tc filter del` returned (incl. the tool's start)")
    finally:
        stop.set()
        for thread in threads:
            thread.join(5)


def test_the_guard_repairs_on_its_timer(node: Node, dataplane: BpfDataplane) -> None:
    _a, b, c = node.pods
    b_isolated(node, dataplane)
    guard = StateGuard(dataplane, interval_s=0.5)  # no notification listener: the timer alone
    stop = threading.Event()
    checker = threading.Thread(target=guard.run, args=(stop,))
    checker.start()
    try:
        node.run("tc", "qdisc", "del", "dev", b.host_if, "clsact")
        assert wait_until(lambda: guard.by_kind["clsact"] >= 1, timeout=2), "no repair within the interval"
        assert not c.tcp(b.ip, 8080)
        checks = guard.checks
        time.sleep(1.2)
        assert guard.checks > checks and guard.repairs == 1, "a clean check must repair nothing"
    finally:
        stop.set()
        checker.join(5)


def test_removed_map_pins_are_pinned_again_and_nothing_opens(node: Node, dataplane: BpfDataplane) -> None:
    a, b, c = node.pods
    b_isolated(node, dataplane)
    pins = Path(node.pin_dir)
    ids = {name: verify.pinned_id(str(pins / name)) for name in ("pf_endpoints", "pf_policy", "pf_ipcache")}
    for name in ids:
        (pins / name).unlink()
    # The programs hold their maps, not the pins: enforcement is unchanged in between.
    assert not c.tcp(b.ip, 8080) and a.tcp(b.ip, 8080)
    found = dataplane.repair_state()
    assert sorted(k for k, _ in found) == ["pin"] * 3, found
    assert {name: verify.pinned_id(str(pins / name)) for name in ids} == ids  # the same maps
    # Why it matters: a restarted agent adopts the pinned state instead of empty maps.
    dataplane.close()
    restarted = BpfDataplane(node.settings())
    restarted.start()
    try:
        assert restarted.adopted
        assert not c.tcp(b.ip, 8080) and a.tcp(b.ip, 8080)
    finally:
        restarted.close()


def test_the_egress_program_pin_of_the_iptables_hook_is_pinned_again(
    node: Node, xt_dataplane: BpfDataplane
) -> None:
    a, b, _c = node.pods
    xt_dataplane.apply(state(node, endpoint(a, egress=isolated()), endpoint(b), endpoint(node.pods[2])))
    assert not a.tcp(b.ip, 8080)
    (pin,) = [p for p in Path(node.pin_dir).iterdir() if p.name.startswith("nf_egress_")]
    pin.unlink()
    assert not a.tcp(b.ip, 8080)  # xt_bpf holds the program: nothing opens
    found = xt_dataplane.repair_state()
    assert found == [("pin", f"{pin}: missing")], found
    assert pin.exists()
    # an iptables-restore of the saved rules (a firewall reload) can open the path again
    saved = node.run(xtables.SAVE[4], "-t", "filter").stdout
    node.run("sh", "-c", f"printf '%s' '{saved}' | {xtables.RESTORE[4]}")
    assert not a.tcp(b.ip, 8080)
