"""What a pod may not send whatever its policy, and the IPv6 neighbour discovery that passes
before any policy: the match texts of the rules PF-FROM and PF-TO start with (compiler.py).

These mirror the eBPF datapath's checks on packets from a pod (bpf/podfence.c tc_from_pod:
PF_DROP_IP_OPTIONS, pf_ct_related, pf_check_ndp), so both dataplanes refuse the same packets.
"""

from __future__ import annotations

from agent.dataplane.iptables.layout import NDP, comment
from agent.dataplane.types import IPAddress

# IPv4 options from a pod, but for a lone Router Alert (IGMP): IHL 6..15, and not (IHL 6 with the
# four option bytes 0x94040000). A source route is why: the node rewrites the destination after
# FORWARD, where the pod's chain judged a packet to the node.
IP_OPTIONS_MATCH = '-m u32 --u32 "0>>24&0xF=6:15" -m u32 ! --u32 "0>>24&0xF=6&&20=0x94040000"'


def icmp_error_match(ip: IPAddress) -> str:
    """A related ICMP error from `ip` that does not quote a packet sent to `ip`.

    nf_conntrack takes an error quoting a tracked flow as RELATED from any source (a router on
    the path), so a pod could hand payload in errors about another pod's flow to a pod whose
    ingress denies it (issue 21). Pods are not routers: an error a pod sends is its own only
    when the packet it quotes was sent to the pod (as bpf/lib/conntrack.h pf_ct_related).
    IPv4: the inner destination sits 8 (ICMP header) + 16 bytes past the outer header (IHL).
    IPv6: at 40 + 8 + 24, which holds only without extension headers; an error with them is
    dropped too (it cannot be read here, and a pod's own errors carry none)."""
    if ip.version == 4:
        return f'-p icmp -m conntrack --ctstate RELATED -m u32 ! --u32 "0>>22&0x3C@24={int(ip):#x}"'
    words = int(ip).to_bytes(16, "big")
    quoted = "&&".join(f"{72 + 4 * i}={int.from_bytes(words[4 * i : 4 * i + 4], 'big'):#x}" for i in range(4))
    return f'-p ipv6-icmp -m conntrack --ctstate RELATED -m u32 ! --u32 "4>>8&0xFF=58&&{quoted}"'


_ICMPV6_NDP_TYPES = (133, 134, 135, 136)  # router/neighbour solicitation and advertisement
# What a pod may send of them, by IPv6 packet length (header included): router and neighbour
# solicitations and neighbour advertisements with at most one 8-byte option (its link-layer
# address, or a DAD nonce). No router advertisements from pods; anything longer carries more
# than address resolution needs and is judged like any other packet.
_ICMPV6_NDP_FROM_POD = {133: "48:56", 135: "64:72", 136: "64:72"}


def ndp_rules(from_pod: bool) -> list[str]:
    """The first rules of PF-FROM (`from_pod`) or PF-TO in the IPv6 table.

    IPv6 neighbour discovery (from link-local, unspecified or global sources) never leaves the
    link (hop limit 255 proves it was not routed); without it nothing else works."""
    if from_pod:
        return [
            f"-p ipv6-icmp -m icmp6 --icmpv6-type {icmp_type} -m hl --hl-eq 255 "
            f"-m length --length {length} {comment(NDP)} -j RETURN"
            for icmp_type, length in _ICMPV6_NDP_FROM_POD.items()
        ]
    return [
        f"-p ipv6-icmp -m icmp6 --icmpv6-type {icmp_type} -m hl --hl-eq 255 {comment(NDP)} -j RETURN"
        for icmp_type in _ICMPV6_NDP_TYPES
    ]
