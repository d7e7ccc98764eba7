"""What a pod may send of IPv6 neighbour discovery, on the iptables dataplane.

Neighbour discovery must pass before any policy (without it no IPv6 packet flows), and a host
believes what it says: an unsolicited advertisement with the override flag rewrites the
node's (and every bridge neighbour's) cache entry for its target. A pod advertising another
pod's address with its own MAC would receive the victim's traffic from the node. So, as the
eBPF dataplane does (bpf/lib/neigh.h), each known pod's neighbour discovery is held to what
address resolution needs, in a chain of its own:

- router advertisements and redirects: dropped (hosts take them only from link-local sources,
  which a pod may use);
- a neighbour advertisement's target must be a link-local address or one of the pod's own;
- router and neighbour solicitations and neighbour advertisements: ICMPv6 right after the IPv6
  header (no extension header), no option or exactly one 8-byte option: the link-layer address
  of the pod's own MAC (of the right kind), or a duplicate-address-detection nonce from the
  unspecified address;
- everything else of those three types: dropped.

Offsets (u32, from the IPv6 header): next header at byte 6, ICMPv6 at 40, a solicitation's or
advertisement's target at 48 and its option at 64, a router solicitation's option at 48.

The packets reach these chains through NEIGHBOUR_DISPATCH-prefixed chains, one rule per known
pod (its interface), jumped to from PF-FROM for ICMPv6 with hop limit 255 only: other packets
pay one rule. A pod's chain RETURNs what it lets pass (and other ICMPv6) to PF-FROM, where the
node-wide neighbour discovery rules then let it through.
"""

from __future__ import annotations

import ipaddress

from agent.dataplane.types import Endpoint

NEIGHBOUR_CHAIN = "PF-N"  # + endpoint key hash + "-" + rules hash: one per known IPv6 pod
NEIGHBOUR_DISPATCH = "PF-ND-"  # + rules hash: the jump on the input interface
SOLICIT_ROUTER, ADVERTISE_ROUTER, SOLICIT, ADVERTISE, REDIRECT = 133, 134, 135, 136, 137
_NO_EXTENSION = "4>>8&0xFF=58"  # the next header is ICMPv6
_LINK_LOCAL = "48&0xFFC00000=0xFE800000"  # fe80::/10, the advertised target
_OPTION_KINDS = {SOLICIT_ROUTER: 1, SOLICIT: 1, ADVERTISE: 2}  # source / target link-layer address
_NONCE = 14  # RFC 7527, in duplicate address detection


def _icmp(icmp_type: int) -> str:
    return f"-p ipv6-icmp -m icmp6 --icmpv6-type {icmp_type}"


def _u32(*tests: str, negated: bool = False) -> str:
    """A u32 match of `tests` on a packet without extension headers (negated: any other)."""
    return f'-m u32 {"! " if negated else ""}--u32 "{"&&".join((_NO_EXTENSION, *tests))}"'


def _words(offset: int, data: bytes) -> list[str]:
    """u32 tests: `data` (a multiple of 4 bytes) at `offset`."""
    return [f"{offset + i}={int.from_bytes(data[i : i + 4], 'big'):#010x}" for i in range(0, len(data), 4)]


def _option(offset: int, kind: int, mac: str | None) -> list[str]:
    """u32 tests: one 8-byte option of `kind` at `offset`, carrying `mac` when it is known."""
    if mac is None:
        return [f"{offset}>>16=0x{kind:02x}01"]
    return _words(offset, bytes((kind, 1)) + bytes.fromhex(mac.replace(":", "")))


def neighbour_rules(endpoint: Endpoint, allowed: str, spoofed: str, rogue: str) -> list[str]:
    """The rules of `endpoint`'s neighbour chain. `allowed`, `spoofed` and `rogue` are the
    targets (with their comments) of what passes, of an advertisement for an address that is
    not the pod's, and of anything else a pod may not send."""
    own = [ip for ip in endpoint.ips if isinstance(ip, ipaddress.IPv6Address)]
    not_own = "".join(f" {_u32(*_words(48, ip.packed), negated=True)}" for ip in own)
    rules = [f"{_icmp(ADVERTISE_ROUTER)} {rogue}", f"{_icmp(REDIRECT)} {rogue}"]
    rules.append(f"{_icmp(ADVERTISE)} {_u32(_LINK_LOCAL, negated=True)}{not_own} {spoofed}")
    bare = {SOLICIT_ROUTER: 48, SOLICIT: 64, ADVERTISE: 64}  # IPv6 length without an option
    for icmp_type, length in bare.items():
        option = _option(length, _OPTION_KINDS[icmp_type], endpoint.mac)
        rules.append(f"{_icmp(icmp_type)} -m length --length {length} {_u32()} {allowed}")
        rules.append(f"{_icmp(icmp_type)} -m length --length {length + 8} {_u32(*option)} {allowed}")
    nonce = f"64>>16=0x{_NONCE:02x}01"
    rules.append(f"-s ::/128 {_icmp(SOLICIT)} -m length --length 72 {_u32(nonce)} {allowed}")
    rules += [f"{_icmp(t)} {rogue}" for t in bare]
    return rules
