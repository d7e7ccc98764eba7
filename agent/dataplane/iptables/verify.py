"""Verify the iptables dataplane's chains, ipsets and layer-2 chains against the last commit.

Root in the node's namespace can flush or edit what podfence wrote (`iptables -F PF-FROM`,
`iptables -D` of an endpoint chain's rule, `ipset flush`, `ebtables -F PF-L2`). The agent's
state check (agent/node/repair.py) calls the dataplane's `repair_state` on a timer; these pure
functions find the drift against the last applied DesiredState and write the scripts that put it
back. A chain is checked by its rule count (what `-F` and `-D` change; one iptables-save per
family, which the hook check reads anyway), a set by its members.

Each repair is one atomic commit: iptables-restore rewrites the drifted chains whole (the rest
untouched), ipsets are refilled by the same fill-a-copy-and-swap an apply uses, so the repair
itself never opens anything. What the removal opened until then depends on the piece: an emptied
ipset only denies more (every set podfence matches allows, excepts are `nomatch` entries of the
same set); an emptied endpoint chain or dispatch chain lets the traffic it judged fall through to
the rules after podfence's hook (docs/security.md, "What is not defended").
"""

from __future__ import annotations

from agent.dataplane.iptables.kernel import KernelSet, SavedTable

Drift = tuple[str, str]  # (kind, what was found): kind is a podfence_state_repairs_total label


def drifted_chains(table: SavedTable, chains: dict[str, list[str]]) -> list[str]:
    """Chains of `chains` that the kernel lacks or holds with another number of rules."""
    return sorted(
        name for name, rules in chains.items()
        if name not in table.chains or len(table.chain_rules(name)) != len(rules)
    )  # fmt: skip


def describe_chain(table: SavedTable, name: str, rules: list[str]) -> str:
    if name not in table.chains:
        return f"chain {name} missing"
    return f"chain {name} has {len(table.chain_rules(name))} rules, not {len(rules)}"


def rewrite_script(table_name: str, chains: dict[str, list[str]], names: list[str], policy: str) -> str:
    """One restore transaction that (re)creates `names` with their rules, nothing else. Declaring
    a chain flushes it: its old rules and the new never both apply, and nothing between."""
    lines = [f"*{table_name}", *(f":{name} {policy}" for name in names)]
    for name in names:
        lines += [f"-A {name} {spec}" for spec in chains[name]]
    return "\n".join([*lines, "COMMIT", ""])


def chain_repair(
    table: SavedTable, chains: dict[str, list[str]], kind: str, label: str, table_name: str, policy: str
) -> tuple[list[Drift], str]:
    """What drifted among `chains`, and the script that rewrites it ("" when nothing did)."""
    names = drifted_chains(table, chains)
    drift = [(kind, f"{label}{describe_chain(table, name, chains[name])}") for name in names]
    return drift, rewrite_script(table_name, chains, names, policy) if names else ""


def drifted_sets(wanted: dict[str, frozenset[str]], sets_now: dict[str, KernelSet]) -> list[Drift]:
    """Sets that are missing or hold other members than the last commit wrote."""
    drift: list[Drift] = []
    for name, members in sorted(wanted.items()):
        current = sets_now.get(name)
        if current is None:
            drift.append(("ipset", f"set {name} missing"))
        elif current.members != members:
            drift.append(("ipset", f"set {name} has {len(current.members)} members, not {len(members)}"))
    return drift
