/* Packet parsing shared by every hook. All reads go through pf_load() so the same code works at
 * tc (skb->data at the Ethernet header) and at the netfilter hooks (skb->data at the IP header):
 * the caller passes the offset of the L3 header. The helpers behind pf_load bounds-check every
 * read; a failed read marks the packet malformed instead of reading past the end. */
#ifndef PF_LIB_PARSE_H
#define PF_LIB_PARSE_H

#define PF_IPPROTO_ICMP 1
#define PF_IPPROTO_TCP 6
#define PF_IPPROTO_UDP 17
#define PF_IPPROTO_ICMPV6 58
#define PF_IPPROTO_SCTP 132

#ifndef PF_MAX_IPV6_EXT_HEADERS
#define PF_MAX_IPV6_EXT_HEADERS 8
#endif

#define PF_PKT_MALFORMED   0x01  /* a header could not be read or is invalid */
#define PF_PKT_FRAG_FIRST  0x02  /* first fragment of a fragmented datagram */
#define PF_PKT_FRAG_LATER  0x04  /* non-first fragment: no L4 header */
#define PF_PKT_ICMP_ERROR  0x08  /* ICMP/ICMPv6 error: inner_* hold the embedded tuple */
#define PF_PKT_NDP         0x10  /* ICMPv6 neighbour discovery / MLD: link plumbing */
#define PF_PKT_IP_OPTIONS  0x20  /* IPv4 header with options (IHL > 5) */
#define PF_PKT_NODE_SENT   0x40  /* sent by the node itself (tc_to_pod: entered no device) */
#define PF_PKT_ADMITTED    0x80  /* pf_judge newly admitted the packet's way of its flow: the
				    * flow's allowed record is due (lib/metrics.h) */
#define PF_PKT_AUDIT_DENIED 0x100 /* admitted, but the direction's audit view denies it: its
				    * record is audit-denied, policy_id/verdict_word the audit view's */
#define PF_PKT_IS_FRAGMENT (PF_PKT_FRAG_FIRST | PF_PKT_FRAG_LATER)

/* Where a program reads packet bytes: tc and xt_bpf programs through their skb with
 * bpf_skb_load_bytes(), the netfilter-link program through a dynptr over its skb (netfilter
 * programs have no skb helpers). Exactly one is set; inlined, the choice costs nothing.
 * (Direct reads of the linear data were measured slower at tc: without a known alignment they
 * copy byte by byte, and the copies made the programs larger.) */
struct pf_source {
	struct __sk_buff *skb;
	struct pf_dynptr *dynptr;
};

static __always_inline int pf_load(const struct pf_source *src, __u32 off, void *dst, __u32 len)
{
	if (src->dynptr)
		return pf_dynptr_read(dst, len, src->dynptr, off, 0);
	return bpf_skb_load_bytes(src->skb, off, dst, len);
}

/* Addresses first and the struct 8-byte aligned: they are compared as 64-bit words (the stack
 * allows no misaligned access). */
struct pf_packet {
	struct pf_addr saddr;
	struct pf_addr daddr;
	/* embedded tuple of an ICMP error (the packet that caused it) */
	struct pf_addr inner_saddr;
	struct pf_addr inner_daddr;
	__be16 inner_sport_be;
	__be16 inner_dport_be;
	__u8 inner_protocol;
	__be16 sport_be;
	__be16 dport_be;
	__u8 protocol;
	__u8 family;
	__u16 flags;
	__u32 frag_id;
	__u8 tcp_flags;  /* FIN 0x01, SYN 0x02, RST 0x04, ACK 0x10 */
	__u8 hop_limit;  /* IPv6 only */
	/* what decided, for its flow record (pf_judge): the direction's policy id and, tiered, the
	 * merged verdict word; 0 until a policy was looked up */
	__u32 policy_id;
	__u32 verdict_word;
} __attribute__((aligned(8)));

static __always_inline void pf_addr_from_v4(struct pf_addr *addr, __be32 v4)
{
	__builtin_memset(addr, 0, sizeof(*addr));
	addr->bytes[10] = 0xff;
	addr->bytes[11] = 0xff;
	__builtin_memcpy(&addr->bytes[12], &v4, 4);
}

static __always_inline int pf_is_v4_mapped(const struct pf_addr *addr)
{
	const __u32 *words = (const __u32 *)addr->bytes;
	return words[0] == 0 && words[1] == 0 && words[2] == bpf_htonl(0x0000ffff);
}

static __always_inline int pf_is_icmp_error(__u8 protocol, __u8 type)
{
	if (protocol == PF_IPPROTO_ICMP)
		return type == 3 || type == 11 || type == 12;  /* unreachable, time exceeded, param */
	if (protocol == PF_IPPROTO_ICMPV6)
		return type >= 1 && type <= 4;  /* unreachable, too big, time exceeded, param */
	return 0;
}

static __always_inline int pf_is_echo(__u8 protocol, __u8 type, int *is_request)
{
	if ((protocol == PF_IPPROTO_ICMP && type == 8) || (protocol == PF_IPPROTO_ICMPV6 && type == 128)) {
		*is_request = 1;
		return 1;
	}
	if ((protocol == PF_IPPROTO_ICMP && type == 0) || (protocol == PF_IPPROTO_ICMPV6 && type == 129)) {
		*is_request = 0;
		return 1;
	}
	return 0;
}

/* The first bytes of an L4 header: enough for every field read here (TCP: ports to flags).
 * pf_parse reads them in the same read as the IP header where the packet is long enough and no
 * options or extension headers sit between: one read per packet instead of two, in each of the
 * three programs a packet meets. */
#define PF_L4_HEAD 14

/* `len` (<= PF_L4_HEAD) bytes of the L4 header at `off` into `l4`, unless `have` says they are
 * there already. */
static __always_inline int pf_l4_bytes(const struct pf_source *src, __u32 off, __u8 *l4, int have, __u32 len)
{
	return have ? 0 : pf_load(src, off, l4, len);
}

/* Ports (or ICMP echo id) of an L4 header at `off`; returns 0 on success, -1 if truncated.
 * `tcp_flags`: also require a complete TCP header and return its flags (NULL for the 8 bytes an
 * ICMP error quotes). `l4`: PF_L4_HEAD bytes of room, holding the header's first bytes if `have`. */
static __always_inline int pf_parse_ports(const struct pf_source *src, __u32 off, __u8 protocol,
					  __be16 *sport_be, __be16 *dport_be, __u8 *icmp_type, __u8 *tcp_flags,
					  __u8 *l4, int have)
{
	*sport_be = 0;
	*dport_be = 0;
	*icmp_type = 0;
	if (protocol == PF_IPPROTO_TCP && tcp_flags) {
		/* ports, sequence and acknowledgement numbers, data offset and flags in one read */
		__u8 *tcp = l4;
		if (pf_l4_bytes(src, off, l4, have, PF_L4_HEAD) == 0) {
			__builtin_memcpy(sport_be, &tcp[0], 2);
			__builtin_memcpy(dport_be, &tcp[2], 2);
			if ((tcp[12] >> 4) < 5)
				return -1;  /* a TCP header shorter than 20 bytes is malformed */
			*tcp_flags = tcp[13];
			return 0;
		}
		/* truncated: malformed, but its ports (when there) still name the flow in events */
	}
	if (protocol == PF_IPPROTO_TCP || protocol == PF_IPPROTO_UDP || protocol == PF_IPPROTO_SCTP) {
		if (pf_l4_bytes(src, off, l4, have, 4) < 0)
			return -1;
		__builtin_memcpy(sport_be, &l4[0], 2);
		__builtin_memcpy(dport_be, &l4[2], 2);
		return protocol == PF_IPPROTO_TCP && tcp_flags ? -1 : 0;
	}
	if (protocol == PF_IPPROTO_ICMP || protocol == PF_IPPROTO_ICMPV6) {
		__u8 *hdr = l4;
		int is_request = 0;
		if (pf_l4_bytes(src, off, l4, have, 8) < 0)
			return -1;
		*icmp_type = hdr[0];
		if (pf_is_echo(protocol, hdr[0], &is_request)) {
			__be16 id_be;
			__builtin_memcpy(&id_be, &hdr[4], 2);
			if (is_request)
				*sport_be = id_be;
			else
				*dport_be = id_be;
		}
		return 0;
	}
	return 0;
}

/* IPv6 extension headers, walked with a bounded loop. Returns the L4 offset or -1. */
static __always_inline int pf_walk_ipv6_ext(const struct pf_source *src, __u32 off, struct pf_packet *pkt)
{
	__u8 next = pkt->protocol;
#pragma unroll
	for (int i = 0; i < PF_MAX_IPV6_EXT_HEADERS; i++) {
		__u8 ext[8];
		switch (next) {
		case 0:   /* hop-by-hop */
		case 43:  /* routing */
		case 60:  /* destination options */
			if (pf_load(src, off, ext, 2) < 0)
				return -1;
			next = ext[0];
			off += ((__u32)ext[1] + 1) * 8;
			break;
		case 51:  /* authentication header: length in 4-byte units minus 2 */
			if (pf_load(src, off, ext, 2) < 0)
				return -1;
			next = ext[0];
			off += ((__u32)ext[1] + 2) * 4;
			break;
		case 44: {  /* fragment */
			__be16 frag_off_be;
			__be32 id_be;
			if (pf_load(src, off, ext, 8) < 0)
				return -1;
			next = ext[0];
			__builtin_memcpy(&frag_off_be, &ext[2], 2);
			__builtin_memcpy(&id_be, &ext[4], 4);
			pkt->frag_id = bpf_ntohl(id_be);
			if (bpf_ntohs(frag_off_be) & 0xfff8)
				pkt->flags |= PF_PKT_FRAG_LATER;
			else if (bpf_ntohs(frag_off_be) & 0x1)
				pkt->flags |= PF_PKT_FRAG_FIRST;
			off += 8;
			if (pkt->flags & PF_PKT_FRAG_LATER) {
				pkt->protocol = next;
				return off;
			}
			break;
		}
		default:
			pkt->protocol = next;
			return off;
		}
	}
	/* PF_MAX_IPV6_EXT_HEADERS walked: what follows may still be the upper layer */
	if (next != 0 && next != 43 && next != 44 && next != 51 && next != 60) {
		pkt->protocol = next;
		return off;
	}
	/* more extension headers than we are willing to walk */
	return -1;
}

/* Embedded header of an ICMP error at `off` (the inner IP header). Best effort: a missing inner
 * L4 header leaves ports at 0. Returns 0 or -1. */
static __always_inline int pf_parse_icmp_inner(const struct pf_source *src, __u32 off, struct pf_packet *pkt)
{
	__u8 icmp_type;
	__u8 quoted_l4[PF_L4_HEAD];  /* the quoted packet's L4 header, read apart */
	__u32 l4;
	if (pkt->family == 4) {
		struct iphdr inner;
		if (pf_load(src, off, &inner, sizeof(inner)) < 0 || inner.ihl < 5)
			return -1;
		pf_addr_from_v4(&pkt->inner_saddr, inner.saddr);
		pf_addr_from_v4(&pkt->inner_daddr, inner.daddr);
		pkt->inner_protocol = inner.protocol;
		l4 = off + inner.ihl * 4;
	} else {
		struct ipv6hdr inner;
		if (pf_load(src, off, &inner, sizeof(inner)) < 0)
			return -1;
		__builtin_memcpy(&pkt->inner_saddr, &inner.saddr, 16);
		__builtin_memcpy(&pkt->inner_daddr, &inner.daddr, 16);
		pkt->inner_protocol = inner.nexthdr;
		l4 = off + sizeof(inner);
	}
	if (pf_parse_ports(src, l4, pkt->inner_protocol, &pkt->inner_sport_be, &pkt->inner_dport_be,
			   &icmp_type, NULL, quoted_l4, 0) < 0) {
		pkt->inner_sport_be = 0;
		pkt->inner_dport_be = 0;
	}
	return 0;
}

/* Parse L3 (at l3_off) and L4. `eth_proto_be` selects the family. Always fills what it could;
 * sets PF_PKT_MALFORMED on failure. Returns 0 when the L3 header (addresses) is usable. */
static __always_inline int pf_parse(const struct pf_source *src, __u32 l3_off, __be16 eth_proto_be,
				    struct pf_packet *pkt)
{
	__u32 l4;
	__u8 icmp_type = 0;
	__u8 l4_head[PF_L4_HEAD];
	int have_l4 = 0;  /* l4_head holds the L4 header's first bytes */

	if (eth_proto_be == bpf_htons(ETH_P_IP)) {
		struct {
			struct iphdr ip;
			__u8 l4[PF_L4_HEAD];
		} head;
		__u16 frag;
		const struct iphdr *iph = &head.ip;
		have_l4 = pf_load(src, l3_off, &head, sizeof(head.ip) + PF_L4_HEAD) == 0;
		if ((!have_l4 && pf_load(src, l3_off, &head.ip, sizeof(head.ip)) < 0) || iph->version != 4 ||
		    iph->ihl < 5) {
			pkt->flags |= PF_PKT_MALFORMED;
			return -1;
		}
		pkt->family = 4;
		pf_addr_from_v4(&pkt->saddr, iph->saddr);
		pf_addr_from_v4(&pkt->daddr, iph->daddr);
		pkt->protocol = iph->protocol;
		/* IHL > 5: options are skipped by the header length, never interpreted here; from a
		 * pod they are refused apart from a lone Router Alert (podfence.c) */
		if (iph->ihl > 5)
			pkt->flags |= PF_PKT_IP_OPTIONS;
		if (bpf_ntohs(iph->tot_len) < iph->ihl * 4) {
			pkt->flags |= PF_PKT_MALFORMED;
			return 0;
		}
		frag = bpf_ntohs(iph->frag_off);
		pkt->frag_id = bpf_ntohs(iph->id);
		if (frag & 0x1fff)
			pkt->flags |= PF_PKT_FRAG_LATER;
		else if (frag & 0x2000)
			pkt->flags |= PF_PKT_FRAG_FIRST;
		l4 = l3_off + iph->ihl * 4;
		/* with options, the bytes read after the fixed header are options */
		if (have_l4 && iph->ihl == 5)
			__builtin_memcpy(l4_head, head.l4, PF_L4_HEAD);
		else
			have_l4 = 0;
	} else if (eth_proto_be == bpf_htons(ETH_P_IPV6)) {
		struct {
			struct ipv6hdr ip;
			__u8 l4[PF_L4_HEAD];
		} head;
		int off;
		const struct ipv6hdr *ip6 = &head.ip;
		have_l4 = pf_load(src, l3_off, &head, sizeof(head.ip) + PF_L4_HEAD) == 0;
		if ((!have_l4 && pf_load(src, l3_off, &head.ip, sizeof(head.ip)) < 0) || ip6->version != 6) {
			pkt->flags |= PF_PKT_MALFORMED;
			return -1;
		}
		pkt->family = 6;
		pkt->hop_limit = ip6->hop_limit;
		__builtin_memcpy(&pkt->saddr, &ip6->saddr, 16);
		__builtin_memcpy(&pkt->daddr, &ip6->daddr, 16);
		pkt->protocol = ip6->nexthdr;
		/* ::ffff:0:0/96 is how IPv4 addresses sit in the maps; on the wire it only deceives
		 * (Linux drops such sources on receive). A v4-mapped source names no one: unusable
		 * header. A v4-mapped destination: malformed, dropped where the direction is isolated
		 * instead of being judged as the IPv4 address it spells. */
		if (pf_is_v4_mapped(&pkt->saddr)) {
			pkt->flags |= PF_PKT_MALFORMED;
			return -1;
		}
		if (pf_is_v4_mapped(&pkt->daddr))
			pkt->flags |= PF_PKT_MALFORMED;
		off = pf_walk_ipv6_ext(src, l3_off + sizeof(*ip6), pkt);
		if (off < 0) {
			pkt->flags |= PF_PKT_MALFORMED;
			return 0;
		}
		l4 = off;
		/* after extension headers, the bytes read after the fixed header are theirs */
		if (have_l4 && off == l3_off + sizeof(head.ip))
			__builtin_memcpy(l4_head, head.l4, PF_L4_HEAD);
		else
			have_l4 = 0;
	} else {
		pkt->flags |= PF_PKT_MALFORMED;
		return -1;
	}

	if (pkt->flags & PF_PKT_FRAG_LATER)
		return 0;
	if (pf_parse_ports(src, l4, pkt->protocol, &pkt->sport_be, &pkt->dport_be, &icmp_type, &pkt->tcp_flags,
			   l4_head, have_l4) < 0) {
		pkt->flags |= PF_PKT_MALFORMED;
		return 0;
	}
	if (pf_is_icmp_error(pkt->protocol, icmp_type)) {
		pkt->flags |= PF_PKT_ICMP_ERROR;
		if (pf_parse_icmp_inner(src, l4 + 8, pkt) < 0)
			pkt->flags |= PF_PKT_MALFORMED;
	}
	/* Router/neighbour solicitation+advertisement and redirect (hop limit 255), MLD (hop limit 1):
	 * needed for IPv6 to work, and with those hop limits provably from the same link (RFC 4861,
	 * 3810), so a routed packet cannot pass as link plumbing. What a pod may send of them is
	 * narrowed by pf_check_ndp (lib/neigh.h): no router advertisements or redirects, nothing
	 * beyond the options address resolution uses. */
	if (pkt->protocol == PF_IPPROTO_ICMPV6 &&
	    ((icmp_type >= 133 && icmp_type <= 137 && pkt->hop_limit == 255) ||
	     ((icmp_type >= 130 && icmp_type <= 132) || icmp_type == 143) && pkt->hop_limit == 1))
		pkt->flags |= PF_PKT_NDP;
	return 0;
}

#endif /* PF_LIB_PARSE_H */
