/* Fragments: only the first fragment carries the L4 header, so its verdict is remembered per
 * (src, dst, id, protocol, direction) and applied to the later fragments. A later fragment
 * without a remembered first fragment is an orphan. */
#ifndef PF_LIB_FRAG_H
#define PF_LIB_FRAG_H

PF_PINNED("lru_hash", struct pf_frag_key, struct pf_frag_value, pf_frag, PF_FRAG_MAX, 0);

/* The key's direction for a first fragment tc_from_pod saw a pod send, before any verdict: it
 * only tells tc_from_pod that the later fragments belong to a datagram. It is a key space of its
 * own so that no verdict ever reads it as an admission: a first fragment the kernel discards
 * before the egress verdict (TTL 1, say) must not let later fragments pass there. */
#define PF_FRAG_SENT_BY_POD 2

static __always_inline void pf_frag_key_fill(struct pf_frag_key *key, const struct pf_packet *pkt, int direction)
{
	__builtin_memset(key, 0, sizeof(*key));
	__builtin_memcpy(&key->saddr, &pkt->saddr, sizeof(key->saddr));
	__builtin_memcpy(&key->daddr, &pkt->daddr, sizeof(key->daddr));
	key->id = pkt->frag_id;
	key->protocol = pkt->protocol;
	key->direction = direction;
}

static __always_inline void pf_frag_remember(const struct pf_packet *pkt, int direction, __u32 reason, __u64 now)
{
	struct pf_frag_key key;
	struct pf_frag_value value = {
		.reason = reason,
		.sport_be = pkt->sport_be,
		.dport_be = pkt->dport_be,
		.last_seen_ns = now,
	};
	pf_frag_key_fill(&key, pkt, direction);
	pf_frag.update(&key, &value);
}

/* Verdict of the first fragment, or PF_DROP_ORPHAN_FRAGMENT. */
static __always_inline __u32 pf_frag_verdict(struct pf_packet *pkt, int direction, __u64 now)
{
	struct pf_frag_key key;
	pf_frag_key_fill(&key, pkt, direction);
	struct pf_frag_value *first = pf_frag.lookup(&key);
	if (!first || pf_elapsed(now, first->last_seen_ns) > PF_FRAG_TIMEOUT_NS)
		return PF_DROP_ORPHAN_FRAGMENT;
	/* ports of the first fragment make events and counters of later fragments meaningful */
	pkt->sport_be = first->sport_be;
	pkt->dport_be = first->dport_be;
	return first->reason;
}

#endif /* PF_LIB_FRAG_H */
