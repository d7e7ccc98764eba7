"""Per-endpoint counters of the iptables dataplane across chain swaps, on a simulated filter table.

A policy change builds a new endpoint chain and deletes the old one, whose rule counters die with
it; the dataplane keeps what the old chain counted. Within one process a counter must never go
down, even for a scrape that runs while a swap is being committed (scrapes and the reconcile loop
are different threads).
"""

from __future__ import annotations

import ipaddress
import itertools
import threading
from dataclasses import replace

import pytest

from agent.dataplane.iptables import dataplane as iptables_dataplane
from agent.dataplane.iptables import kernel
from agent.dataplane.iptables.dataplane import IptablesDataplane
from agent.dataplane.iptables.layout import ALLOW, DENY, Interface
from agent.dataplane.types import Allow, DirectionPolicy, Endpoint, IdentityPeer, NodeState

POD = Endpoint("ns/a", (ipaddress.ip_address("10.0.0.1"),), ifindex=10)


def state(version: int, port: int, with_pod: bool = True) -> NodeState:
    ingress = DirectionPolicy(isolated=True, allows=(Allow(IdentityPeer(1), 6, port, port),))
    endpoint = replace(POD, ingress=ingress, ifindex=10 if with_pod else None)
    return NodeState(
        version=version,
        endpoints={endpoint.key: endpoint},
        identities={1: (ipaddress.ip_address("10.0.0.2"),)},
        pod_interfaces=frozenset({10}),
    )


class FakeFilterTables:
    """The filter tables of both families as iptables-legacy-restore --noflush would leave them."""

    def __init__(self) -> None:
        self.tables = {family: kernel.FilterTable(chains={"INPUT", "FORWARD", "OUTPUT"}) for family in (4, 6)}
        self.before_commit = lambda: None  # what happens while a commit is in progress

    def read(self, family: int) -> kernel.FilterTable:
        table = self.tables[family]
        return kernel.FilterTable(set(table.chains), list(table.rules))

    def restore(self, family: int, script: str) -> None:
        self.before_commit()
        table = self.tables[family]
        lines = script.splitlines()
        declared = {line[1:].split(" ", 1)[0] for line in lines if line.startswith(":")}
        deleted = {line.split()[1] for line in lines if line.startswith("-X ")}
        rules = [r for r in table.rules if r.chain not in declared]  # declared chains are flushed
        for line in lines:
            packets = byte_count = 0
            if line.startswith("["):
                counters, _, line = line.partition("] ")
                packets, byte_count = (int(n) for n in counters[1:].split(":"))
            if line.startswith("-A "):
                _, chain, spec = line.split(" ", 2)
                rules.append(kernel.Rule(chain, spec, packets, byte_count))
            elif line.startswith("-I "):  # "-I <chain> 1 <spec>": the hooks
                _, chain, _, spec = line.split(" ", 3)
                rules.insert(0, kernel.Rule(chain, spec, 0, 0))
            elif line.startswith("-D "):
                _, chain, spec = line.split(" ", 2)
                rules.remove(next(r for r in rules if (r.chain, r.spec) == (chain, spec)))
        self.tables[family] = kernel.FilterTable((table.chains | declared) - deleted, rules)

    def count(self, family: int, comment: str, packets: int) -> None:
        """Traffic: the first ingress-chain rule with `comment` counts `packets` more."""
        table = self.tables[family]
        index = next(
            i for i, r in enumerate(table.rules) if r.chain.startswith("PF-I") and r.comment == comment
        )
        rule = table.rules[index]
        table.rules[index] = replace(rule, packets=rule.packets + packets, bytes=rule.bytes + 60 * packets)


@pytest.fixture
def kernel_tables(monkeypatch: pytest.MonkeyPatch) -> FakeFilterTables:
    fake = FakeFilterTables()
    monkeypatch.setattr(kernel, "read_filter_table", fake.read)
    monkeypatch.setattr(kernel, "restore_filter_table", fake.restore)
    monkeypatch.setattr(kernel, "read_sets", dict)
    monkeypatch.setattr(kernel, "restore_sets", lambda script: None)
    monkeypatch.setattr(kernel, "destroy_sets", lambda names: None)
    monkeypatch.setattr(kernel, "ensure_hooks", lambda family, hooks: None)
    return fake


@pytest.fixture
def plane(kernel_tables: FakeFilterTables, monkeypatch: pytest.MonkeyPatch) -> IptablesDataplane:
    monkeypatch.setattr(
        iptables_dataplane.IptablesDataplane,
        "_interfaces",
        lambda self, ifindexes: {10: Interface(10, "veth-a")} if 10 in set(ifindexes) else {},
    )
    dataplane = IptablesDataplane()
    dataplane.start()
    return dataplane


def ingress(plane: IptablesDataplane) -> tuple[int, int]:
    (counter,) = [c for c in plane.counters() if (c.key, c.direction) == ("ns/a", "ingress")]
    return counter.allowed_packets, counter.denied_packets


def test_counters_never_go_down_across_chain_swaps(plane: IptablesDataplane, kernel_tables: FakeFilterTables):
    readings = []
    for version, port in enumerate((80, 81, 82, 80), start=1):
        plane.apply(state(version, port))
        readings.append(ingress(plane))
        kernel_tables.count(4, ALLOW, 10)
        kernel_tables.count(4, DENY, 3)
        readings.append(ingress(plane))
    assert readings[-1] == (40, 12)  # everything the four chains counted
    for earlier, later in itertools.pairwise(readings):
        assert later[0] >= earlier[0] and later[1] >= earlier[1], readings


def test_a_scrape_during_a_swap_is_not_counted_twice(
    plane: IptablesDataplane, kernel_tables: FakeFilterTables
):
    plane.apply(state(1, 80))
    kernel_tables.count(4, ALLOW, 10)
    assert ingress(plane) == (10, 0)
    during: list[tuple[int, int]] = []
    scraper = threading.Thread(target=lambda: during.append(ingress(plane)))

    def scrape_while_committing() -> None:
        kernel_tables.before_commit = lambda: None  # once: the first family's commit
        scraper.start()
        scraper.join(0.3)  # long enough to read the old chain and the kept count, if it may

    kernel_tables.before_commit = scrape_while_committing
    plane.apply(state(2, 81))
    after = ingress(plane)
    scraper.join(5)
    assert after == (10, 0)
    assert during == [after], "a scrape during the swap must see the old total or the new, not both"


def test_an_endpoint_that_loses_and_regains_its_interface_keeps_its_count(
    plane: IptablesDataplane, kernel_tables: FakeFilterTables
):
    plane.apply(state(1, 80))
    kernel_tables.count(4, DENY, 7)
    plane.apply(state(2, 80, with_pod=False))  # its chain is gone while the pod is relocated
    plane.apply(state(3, 80))
    assert ingress(plane) == (0, 7)
