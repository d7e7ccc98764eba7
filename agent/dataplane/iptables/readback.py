"""Read one endpoint's chains and sets back from the kernel, with each rule's counters.

The dispatch rules of PF-FROM/PF-TO name the endpoint in their comment ("podfence:ep <direction>
<key>") and go to its endpoint chain; that chain and the podfence chains it goes to (a tiered
direction's rest chain, an audit view's chain) are listed rule by rule, as iptables-save prints
them, with the kernel's own packet and byte counters of each rule (counted since the chain was
written: a policy change writes a new chain). A rule matching an ipset is shown with the set's
members as the kernel holds them.

The iptables dataplane keeps no file of what it wrote: the kernel is its record (a restarted
agent adopts it), and the agent's state check compares it with its last commit on a timer
(docs/troubleshooting.md). So the checks here are the ones the kernel can answer alone (the
dispatch goes to a chain that exists, every set a rule matches exists), plus, given the
DesiredState a NodeState compiles to, the full comparison: chain names, rule counts, set members.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass

from agent.dataplane.iptables import kernel
from agent.dataplane.iptables.layout import (
    ALLOW,
    AUDIT_DENY,
    CHAIN_PREFIX,
    DENY,
    DISPATCH,
    EGRESS,
    FAMILIES,
    FROM_POD_CHAIN,
    FROM_POD_DROPS,
    INGRESS,
    TO_POD_CHAIN,
    DesiredState,
)
from agent.dataplane.readback import EndpointReadback, ProgrammedDirection, ProgrammedRule

LOG_CHAIN_PREFIX = "PF-L"  # flowrecords.log_chain_name: NFLOG then the verdict, no policy of its own
_SHOWN_MEMBERS = 16
_ADDRESS = re.compile(r"(?:^|\s)(!\s)?-([sd]) (\S+)")
_PROTOCOL = re.compile(r"(?:^|\s)(!\s)?-p (\S+)")
_PORTS = re.compile(r"--dports? (\S+)")
_SET = re.compile(r"--match-set (\S+) (\S+)")
_INTERFACE = re.compile(r"(?:^|\s)-[io] (\S+)|--physdev-(?:in|out) (\S+)")
# what the head of every endpoint chain denies, whatever the policy (compiler._endpoint_chain)
_GUARDS = ("new flows beyond the pod's conntrack bound", "a new TCP flow not starting with SYN")
_OWN_SOURCE = re.compile(r"-s (\S+?)(?:/(?:32|128))?(?:\s|$)")
NO_RECORD_NOTE = (
    "the iptables dataplane keeps no record besides the kernel: chain names, rule counts and set "
    "members are checked against the agent's last commit by its state check (podfence status: state_repairs)"
)


@dataclass(frozen=True)
class _Kernel:
    tables: dict[int, kernel.FilterTable]
    sets: dict[str, kernel.KernelSet]


def read_kernel() -> _Kernel:
    """Both families' filter tables (with counters) and podfence's sets, in this netns."""
    return _Kernel({family: kernel.read_filter_table(family) for family in FAMILIES}, kernel.read_sets())


def _set_text(name: str, sets: dict[str, kernel.KernelSet]) -> str:
    held = sets.get(name)
    if held is None:
        return f"set {name} (MISSING)"
    members = sorted(held.members)
    shown = ", ".join(members[:_SHOWN_MEMBERS])
    more = len(members) - _SHOWN_MEMBERS
    return f"set {name} {{{shown}{f' and {more} more' if more > 0 else ''}}}"


def _action(rule: kernel.Rule) -> str:
    if rule.comment == ALLOW:
        return "allow"
    if rule.comment == DENY:
        return "deny"
    if rule.comment.startswith(AUDIT_DENY + " "):
        return "audit-deny"
    if rule.target.startswith(CHAIN_PREFIX) and not rule.target.startswith(LOG_CHAIN_PREFIX):
        return f"go {rule.target}"
    return {"RETURN": "allow", "DROP": "deny"}.get(rule.target, rule.target.lower() or "continue")


def decode_rule(rule: kernel.Rule, family: int, sets: dict[str, kernel.KernelSet]) -> ProgrammedRule:
    """One rule of an endpoint chain: what it matches, what it does, its counters."""
    spec = rule.spec
    peers = [f"{'not ' if negated else ''}{address}" for negated, _, address in _ADDRESS.findall(spec)]
    peers += [_set_text(name, sets) for name, _ in _SET.findall(spec)]
    if "--ctstate RELATED,ESTABLISHED" in spec:
        peers.append("flows conntrack knows (established, related)")
    elif "--connlimit-above" in spec:
        peers.append(_GUARDS[0])
    elif "! --syn" in spec:
        peers.append(_GUARDS[1])
    protocol = _PROTOCOL.search(spec)
    ports = _PORTS.search(spec)
    return ProgrammedRule(
        peer="; ".join(peers) or "any address",
        protocol=(protocol.group(2) if protocol and not protocol.group(1) else "any"),
        ports=ports.group(1).replace(":", "-").replace(",", ", ") if ports else "any",
        action=_action(rule),
        packets=rule.packets,
        bytes=rule.bytes,
        detail=f"ipv{family} {rule.chain}",
    )


def _dispatch(table: kernel.FilterTable, key: str, direction: str) -> list[kernel.Rule]:
    comment = f"{DISPATCH} {direction} {key}"
    chain = TO_POD_CHAIN if direction == INGRESS else FROM_POD_CHAIN
    return [rule for rule in table.chain_rules(chain) if rule.comment == comment]


def _chains_below(rules: dict[str, list[str]], chain: str) -> list[str]:
    """`chain` and the podfence chains its rules (`rules`: chain -> rule specs) go to, but log
    chains, breadth first, once each."""
    order: list[str] = []
    pending = [chain]
    while pending:
        name = pending.pop(0)
        if name in order or name not in rules:
            continue
        order.append(name)
        for spec in rules[name]:
            target = kernel.Rule(name, spec, 0, 0).target
            if target.startswith(CHAIN_PREFIX) and not target.startswith(LOG_CHAIN_PREFIX):
                pending.append(target)
    return order


def _specs(table: kernel.FilterTable) -> dict[str, list[str]]:
    specs: dict[str, list[str]] = {name: [] for name in table.chains}
    for rule in table.rules:
        specs.setdefault(rule.chain, []).append(rule.spec)
    return specs


def _interface_index(dispatch: list[kernel.Rule]) -> int | None:
    for rule in dispatch:
        match = _INTERFACE.search(rule.spec)
        if match:
            try:
                return socket.if_nametoindex(match.group(1) or match.group(2))
            except OSError:
                return None
    return None


def read_endpoint(
    key: str, held: _Kernel | None = None, desired: DesiredState | None = None
) -> EndpointReadback:
    """What the kernel (this netns) holds for endpoint `key`; with `desired`, where it differs.
    Raises LookupError when no dispatch rule names the endpoint."""
    held = held or read_kernel()
    readback = EndpointReadback("iptables", key, None)
    addresses: set[str] = set()
    found_any = False
    for direction in (INGRESS, EGRESS):
        target = ProgrammedDirection(direction, "")
        for family in FAMILIES:
            table = held.tables[family]
            dispatch = _dispatch(table, key, direction)
            if not dispatch:
                continue
            found_any = True
            readback.ifindex = readback.ifindex or _interface_index(dispatch)
            if direction == EGRESS:
                addresses.update(m.group(1) for r in dispatch if (m := _OWN_SOURCE.search(r.spec)))
            chains = sorted({rule.target for rule in dispatch})
            for chain in chains:
                if chain not in table.chains:
                    readback.differences.append(
                        f"{direction}: ipv{family} dispatch goes to {chain}, which is missing"
                    )
                    continue
                for name in _chains_below(_specs(table), chain):
                    for rule in table.chain_rules(name):
                        decoded = decode_rule(rule, family, held.sets)
                        target.rules.append(decoded)
                        _count(target, rule)
                        readback.differences += [
                            f"{direction}: ipv{family} {name} matches set {s}, which is missing"
                            for s in kernel.matched_sets(rule.spec) if s not in held.sets
                        ]  # fmt: skip
            if desired is not None:
                readback.differences += _against_desired(
                    desired, table, held.sets, key, direction, family, chains
                )
            if direction == EGRESS:
                for rule in table.chain_rules(FROM_POD_CHAIN):
                    if rule.comment.startswith(tuple(f"{p} {key}" for p in FROM_POD_DROPS)):
                        target.denied_packets += rule.packets
                        target.denied_bytes += rule.bytes
        target.mode = _mode(target.rules)
        target.notes.append("each rule's counters are the kernel's own, since its chain was written")
        target.notes.append(NO_RECORD_NOTE if desired is None else "compared with the given desired state")
        readback.directions.append(target)
    if not found_any:
        raise LookupError(f"no podfence dispatch rule names endpoint {key} in this network namespace")
    readback.addresses = sorted(addresses)
    return readback


def _mode(rules: list[ProgrammedRule]) -> str:
    """open: nothing but the guards at the head denies; isolated: a deny of whatever no rule before
    allowed ends it; tiered: denies of some peers only (ClusterNetworkPolicy Deny rules)."""
    denies = [r for r in rules if r.action == "deny" and r.peer not in _GUARDS]
    if not denies:
        return "open"
    if any(r.peer == "any address" and r.protocol == "any" for r in denies):
        return "isolated"
    return "tiered"


def _count(target: ProgrammedDirection, rule: kernel.Rule) -> None:
    if rule.comment == ALLOW:
        target.allowed_packets += rule.packets
        target.allowed_bytes += rule.bytes
    elif rule.comment == DENY:
        target.denied_packets += rule.packets
        target.denied_bytes += rule.bytes
    elif rule.comment.startswith(AUDIT_DENY + " "):
        target.audit_denied += rule.packets


def _against_desired(
    desired: DesiredState,
    table: kernel.FilterTable,
    sets: dict[str, kernel.KernelSet],
    key: str,
    direction: str,
    family: int,
    chains: list[str],
) -> list[str]:
    """Where the kernel's chains and sets for one endpoint direction and family differ from `desired`."""
    label = f"{direction}: ipv{family}"
    wanted = desired.endpoint_chains.get((key, direction), {}).get(family)
    if wanted is None:
        return [f"{label} the kernel dispatches to {', '.join(chains)}, the desired state has no chain"]
    found = []
    if chains != [wanted]:
        found.append(f"{label} dispatch goes to {', '.join(chains)}, desired {wanted}")
    written = desired.chains.get(family, {})
    for name in _chains_below(_specs(table), wanted):
        if name in written and len(table.chain_rules(name)) != len(written[name]):
            found.append(
                f"{label} chain {name} has {len(table.chain_rules(name))} rules, desired {len(written[name])}"
            )
    # the sets the desired chains match (not the kernel's rules: a deleted rule's set counts too)
    wanted_sets = {s for name in _chains_below(written, wanted) for spec in written[name]
                   for s in kernel.matched_sets(spec)}  # fmt: skip
    for set_name in sorted(wanted_sets):
        spec, now = desired.sets.get(set_name), sets.get(set_name)
        if spec is None:
            continue
        if now is None:
            found.append(f"{label} set {set_name} is missing")
        elif now.members != spec.members:
            lost, extra = sorted(spec.members - now.members), sorted(now.members - spec.members)
            found.append(f"{label} set {set_name} lacks {lost} and holds {extra} beyond the desired")
    return found
