"""The names and shapes of what the iptables dataplane writes: chains, sets, rule comments, and
the DesiredState the compiler (compiler.py) hands to the writer (dataplane.py, kernel.py).

Every chain and set podfence owns starts with CHAIN_PREFIX or SET_PREFIX and every rule it writes
carries a comment starting with COMMENT_PREFIX: that is how the writer, the counters and the
state check tell podfence's rules from anyone else's.
"""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass, field

from agent.dataplane.iptables.bridge import BridgeRules
from agent.dataplane.iptables.flowrecords import RuleName

FAMILIES = (4, 6)
CHAIN_PREFIX = "PF-"
SET_PREFIX = "pf-"
COMMENT_PREFIX = "podfence:"

FORWARD_CHAIN = "PF-FWD"
FROM_POD_CHAIN = "PF-FROM"
TO_POD_CHAIN = "PF-TO"
FIXED_CHAINS = (FORWARD_CHAIN, FROM_POD_CHAIN, TO_POD_CHAIN)
# Built-in chain -> podfence chain it jumps to (the only rules podfence adds to others' chains).
HOOKS = {"FORWARD": FORWARD_CHAIN, "INPUT": FROM_POD_CHAIN}

# Rule comments: what each rule counts as, and which endpoint a dispatch rule serves.
ALLOW = "podfence:allow"
DENY = "podfence:deny"
HOOK = "podfence:hook"
NDP = "podfence:ndp"
UNKNOWN = "podfence:unknown"
DISPATCH = "podfence:ep"  # "podfence:ep <direction> <key>"
SPOOF = "podfence:spoof"  # "podfence:spoof <key>"
IP_OPTIONS = "podfence:ipopts"  # "podfence:ipopts <key>"
ICMP_ERROR = "podfence:icmperr"  # "podfence:icmperr <key> <source ip>"
# A new flow the enforced rules admitted and the audit view would deny: "podfence:auditdeny
# <direction> <key>", a RETURN (an audit chain never drops)
AUDIT_DENY = "podfence:auditdeny"
# PF-FROM drops counted per endpoint (as its egress denials): comment "<prefix> <key>[ <detail>]"
FROM_POD_DROPS = (SPOOF, IP_OPTIONS, ICMP_ERROR)

EGRESS = "egress"
INGRESS = "ingress"


def short_hash(text: str, length: int = 8) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:length]


def comment(text: str) -> str:
    return f'-m comment --comment "{text}"'


def endpoint_chain_name(key: str, direction: str, rules: list[str], suffix: str = "") -> str:
    """An endpoint chain's name: the endpoint and direction, then a hash of its rules (a changed
    policy is a new chain, an unchanged one keeps its name); `suffix` tells the chains of one
    endpoint direction apart (an audit view's "u", the rest of a tiered chain's "n")."""
    letter = "I" if direction == INGRESS else "E"
    return f"{CHAIN_PREFIX}{letter}{short_hash(key)}-{short_hash(chr(10).join(rules))}{suffix}"


@dataclass(frozen=True)
class Interface:
    """A host-side pod interface as the kernel names it; `bridge` is its master bridge, if any."""

    ifindex: int
    name: str
    bridge: str | None = None


@dataclass(frozen=True)
class IpSetSpec:
    name: str
    family: int
    kind: str  # "hash:ip" | "hash:net" | "hash:net,port"
    members: frozenset[str]  # canonical "addr/len", "addr/len nomatch", "addr/len,tcp:80" (canonical_member)

    @property
    def inet(self) -> str:
        return "inet" if self.family == 4 else "inet6"


@dataclass
class DesiredState:
    sets: dict[str, IpSetSpec] = field(default_factory=dict)
    # family -> chain name -> rule specs (the text after "-A <chain> "), in order
    chains: dict[int, dict[str, list[str]]] = field(default_factory=dict)
    # (key, direction) -> family -> endpoint chain name
    endpoint_chains: dict[tuple[str, str], dict[int, str]] = field(default_factory=dict)
    uses_bridges: bool = False
    # set name -> the policies ("ns/name") whose allows match on it, so that a set too big for
    # maxelem can be charged to them (agent/dataplane/fit.py)
    set_users: dict[str, set[str]] = field(default_factory=dict)
    # the bridge family's chains for bridged pod ports (bridge.py)
    bridge: BridgeRules = field(default_factory=BridgeRules)
    # rule_ref -> what it names, for every log chain written (flowrecords.py); empty when off
    rule_names: dict[int, RuleName] = field(default_factory=dict)


def canonical_member(text: str) -> str:
    """One spelling per set entry, whatever `ipset save` or we wrote: "10.0.0.1/32 nomatch",
    "10.0.0.1/32,tcp:80" (ipset saves a host without its /32)."""
    entry, _, flag = text.partition(" ")
    address, comma, port = entry.partition(",")
    member = str(ipaddress.ip_network(address, strict=False))
    if comma:
        member = f"{member},{port}"
    return f"{member} nomatch" if flag.strip() == "nomatch" else member


def member_address(member: str) -> str:
    """The address (or network) part of a canonical set entry."""
    return member.split(" ", 1)[0].split(",", 1)[0]
