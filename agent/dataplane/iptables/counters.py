"""Per-endpoint counters of the iptables dataplane, read back from the rule counters of each
endpoint chain (its owner named by the dispatch rule's comment) and of the from-pod drops."""

from __future__ import annotations

from dataclasses import dataclass

from agent.dataplane.iptables import kernel
from agent.dataplane.iptables.layout import (
    ALLOW,
    AUDIT_DENY,
    DENY,
    DISPATCH,
    EGRESS,
    FROM_POD_CHAIN,
    FROM_POD_DROPS,
    TO_POD_CHAIN,
)
from agent.dataplane.iptables.neighbour import NEIGHBOUR_DISPATCH


@dataclass
class Tally:
    allowed_packets: int = 0
    allowed_bytes: int = 0
    denied_packets: int = 0
    denied_bytes: int = 0

    def add(self, other: Tally) -> None:
        self.allowed_packets += other.allowed_packets
        self.allowed_bytes += other.allowed_bytes
        self.denied_packets += other.denied_packets
        self.denied_bytes += other.denied_bytes


def endpoint_chain_owners(
    table: kernel.FilterTable, *, neighbour: bool = False
) -> dict[str, tuple[str, str]]:
    """Endpoint chain -> (key, direction), read back from the dispatch rules' comments; with
    `neighbour`, the pods' neighbour discovery chains too (whose drops are egress denials)."""
    owners: dict[str, tuple[str, str]] = {}
    for rule in table.rules:
        dispatching = rule.chain in (FROM_POD_CHAIN, TO_POD_CHAIN) or (
            neighbour and rule.chain.startswith(NEIGHBOUR_DISPATCH)
        )
        if dispatching and rule.comment.startswith(DISPATCH + " "):
            _, direction, key = rule.comment.split(" ", 2)
            owners[rule.target] = (key, direction)
    return owners


def tally_chains(
    table: kernel.FilterTable, owners: dict[str, tuple[str, str]], *, from_pod_drops: bool = True
) -> dict[tuple[str, str], Tally]:
    """What the rules of the `owners` chains counted, and (`from_pod_drops`) PF-FROM's drops."""
    tallies: dict[tuple[str, str], Tally] = {}
    for rule in table.rules:
        if rule.chain in owners:
            comment = rule.comment
            tally = tallies.setdefault(owners[rule.chain], Tally())
            if comment == ALLOW:
                tally.allowed_packets += rule.packets
                tally.allowed_bytes += rule.bytes
            elif comment == DENY:
                tally.denied_packets += rule.packets
                tally.denied_bytes += rule.bytes
        elif (
            from_pod_drops
            and rule.chain == FROM_POD_CHAIN
            and rule.comment.startswith(tuple(f"{p} " for p in FROM_POD_DROPS))
        ):
            tally = tallies.setdefault((rule.comment.split(" ")[1], EGRESS), Tally())
            tally.denied_packets += rule.packets
            tally.denied_bytes += rule.bytes
    return tallies


def audit_denials(table: kernel.FilterTable, chains: set[str] | None = None) -> dict[tuple[str, str], int]:
    """(key, direction) -> packets the AUDIT_DENY rules counted (of `chains` only, if given):
    the first packets of new flows the enforced rules admitted and the audit view would deny."""
    counts: dict[tuple[str, str], int] = {}
    marker = AUDIT_DENY + " "
    for rule in table.rules:
        # the comment is part of the spec: the substring test (C) spares the comment's regex
        # on every rule of the table, most of this function's cost at 10,000 endpoint chains
        if marker not in rule.spec:
            continue
        if rule.comment.startswith(marker) and (chains is None or rule.chain in chains):
            _, direction, key = rule.comment.split(" ", 2)
            counts[(key, direction)] = counts.get((key, direction), 0) + rule.packets
    return counts
