"""The periodic hook check (HookGuard) and the iptables script that puts the hooks back first."""

from __future__ import annotations

import logging
import threading

import pytest
from prometheus_client import CollectorRegistry

from agent.dataplane.base import EndpointCounters, HookRepairing, TemporaryDataplaneError
from agent.dataplane.iptables import kernel
from agent.dataplane.iptables.layout import HOOK, HOOKS
from agent.dataplane.types import NodeState
from agent.node.hookguard import HookGuard
from agent.node.metrics import register_agent_metrics
from agent.node.reconcile import Reconciler


class RepairingDouble:
    """A dataplane whose hooks another tool displaces when the test says so."""

    name = "repairing-double"

    def __init__(self) -> None:
        self.displaced: list[str] = []
        self.fail = False
        self.checks = 0

    def start(self) -> None: ...

    def apply(self, state: NodeState) -> None: ...

    def counters(self) -> list[EndpointCounters]:
        return []

    def close(self) -> None: ...

    def teardown(self) -> None: ...

    def repair_hooks(self) -> list[str]:
        self.checks += 1
        if self.fail:
            raise TemporaryDataplaneError("xtables lock busy")
        repaired, self.displaced = self.displaced, []
        return repaired


def test_repairs_are_counted_and_only_the_first_is_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    dataplane = RepairingDouble()
    assert isinstance(dataplane, HookRepairing)
    guard = HookGuard(dataplane)
    caplog.set_level(logging.DEBUG, logger="agent.node.hookguard")
    assert guard.check_once() == [] and guard.repairs == 0
    dataplane.displaced = ["ipv4 FORWARD", "ipv6 FORWARD"]
    assert guard.check_once() == ["ipv4 FORWARD", "ipv6 FORWARD"]
    dataplane.displaced = ["ipv4 INPUT"]
    guard.check_once()
    assert guard.repairs == 3
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "ipv4 FORWARD" in warnings[0].getMessage()
    assert any(r.levelno == logging.DEBUG and "ipv4 INPUT" in r.getMessage() for r in caplog.records)


def test_a_failed_check_is_logged_and_the_next_one_runs() -> None:
    dataplane = RepairingDouble()
    dataplane.fail = True
    guard = HookGuard(dataplane, interval_s=0.01)
    stop = threading.Event()
    thread = threading.Thread(target=guard.run, args=(stop,))
    thread.start()
    try:
        while dataplane.checks < 3:
            stop.wait(0.01)
        dataplane.fail = False
        dataplane.displaced = ["ipv4 FORWARD"]
        while guard.repairs == 0:
            stop.wait(0.01)
    finally:
        stop.set()
        thread.join(5)
    assert not thread.is_alive() and guard.repairs == 1


class _NoDiscovery:
    def scan(self):  # pragma: no cover - never reached: nothing is applied
        raise AssertionError

    def scan_links(self):  # pragma: no cover
        raise AssertionError

    def resolve(self, ip, view):  # pragma: no cover
        raise AssertionError

    def mac_of(self, ifindex, view):  # pragma: no cover
        raise AssertionError


def test_repairs_are_exposed_as_a_counter() -> None:
    dataplane = RepairingDouble()
    guard = HookGuard(dataplane)
    registry = CollectorRegistry()
    register_agent_metrics(registry, dataplane, Reconciler(dataplane, _NoDiscovery()), None, guard)
    assert registry.get_sample_value("podfence_hook_repairs_total") == 0
    dataplane.displaced = ["ipv4 FORWARD"]
    guard.check_once()
    assert registry.get_sample_value("podfence_hook_repairs_total") == 1


def _table(forward: list[str], input_: list[str]) -> kernel.FilterTable:
    table = kernel.FilterTable(chains={"INPUT", "FORWARD", "OUTPUT", *HOOKS.values()})
    for chain, specs in (("FORWARD", forward), ("INPUT", input_)):
        table.rules += [kernel.Rule(chain, spec, 0, 0) for spec in specs]
    return table


HOOK_FWD = f'-m comment --comment "{HOOK}" -j {HOOKS["FORWARD"]}'
HOOK_IN = f'-m comment --comment "{HOOK}" -j {HOOKS["INPUT"]}'


def test_hooks_in_first_place_need_no_script() -> None:
    assert kernel.hooks_first_script(_table([HOOK_FWD, "-j ACCEPT"], [HOOK_IN]), HOOKS) == ""


def test_a_rule_above_the_hook_moves_the_hook_back_in_one_commit_without_touching_it() -> None:
    script = kernel.hooks_first_script(_table(["-j ACCEPT", HOOK_FWD, "-j KUBE-FORWARD"], [HOOK_IN]), HOOKS)
    assert script.splitlines() == ["*filter", f"-D FORWARD {HOOK_FWD}", f"-I FORWARD 1 {HOOK_FWD}", "COMMIT"]


def test_a_missing_or_duplicated_hook_is_made_one_and_first() -> None:
    script = kernel.hooks_first_script(_table([HOOK_FWD, "-j ACCEPT", HOOK_FWD], []), HOOKS)
    lines = script.splitlines()
    assert lines.count(f"-D FORWARD {HOOK_FWD}") == 2 and lines[3] == f"-I FORWARD 1 {HOOK_FWD}"
    assert f"-I INPUT 1 {HOOK_IN}" in lines and not any(line.startswith("-D INPUT") for line in lines)
