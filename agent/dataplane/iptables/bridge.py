"""The iptables dataplane's layer-2 defences on bridged pods, in the bridge family (ebtables).

iptables judges what br_netfilter hands it: IP (and 802.1Q-tagged IP) frames. A pod on a bridge
can also send frames that never become such a packet, and the bridge acts on them (issue 21):
- 802.1ad (QinQ) frames: br_netfilter has no switch for them, they cross the bridge unjudged;
- a foreign source MAC: the bridge learns it and sends another pod's inbound traffic to the
  sender (or squats a MAC so that a new pod is never located);
- ARP claiming another pod's address, or of another kind than address resolution needs.
So each bridged endpoint's port gets a chain in the bridge family, jumped to from PREROUTING:
every frame a port receives, before the bridge learns its source MAC (the filter table's INPUT
and FORWARD come after learning, too late for a MAC binding) and before br_netfilter hands IP
to iptables. The chains live in ebtables' nat table, the only one hooked there (its chains
are nf_tables filter chains and may DROP; podfence rewrites nothing). Tagged frames dropped
(802.1Q and 802.1ad: pods have no business sending them), frames whose source MAC is not the
pod's dropped, ARP admitted only as an Ethernet/IPv4 request or reply whose sender MAC is the
pod's and whose sender IP is the pod's own (or 0.0.0.0, a probe), every other ARP dropped.

The tool is ebtables-nft (shipped with Debian's iptables package), not ebtables-legacy as the
x_tables backend of the rest of the dataplane would suggest: the legacy ebtables tables are gone
from kernels built without CONFIG_BRIDGE_NF_EBTABLES_LEGACY (6.15 on; this lab's kernel), while
nf_tables' bridge family is there. ebtables-nft-restore commits a whole script as one nf_tables
transaction: chains built, the dispatch rewritten and stale chains deleted become visible at once,
and a failing script changes nothing.

Not expressible in ebtables: the ARP frame's length, the link-layer address options inside
neighbour discovery, rule comments (the owner of a chain is known from the apply that built it,
see `owners`). ARP with trailing bytes would carry a payload between isolated pods (issue 21),
so a table of podfence's own in the bridge family (`nft`, ARP_GUARD) marks, just before the
ebtables chains, every ARP frame that is not address resolution's 42 bytes or 60 zero-padded
ones (as the eBPF dataplane: bpf/lib/neigh.h); a pod port's chain drops the marked ones. The
table is the same on every node and marks only: what a frame from a port that is no pod's
becomes stays the business of whoever owns that port. A frame from a veth crosses a network
namespace, which clears its mark, so a pod cannot set the bit itself.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from agent.dataplane.types import Endpoint

if TYPE_CHECKING:  # kernel.py imports the compiler, which imports this
    from agent.dataplane.iptables.kernel import BridgeTable

L2_CHAIN = "PF-L2"  # the dispatch on the input port
L2_PREFIX = "PF-L2-"  # + key hash + "-" + rules hash: one chain per bridged endpoint
L2_HOOKS = ("PREROUTING",)
# 802.1Q, 802.1ad. The kernel moves the outer tag into the skb's metadata on receive; nf_tables
# rebuilds the header from it for the ethertype match, so tagged frames are matched either way.
TAGGED_ETHERTYPES = ("802_1Q", "0x88a8")
_ARP_OPS = ("Request", "Reply")
# The mark bit ARP_GUARD sets on an ARP frame of any other length than address resolution's.
ARP_MARK = 0x00100000
ARP_GUARD_TABLE = "podfence"  # nft: table bridge podfence
# Priority -301: just before ebtables' nat PREROUTING (-300), where the pod ports' chains are.
# Lengths after the Ethernet header: 28 (42 on the wire) or 46 (60, padded) whose 18 padding
# bytes (from bit 224 of the ARP header on) are zero.
_MARK = f"meta mark set meta mark | {ARP_MARK:#010x}"
ARP_GUARD = f"""table bridge {ARP_GUARD_TABLE} {{
	chain arp-length {{
		type filter hook prerouting priority -301; policy accept;
		ether type arp meta length != {{ 28, 46 }} {_MARK}
		ether type arp meta length 46 @nh,224,128 != 0 {_MARK}
		ether type arp meta length 46 @nh,352,16 != 0 {_MARK}
	}}
}}
"""


@dataclass(frozen=True)
class BridgePort:
    """A pod's port on a bridge; `endpoint` None: a pod interface that no endpoint claims."""

    name: str
    endpoint: Endpoint | None


@dataclass
class BridgeRules:
    # chain -> rule specs (the text after "-A <chain> "), in order; L2_CHAIN always present
    chains: dict[str, list[str]] = field(default_factory=dict)
    owners: dict[str, str] = field(default_factory=dict)  # endpoint chain -> endpoint key


def ours(table: BridgeTable) -> list[str]:
    return sorted(c for c in table.chains if c == L2_CHAIN or c.startswith(L2_PREFIX))


def _hash(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def endpoint_rules(endpoint: Endpoint) -> list[str]:
    rules = [f"-p {ethertype} -j DROP" for ethertype in TAGGED_ETHERTYPES]
    mac = f" --arp-mac-src {endpoint.mac}" if endpoint.mac else ""
    if endpoint.mac:
        rules.append(f"-s ! {endpoint.mac} -j DROP")
    # ARP_GUARD marked it: trailing bytes, a payload address resolution does not need
    rules.append(f"-p ARP --mark {ARP_MARK:#x}/{ARP_MARK:#x} -j DROP")
    senders = [str(ip) for ip in endpoint.ips if ip.version == 4] + ["0.0.0.0"]
    for sender in senders:
        for op in _ARP_OPS if sender != "0.0.0.0" else ("Request",):  # a probe only asks
            rules.append(
                f"-p ARP --arp-htype 1 --arp-ptype 0x0800 --arp-op {op}{mac} --arp-ip-src {sender} -j RETURN"
            )
    rules.append("-p ARP -j DROP")
    return rules


def compile_bridge(ports: list[BridgePort], unknown_endpoints: str = "drop") -> BridgeRules:
    """The bridge-family chains for these bridged pod ports (sorted by name by the caller)."""
    out = BridgeRules(chains={L2_CHAIN: []})
    for port in ports:
        if port.endpoint is None:
            if unknown_endpoints == "drop":
                out.chains[L2_CHAIN] += [f"-i {port.name} -p {t} -j DROP" for t in TAGGED_ETHERTYPES]
            continue
        rules = endpoint_rules(port.endpoint)
        chain = f"{L2_PREFIX}{_hash(port.endpoint.key)}-{_hash(chr(10).join(rules))}"
        out.chains[chain] = rules
        out.owners[chain] = port.endpoint.key
        out.chains[L2_CHAIN].append(f"-i {port.name} -j {chain}")
    return out


def hooks_in_place(table: BridgeTable) -> bool:
    """The jump to L2_CHAIN is the first rule of PREROUTING, and there only once."""
    for hook in L2_HOOKS:
        rules = table.chain_rules(hook)
        if not rules or rules[0].spec != f"-j {L2_CHAIN}":
            return False
        if sum(r.spec == f"-j {L2_CHAIN}" for r in rules) != 1:
            return False
    return True


def _hook_deletions(table: BridgeTable) -> list[str]:
    jump = f"-j {L2_CHAIN}"
    return [f"-D {r.chain} {jump}" for r in table.rules if r.chain in L2_HOOKS and r.spec == jump]


def commit_script(desired: BridgeRules, table: BridgeTable) -> str:
    """Build the new chains, rewrite the dispatch (and put the hooks first), delete what is
    stale: one transaction. Declaring an existing chain flushes it; unchanged endpoint chains
    are not declared, so they keep their counters."""
    new = [c for c in desired.chains if c != L2_CHAIN and c not in table.chains]
    stale = [c for c in ours(table) if c not in desired.chains]
    lines = ["*nat", *(f":{c} RETURN" for c in (L2_CHAIN, *new, *stale))]
    for chain in (L2_CHAIN, *new):
        lines += [f"-A {chain} {spec}" for spec in desired.chains[chain]]
    if not hooks_in_place(table):
        lines += _hook_deletions(table)
        lines += [f"-I {hook} 1 -j {L2_CHAIN}" for hook in L2_HOOKS]
    lines += [f"-X {c}" for c in stale]
    return "\n".join([*lines, "COMMIT", ""])


def hooks_script(table: BridgeTable) -> str:
    """Put the jump back first in PREROUTING; "" if it is in place or there is no chain to jump to."""
    if L2_CHAIN not in table.chains or hooks_in_place(table):
        return ""
    lines = ["*nat", *_hook_deletions(table), *(f"-I {hook} 1 -j {L2_CHAIN}" for hook in L2_HOOKS)]
    return "\n".join([*lines, "COMMIT", ""])


def teardown_script(table: BridgeTable) -> str:
    """Remove podfence's jumps and chains, and nothing else; "" if there is nothing of ours."""
    chains = ours(table)
    deletions = _hook_deletions(table)
    if not chains and not deletions:
        return ""
    lines = ["*nat", *(f":{c} RETURN" for c in chains), *deletions, *(f"-X {c}" for c in chains)]
    return "\n".join([*lines, "COMMIT", ""])


def drops(table: BridgeTable, owners: dict[str, str]) -> dict[str, tuple[int, int]]:
    """Endpoint key -> (packets, bytes) dropped by its chain."""
    out: dict[str, tuple[int, int]] = {}
    for rule in table.rules:
        key = owners.get(rule.chain)
        if key is not None and rule.target == "DROP":
            packets, byte_count = out.get(key, (0, 0))
            out[key] = (packets + rule.packets, byte_count + rule.bytes)
    return out
