/* Link-layer checks of frames FROM a pod (tc_from_pod): VLAN tags, the Ethernet source MAC, ARP,
 * and IPv6 neighbour discovery / MLD. A pod (root in its own netns) can put any frame on its
 * veth; these frames reach the host's neighbour tables and, on bridged CNIs, every other pod on
 * the bridge without an IP verdict. So only what address resolution needs passes:
 *
 *  - no VLAN tag at all (802.1Q, 802.1ad, VLAN 0): the kernel moves the outer tag into skb
 *    metadata before tc, and a bridge forwards tagged frames past br_netfilter's IP hooks;
 *  - the Ethernet source is the endpoint's MAC, once bound (a foreign source MAC teaches the
 *    bridge FDB to send another pod's traffic here);
 *  - ARP: Ethernet/IPv4 request or reply, sender MAC = the pod's, sender address its own (or
 *    0.0.0.0), 42 bytes, or 60 with zero padding (see pf_check_arp);
 *  - NDP: router and neighbour solicitations, neighbour advertisements for the pod's own or a
 *    link-local address, MLD reports of solicited-node groups; options limited to the one
 *    link-layer address option (the pod's MAC) or a DAD nonce; nothing after them. No router
 *    advertisements, redirects or MLD queries from pods.
 */
#ifndef PF_LIB_NEIGH_H
#define PF_LIB_NEIGH_H

#define PF_ETH_P_8021Q 0x8100
#define PF_ETH_P_8021AD 0x88A8
#define PF_ARP_LEN 28       /* Ethernet/IPv4 ARP: 8 bytes of header, 2 x (MAC + IPv4) */
#define PF_ETH_ZLEN 60      /* the minimum Ethernet frame without FCS: what a padding stack sends */
#define PF_ND_OPTION_LEN 8  /* a link-layer address option for Ethernet, or a nonce: one unit */
#define PF_MLD_MAX_RECORDS 4

static __always_inline int pf_mac_bound(const struct pf_endpoint_value *ep)
{
	return (ep->mac[0] | ep->mac[1] | ep->mac[2] | ep->mac[3] | ep->mac[4] | ep->mac[5]) != 0;
}

/* `mac` is the endpoint's own, or no MAC is bound yet */
static __always_inline int pf_mac_is_own(const struct pf_endpoint_value *ep, const __u8 *mac)
{
	if (!pf_mac_bound(ep))
		return 1;
	return mac[0] == ep->mac[0] && mac[1] == ep->mac[1] && mac[2] == ep->mac[2] && mac[3] == ep->mac[3] &&
	       mac[4] == ep->mac[4] && mac[5] == ep->mac[5];
}

/* VLAN tags and the Ethernet source. Double tags leave the inner TPID as skb->protocol. */
static __always_inline __u32 pf_check_l2(struct __sk_buff *skb, const struct pf_endpoint_value *ep)
{
	if (skb->vlan_present || skb->protocol == bpf_htons(PF_ETH_P_8021Q) ||
	    skb->protocol == bpf_htons(PF_ETH_P_8021AD))
		return PF_DROP_VLAN_TAGGED;
	__u8 source[6];
	if (bpf_skb_load_bytes(skb, 6, source, sizeof(source)) < 0)
		return PF_DROP_MALFORMED;
	return pf_mac_is_own(ep, source) ? PF_REASON_ALLOWED : PF_DROP_SPOOFED_MAC;
}

/* ARP from a pod: Ethernet/IPv4, request or reply, the sender MAC the pod's, the sender address
 * its own (0.0.0.0 for probes). Length: a pod's stack sends the 42 bytes ARP defines; one that
 * pads in software pads to the 60-byte Ethernet minimum, with zeros (RFC 1042 padding carries
 * nothing). Anything longer, or padding that is not zero, is a payload ARP has no room for: a
 * channel to every pod on a bridge that no policy judges. */
static __always_inline __u32 pf_check_arp(struct __sk_buff *skb, const struct pf_endpoint_value *ep)
{
	__u8 arp[PF_ARP_LEN];
	if (bpf_skb_load_bytes(skb, ETH_HLEN, arp, sizeof(arp)) < 0)
		return PF_DROP_MALFORMED;
	/* htype 1 (Ethernet), ptype 0x0800, hlen 6, plen 4, op 1 (request) or 2 (reply) */
	if (arp[0] != 0 || arp[1] != 1 || arp[2] != 0x08 || arp[3] != 0 || arp[4] != 6 || arp[5] != 4 ||
	    arp[6] != 0 || (arp[7] != 1 && arp[7] != 2))
		return PF_DROP_MALFORMED;
	if (skb->len != ETH_HLEN + PF_ARP_LEN) {
		__u64 padding[3] = {};  /* 18 bytes used */
		if (skb->len != PF_ETH_ZLEN ||
		    bpf_skb_load_bytes(skb, ETH_HLEN + PF_ARP_LEN, padding, PF_ETH_ZLEN - ETH_HLEN - PF_ARP_LEN) < 0)
			return PF_DROP_MALFORMED;
		if (padding[0] | padding[1] | padding[2])
			return PF_DROP_MALFORMED;
	}
	if (!pf_mac_is_own(ep, &arp[8]))
		return PF_DROP_SPOOFED_ARP;
	__be32 sender;
	__builtin_memcpy(&sender, &arp[14], 4);
	if (sender == 0)
		return PF_REASON_ALLOWED;
	struct pf_addr addr;
	pf_addr_from_v4(&addr, sender);
	return pf_source_belongs_to(&addr, skb->ifindex) ? PF_REASON_ALLOWED : PF_DROP_SPOOFED_ARP;
}

/* ff02::1:ffXX:XXXX, the group a node joins for each of its addresses */
static __always_inline int pf_is_solicited_node(const __u8 *group)
{
	const __u32 *words = (const __u32 *)group;
	return words[0] == bpf_htonl(0xff020000) && words[1] == 0 && words[2] == bpf_htonl(0x00000001) &&
	       group[12] == 0xff;
}

/* The options of an RS/NS/NA at `off`, `len` bytes: none, or exactly one of the type `allowed`
 * (the link-layer address option, which must name the pod's MAC, or the DAD nonce). */
static __always_inline __u32 pf_check_nd_options(struct __sk_buff *skb, const struct pf_endpoint_value *ep,
						 __u32 off, __u32 len, __u8 allowed)
{
	__u8 option[PF_ND_OPTION_LEN];
	if (len == 0)
		return PF_REASON_ALLOWED;
	if (len != PF_ND_OPTION_LEN || bpf_skb_load_bytes(skb, off, option, sizeof(option)) < 0)
		return PF_DROP_ROGUE_NDP;
	if (option[0] != allowed || option[1] != 1)
		return PF_DROP_ROGUE_NDP;
	if (allowed != 14 && !pf_mac_is_own(ep, &option[2]))
		return PF_DROP_SPOOFED_NDP;
	return PF_REASON_ALLOWED;
}

/* An MLD listener report or done (`type` 131, 132, 143) at `l4`, `len` bytes: solicited-node
 * groups only, no sources, no auxiliary data. */
static __always_inline __u32 pf_check_mld(struct __sk_buff *skb, __u32 l4, __u32 len, __u8 type)
{
	__u8 group[16];
	if (type != 143) {
		if (len != 24 || bpf_skb_load_bytes(skb, l4 + 8, group, sizeof(group)) < 0)
			return PF_DROP_ROGUE_NDP;
		return pf_is_solicited_node(group) ? PF_REASON_ALLOWED : PF_DROP_ROGUE_NDP;
	}
	__be16 count_be;
	if (bpf_skb_load_bytes(skb, l4 + 6, &count_be, sizeof(count_be)) < 0)
		return PF_DROP_ROGUE_NDP;
	__u32 count = bpf_ntohs(count_be);
	if (count == 0 || count > PF_MLD_MAX_RECORDS || len != 8 + 20 * count)
		return PF_DROP_ROGUE_NDP;
#pragma unroll
	for (int i = 0; i < PF_MLD_MAX_RECORDS; i++) {
		if (i >= count)
			break;
		__u8 record[20];  /* type, aux length, source count (2), group (16) */
		if (bpf_skb_load_bytes(skb, l4 + 8 + 20 * i, record, sizeof(record)) < 0)
			return PF_DROP_ROGUE_NDP;
		if (record[1] != 0 || record[2] != 0 || record[3] != 0 || !pf_is_solicited_node(&record[4]))
			return PF_DROP_ROGUE_NDP;
	}
	return PF_REASON_ALLOWED;
}

/* Neighbour discovery or MLD from a pod (`pkt` flagged PF_PKT_NDP by pf_parse: the type and hop
 * limit of link plumbing). The frame ends where the IPv6 payload does; the only extension header
 * is MLD's hop-by-hop (router alert). */
static __always_inline __u32 pf_check_ndp(struct __sk_buff *skb, const struct pf_endpoint_value *ep,
					  const struct pf_packet *pkt)
{
	struct ipv6hdr ip6;
	__u8 icmp[8];
	if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip6, sizeof(ip6)) < 0)
		return PF_DROP_MALFORMED;
	__u32 l4 = ETH_HLEN + sizeof(ip6);
	__u32 end = l4 + bpf_ntohs(ip6.payload_len);
	if (skb->len != end)
		return PF_DROP_ROGUE_NDP;  /* bytes after the IPv6 payload, or a payload cut short */
	if (ip6.nexthdr == 0) {
		__u8 hbh[2];
		if (bpf_skb_load_bytes(skb, l4, hbh, sizeof(hbh)) < 0 || hbh[0] != PF_IPPROTO_ICMPV6)
			return PF_DROP_ROGUE_NDP;
		l4 += ((__u32)hbh[1] + 1) * 8;
	} else if (ip6.nexthdr != PF_IPPROTO_ICMPV6) {
		return PF_DROP_ROGUE_NDP;
	}
	if (end < l4 + sizeof(icmp) || bpf_skb_load_bytes(skb, l4, icmp, sizeof(icmp)) < 0)
		return PF_DROP_ROGUE_NDP;
	__u32 len = end - l4;
	__u8 type = icmp[0];
	int mld = type == 131 || type == 132 || type == 143;
	if (mld != (ip6.nexthdr == 0) || icmp[1] != 0)
		return PF_DROP_ROGUE_NDP;
	if (mld)
		return pf_check_mld(skb, l4, len, type);
	if (type == 133)  /* router solicitation: 8 bytes, then the source link-layer address */
		return pf_check_nd_options(skb, ep, l4 + 8, len - 8, 1);
	if (type != 135 && type != 136)
		return PF_DROP_ROGUE_NDP;  /* router advertisement, redirect, MLD query */
	struct pf_addr target;
	if (len < 24 || bpf_skb_load_bytes(skb, l4 + 8, &target, sizeof(target)) < 0)
		return PF_DROP_ROGUE_NDP;
	if (type == 136) {
		/* the advertised target decides whose address a neighbour cache learns */
		if (!pf_is_link_local_v6(&target) && !pf_source_belongs_to(&target, skb->ifindex))
			return PF_DROP_SPOOFED_NDP;
		return pf_check_nd_options(skb, ep, l4 + 24, len - 24, 2);
	}
	/* a solicitation asks about an address on this link: the gateway's link-local or a node
	 * address, the pod's own (DAD), another local pod's (bridged CNIs); never free-form bytes */
	if (!pf_is_link_local_v6(&target) && !pf_is_node_ip(&target) && !pf_endpoint_ips.lookup(&target))
		return PF_DROP_ROGUE_NDP;
	/* DAD (unspecified source) carries no link-layer address, maybe a nonce (RFC 7527) */
	return pf_check_nd_options(skb, ep, l4 + 24, len - 24, pf_is_unspecified(&pkt->saddr) ? 14 : 1);
}

#endif /* PF_LIB_NEIGH_H */
