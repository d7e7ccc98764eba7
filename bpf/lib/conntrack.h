/* Stateful filtering. One LRU map keyed by the original direction's tuple; the value says which
 * judgement admitted the flow:
 *  - a packet matching the tuple as is passes a judgement point that already admitted it
 *    (EGRESS_OK at the egress hook, INGRESS_OK at the ingress hook);
 *  - a packet matching the reversed tuple is a reply and passes the OTHER side's judgement:
 *    at the egress hook if the flow was admitted by ingress, at the ingress hook if it was
 *    admitted by egress or sent by the pod itself (FROM_POD: recorded by tc ingress on the
 *    pre-DNAT tuple, because replies of a Service connection come back with the ClusterIP as
 *    source once conntrack has reversed the DNAT);
 *  - an ICMP error whose embedded tuple (either way round) is tracked is related and passes.
 * Entries idle longer than the protocol's timeout are ignored (and overwritten); a TCP FIN or RST
 * switches an entry to the short closing timeout, a later bare SYN on the same tuple back.
 *
 * A flow's packets are judged on several CPUs (each direction, three hooks). An entry is written
 * only when something changes: its timestamp once it is older than 1/PF_CT_REFRESH_SHARE of its
 * timeout (so an idle flow still expires within one share of the timeout), its flags when a flag
 * is new. Writing on every packet made the entry's cache line bounce between CPUs. */
#ifndef PF_LIB_CONNTRACK_H
#define PF_LIB_CONNTRACK_H

PF_PINNED("lru_hash", struct pf_ct_key, struct pf_ct_value, pf_ct, PF_CT_MAX, 0);

#define PF_CT_REFRESH_SHARE 64

static __always_inline __u64 pf_ct_timeout_ns(__u8 protocol)
{
	switch (protocol) {
	case PF_IPPROTO_TCP:
		return PF_CT_TIMEOUT_TCP * PF_NSEC;
	case PF_IPPROTO_UDP:
		return PF_CT_TIMEOUT_UDP * PF_NSEC;
	case PF_IPPROTO_SCTP:
		return PF_CT_TIMEOUT_SCTP * PF_NSEC;
	case PF_IPPROTO_ICMP:
	case PF_IPPROTO_ICMPV6:
		return PF_CT_TIMEOUT_ICMP * PF_NSEC;
	default:
		return PF_CT_TIMEOUT_OTHER * PF_NSEC;
	}
}

static __always_inline void pf_ct_key_fill(struct pf_ct_key *key, const struct pf_addr *saddr,
					   const struct pf_addr *daddr, __be16 sport_be, __be16 dport_be,
					   __u8 protocol)
{
	__builtin_memset(key, 0, sizeof(*key));
	__builtin_memcpy(&key->saddr, saddr, sizeof(key->saddr));
	__builtin_memcpy(&key->daddr, daddr, sizeof(key->daddr));
	key->sport_be = sport_be;
	key->dport_be = dport_be;
	key->protocol = protocol;
}

static __always_inline __u64 pf_ct_entry_timeout_ns(const struct pf_ct_value *entry, __u8 protocol)
{
	if (entry->flags & PF_CT_CLOSING)
		return PF_CT_TIMEOUT_TCP_CLOSING * PF_NSEC;
	return pf_ct_timeout_ns(protocol);
}

/* The live entry of `key` (NULL if absent or expired). With `pkt`: refreshes the timestamp and
 * follows TCP's end (FIN/RST: closing timeout) and a reuse of the tuple (a bare SYN). */
static __always_inline struct pf_ct_value *pf_ct_entry(struct pf_ct_key *key, __u64 now,
							const struct pf_packet *pkt)
{
	struct pf_ct_value *entry = pf_ct.lookup(key);
	if (!entry)
		return NULL;
	__u64 timeout = pf_ct_entry_timeout_ns(entry, key->protocol);
	__u64 age = pf_elapsed(now, entry->last_seen_ns);
	if (age > timeout)
		return NULL;
	if (pkt) {
		if (age > timeout / PF_CT_REFRESH_SHARE)
			entry->last_seen_ns = now;
		if (pkt->protocol == PF_IPPROTO_TCP) {
			if ((pkt->tcp_flags & 0x05) && !(entry->flags & PF_CT_CLOSING))
				entry->flags |= PF_CT_CLOSING;
			else if ((pkt->tcp_flags & 0x12) == 0x02 && (entry->flags & PF_CT_CLOSING))
				entry->flags &= ~PF_CT_CLOSING;
		}
	}
	return entry;
}

static __always_inline __u32 pf_ct_flags(struct pf_ct_key *key, __u64 now, const struct pf_packet *pkt)
{
	struct pf_ct_value *entry = pf_ct_entry(key, now, pkt);
	return entry ? entry->flags : 0;
}

/* `source_slot`: endpoint_id + 1 of the local pod sending the original direction, 0 if none. */
static __always_inline void pf_ct_mark(struct pf_ct_key *key, __u64 now, __u32 flag, __u32 source_slot)
{
	struct pf_ct_value *entry = pf_ct.lookup(key);
	__u64 timeout = entry ? pf_ct_entry_timeout_ns(entry, key->protocol) : 0;
	if (entry && pf_elapsed(now, entry->last_seen_ns) <= timeout) {
		if (pf_elapsed(now, entry->last_seen_ns) > timeout / PF_CT_REFRESH_SHARE)
			entry->last_seen_ns = now;
		/* not atomic: a flag lost to a concurrent update only costs a re-judgement */
		if (!(entry->flags & flag))
			entry->flags |= flag;
		if (source_slot && entry->source_slot != source_slot)
			entry->source_slot = source_slot;
		return;
	}
	struct pf_ct_value fresh = {.last_seen_ns = now, .flags = flag, .source_slot = source_slot};
	pf_ct.update(key, &fresh);
}

#define PF_CT_MISS 0
#define PF_CT_ESTABLISHED 1
#define PF_CT_REPLY 2
#define PF_CT_RELATED 3

/* Is the packet part of (or related to) a flow admitted before? */
static __always_inline int pf_ct_check(const struct pf_packet *pkt, int direction, __u64 now)
{
	struct pf_ct_key key;
	__u32 same = direction == PF_DIR_EGRESS ? PF_CT_EGRESS_OK : PF_CT_INGRESS_OK;
	__u32 other = direction == PF_DIR_EGRESS ? PF_CT_INGRESS_OK : (PF_CT_EGRESS_OK | PF_CT_FROM_POD);

	if (pkt->flags & PF_PKT_ICMP_ERROR) {
		/* the embedded packet was sent by the receiver of this error */
		pf_ct_key_fill(&key, &pkt->inner_saddr, &pkt->inner_daddr, pkt->inner_sport_be,
			       pkt->inner_dport_be, pkt->inner_protocol);
		if (pf_ct_flags(&key, now, NULL))
			return PF_CT_RELATED;
		pf_ct_key_fill(&key, &pkt->inner_daddr, &pkt->inner_saddr, pkt->inner_dport_be,
			       pkt->inner_sport_be, pkt->inner_protocol);
		if (pf_ct_flags(&key, now, NULL))
			return PF_CT_RELATED;
		return PF_CT_MISS;
	}
	pf_ct_key_fill(&key, &pkt->saddr, &pkt->daddr, pkt->sport_be, pkt->dport_be, pkt->protocol);
	if (pf_ct_flags(&key, now, pkt) & same)
		return PF_CT_ESTABLISHED;
	pf_ct_key_fill(&key, &pkt->daddr, &pkt->saddr, pkt->dport_be, pkt->sport_be, pkt->protocol);
	if (pf_ct_flags(&key, now, pkt) & other)
		return PF_CT_REPLY;
	return PF_CT_MISS;
}

static __always_inline void pf_ct_admit(const struct pf_packet *pkt, __u32 flag, __u64 now, __u32 source_slot)
{
	struct pf_ct_key key;
	pf_ct_key_fill(&key, &pkt->saddr, &pkt->daddr, pkt->sport_be, pkt->dport_be, pkt->protocol);
	pf_ct_mark(&key, now, flag, source_slot);
}

/* nf_egress's fast path: the live entry of a packet's own tuple, when that names the sending
 * pod's counter slot and the flow is known: the source pod's egress admitted this direction
 * (PF_CT_ESTABLISHED), or this is a reply to what the destination's ingress admitted
 * (PF_CT_REPLY). Exactly the packets pf_judge passes through pf_ct_check, minus the ones it
 * treats apart (fragments, ICMP errors, neighbour discovery, malformed); found without looking
 * up the pod. NULL: judge it in full. */
static __always_inline struct pf_ct_value *pf_ct_egress_flow(const struct pf_packet *pkt, __u64 now)
{
	if (pkt->flags & (PF_PKT_MALFORMED | PF_PKT_IS_FRAGMENT | PF_PKT_ICMP_ERROR | PF_PKT_NDP))
		return NULL;
	struct pf_ct_key key;
	pf_ct_key_fill(&key, &pkt->saddr, &pkt->daddr, pkt->sport_be, pkt->dport_be, pkt->protocol);
	struct pf_ct_value *entry = pf_ct_entry(&key, now, pkt);
	if (!entry || entry->source_slot == 0)
		return NULL;
	if (entry->flags & PF_CT_EGRESS_OK)
		return entry;
	pf_ct_key_fill(&key, &pkt->daddr, &pkt->saddr, pkt->dport_be, pkt->sport_be, pkt->protocol);
	return pf_ct_flags(&key, now, pkt) & PF_CT_INGRESS_OK ? entry : NULL;
}

/* An egress deny withdraws what tc_from_pod recorded for the same tuple, so a peer cannot answer
 * a packet the pod was not allowed to send. (A DNATed tuple differs; its reply could only come
 * from conntrack's un-DNAT of a confirmed connection, which a dropped packet never confirms.) */
static __always_inline void pf_ct_forget_unjudged(const struct pf_packet *pkt)
{
	struct pf_ct_key key;
	pf_ct_key_fill(&key, &pkt->saddr, &pkt->daddr, pkt->sport_be, pkt->dport_be, pkt->protocol);
	struct pf_ct_value *entry = pf_ct.lookup(&key);
	if (entry && entry->flags == PF_CT_FROM_POD)
		pf_ct.delete(&key);
}

#endif /* PF_LIB_CONNTRACK_H */
