/* Stateful filtering. One LRU map, one entry per flow: the key holds the flow's two ends in
 * canonical order (podfence.h), so a packet and its reply find the same entry with ONE lookup.
 * Per way of the flow (a->b, b->a) the entry records which judgement admitted packets going that
 * way, and the counter slot of the local pod that sends them:
 *  - a packet passes a judgement point that already admitted its own way (EGRESS_OK at the
 *    egress hook, INGRESS_OK at the ingress hook);
 *  - a packet is a reply when the OTHER way was admitted by the other side's judgement: at the
 *    egress hook if the other way was admitted by ingress, at the ingress hook if it was admitted
 *    by egress or opened by the pod itself (FROM_POD: recorded by tc ingress on the pre-DNAT
 *    tuple, because replies of a Service connection come back with the ClusterIP as source once
 *    conntrack has reversed the DNAT);
 *  - an ICMP error whose embedded tuple is tracked is related and passes.
 * Entries idle longer than the protocol's timeout are ignored (and overwritten); a TCP FIN or RST
 * switches an entry to the short closing timeout. A bare SYN on an entry whose connection ended
 * (a RST, or a FIN each way) opens a NEW connection on the same tuple: the entry forgets what the
 * old one was admitted for, so the new one is judged by the policy of now (as kernel conntrack,
 * and so the iptables dataplane, does).
 *
 * A flow's packets are judged on several CPUs (each way, three hooks). An entry is written only
 * when something changes: its timestamp once it is older than 1/PF_CT_REFRESH_SHARE of its
 * timeout (so an idle flow still expires within one share of the timeout), a flag or slot when
 * new. Writing on every packet made the entry's cache line bounce between CPUs. */
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

/* Does end (addr, port) sort after end (other, other_port)? The canonical order of key ends. */
static __always_inline int pf_end_after(const struct pf_addr *addr, __be16 port_be, const struct pf_addr *other,
					__be16 other_port_be)
{
	const __u64 *a = (const __u64 *)addr->bytes, *b = (const __u64 *)other->bytes;
	if (a[0] != b[0])
		return a[0] > b[0];
	if (a[1] != b[1])
		return a[1] > b[1];
	return port_be > other_port_be;
}

/* The key of the flow of a packet (saddr, sport) -> (daddr, dport); returns the way the packet
 * runs relative to it (PF_WAY_AB when the source is end a). */
static __always_inline int pf_ct_key_fill(struct pf_ct_key *key, const struct pf_addr *saddr,
					  const struct pf_addr *daddr, __be16 sport_be, __be16 dport_be,
					  __u8 protocol)
{
	int way = pf_end_after(saddr, sport_be, daddr, dport_be) ? PF_WAY_BA : PF_WAY_AB;
	const struct pf_addr *a = way == PF_WAY_AB ? saddr : daddr;
	const struct pf_addr *b = way == PF_WAY_AB ? daddr : saddr;

	__builtin_memset(key, 0, sizeof(*key));
	__builtin_memcpy(&key->addr_a, a, sizeof(key->addr_a));
	__builtin_memcpy(&key->addr_b, b, sizeof(key->addr_b));
	key->port_a_be = way == PF_WAY_AB ? sport_be : dport_be;
	key->port_b_be = way == PF_WAY_AB ? dport_be : sport_be;
	key->protocol = protocol;
	return way;
}

static __always_inline int pf_ct_packet_key(struct pf_ct_key *key, const struct pf_packet *pkt)
{
	return pf_ct_key_fill(key, &pkt->saddr, &pkt->daddr, pkt->sport_be, pkt->dport_be, pkt->protocol);
}

/* Per-way fields, chosen by branches: the verifier refuses a variable offset into the stack. */
static __always_inline __u8 pf_ct_way_flags(const struct pf_ct_value *entry, int way)
{
	return way == PF_WAY_AB ? entry->flags[0] : entry->flags[1];
}

static __always_inline __u32 pf_ct_way_slot(const struct pf_ct_value *entry, int way)
{
	return way == PF_WAY_AB ? entry->slot[0] : entry->slot[1];
}

/* Adds `flag` to `way` and sets the non-zero slots of the sender (this way) and the receiver
 * (the other way); writes only what changes. */
static __always_inline void pf_ct_way_mark(struct pf_ct_value *entry, int way, __u8 flag, __u32 sender_slot,
					   __u32 receiver_slot)
{
	__u8 *flags = way == PF_WAY_AB ? &entry->flags[0] : &entry->flags[1];
	__u32 *sender = way == PF_WAY_AB ? &entry->slot[0] : &entry->slot[1];
	__u32 *receiver = way == PF_WAY_AB ? &entry->slot[1] : &entry->slot[0];

	/* not atomic: a flag lost to a concurrent update only costs a re-judgement */
	if (flag && !(*flags & flag))
		*flags |= flag;
	if (sender_slot && *sender != sender_slot)
		*sender = sender_slot;
	if (receiver_slot && *receiver != receiver_slot)
		*receiver = receiver_slot;
}

/* Does `pkt` open a new connection on the tuple of `entry`, whose connection has ended: reset, or
 * finished both ways (as kernel conntrack reopens from CLOSE and TIME_WAIT)? A connection closed
 * one way only may still carry data the other way, and is not restarted by a SYN someone sends
 * on its tuple. */
static __always_inline int pf_ct_reopens(const struct pf_ct_value *entry, const struct pf_packet *pkt)
{
	int ended = (entry->closing & PF_CT_RST) ||
		    (entry->closing & (PF_CT_FIN_AB | PF_CT_FIN_BA)) == (PF_CT_FIN_AB | PF_CT_FIN_BA);
	return ended && pkt->protocol == PF_IPPROTO_TCP && (pkt->tcp_flags & 0x12) == 0x02;
}

/* Notes a FIN (per way) or RST of `pkt` in the entry's closing state; writes only what is new. */
static __always_inline void pf_ct_note_close(struct pf_ct_value *entry, int way, const struct pf_packet *pkt)
{
	if (pkt->protocol != PF_IPPROTO_TCP)
		return;
	__u8 seen = 0;
	if (pkt->tcp_flags & 0x04)
		seen |= PF_CT_RST;
	if (pkt->tcp_flags & 0x01)
		seen |= way == PF_WAY_AB ? PF_CT_FIN_AB : PF_CT_FIN_BA;
	if (seen & ~entry->closing)
		entry->closing |= seen;
}

/* Forgets the closed connection of `entry` in place (a fresh entry would cost an LRU insert per
 * reused tuple). The admissions go first, so that a reader on another CPU sees them gone before
 * the entry looks live again: stores keep their order on x86; a weakly ordered CPU could show a
 * reader the old admissions for the nanoseconds of the rewrite, as the old entry showed them
 * until the SYN came. */
static __always_inline void pf_ct_restart(struct pf_ct_value *entry, __u64 now)
{
	entry->flags[0] = 0;
	entry->flags[1] = 0;
	entry->slot[0] = 0;
	entry->slot[1] = 0;
	entry->last_seen_ns = now;
	entry->closing = 0;
}

static __always_inline __u64 pf_ct_entry_timeout_ns(const struct pf_ct_value *entry, __u8 protocol)
{
	if (entry->closing)
		return PF_CT_TIMEOUT_TCP_CLOSING * PF_NSEC;
	return pf_ct_timeout_ns(protocol);
}

/* The live entry of `key` (NULL if absent or expired). With `pkt`: refreshes the timestamp and
 * follows TCP's end (FIN/RST: closing timeout) and a reuse of the tuple (a bare SYN: the entry
 * is restarted, no admission left). */
static __always_inline struct pf_ct_value *pf_ct_entry(struct pf_ct_key *key, int way, __u64 now,
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
		if (pf_ct_reopens(entry, pkt)) {
			pf_ct_restart(entry, now);
			return entry;
		}
		if (age > timeout / PF_CT_REFRESH_SHARE)
			entry->last_seen_ns = now;
		pf_ct_note_close(entry, way, pkt);
	}
	return entry;
}

/* A packet's flow: its key, the way the packet runs relative to it, and its live entry (NULL:
 * none, or expired). Found once per program run, then read and admitted through: the SYN of a
 * connection used to look its entry up six times on its way through the three programs. */
struct pf_ct_flow {
	struct pf_ct_key key;
	struct pf_ct_value *entry;
	int way;
};

/* Finds the flow of `pkt`; its entry, if live, is refreshed and follows TCP's end and a reuse of
 * the tuple (pf_ct_entry). */
static __always_inline void pf_ct_find(struct pf_ct_flow *flow, const struct pf_packet *pkt, __u64 now)
{
	flow->way = pf_ct_packet_key(&flow->key, pkt);
	flow->entry = pf_ct_entry(&flow->key, flow->way, now, pkt);
}

/* Records that `flag` admitted the packet's way of `flow` (found by pf_ct_find for this packet).
 * `sender_slot` / `receiver_slot`: endpoint_id + 1 of the local pod sending / receiving it (0:
 * none or not known here); the receiver sends the replies, so its slot is the other way's. */
static __always_inline void pf_ct_admit(struct pf_ct_flow *flow, __u32 flag, __u64 now, __u32 sender_slot,
					__u32 receiver_slot)
{
	if (flow->entry) {
		pf_ct_way_mark(flow->entry, flow->way, flag, sender_slot, receiver_slot);
		return;
	}
	struct pf_ct_value fresh = {.last_seen_ns = now};
	pf_ct_way_mark(&fresh, flow->way, flag, sender_slot, receiver_slot);
	pf_ct.update(&flow->key, &fresh);
}

#define PF_CT_MISS 0
#define PF_CT_ESTABLISHED 1
#define PF_CT_REPLY 2
#define PF_CT_RELATED 3

/* Is the ICMP error `pkt` related to a tracked flow? The embedded packet went either way of it. */
static __always_inline int pf_ct_related(const struct pf_packet *pkt, __u64 now)
{
	struct pf_ct_key key;
	pf_ct_key_fill(&key, &pkt->inner_saddr, &pkt->inner_daddr, pkt->inner_sport_be, pkt->inner_dport_be,
		       pkt->inner_protocol);
	struct pf_ct_value *related = pf_ct_entry(&key, PF_WAY_AB, now, NULL);
	return related && (related->flags[0] | related->flags[1]) ? PF_CT_RELATED : PF_CT_MISS;
}

/* Is the packet of `flow` part of a flow admitted before, seen from `direction`'s judgement? */
static __always_inline int pf_ct_state(const struct pf_ct_flow *flow, int direction)
{
	__u32 same = direction == PF_DIR_EGRESS ? PF_CT_EGRESS_OK : PF_CT_INGRESS_OK;
	__u32 other = direction == PF_DIR_EGRESS ? PF_CT_INGRESS_OK : (PF_CT_EGRESS_OK | PF_CT_FROM_POD);
	const struct pf_ct_value *entry = flow->entry;

	if (!entry)
		return PF_CT_MISS;
	if (pf_ct_way_flags(entry, flow->way) & same)
		return PF_CT_ESTABLISHED;
	if (pf_ct_way_flags(entry, !flow->way) & other)
		return PF_CT_REPLY;
	return PF_CT_MISS;
}

/* nf_egress's fast path: the counter slot (+1) of the local pod sending the packet of `flow`, when
 * the flow is known: the source pod's egress admitted this way (PF_CT_ESTABLISHED), or this is a
 * reply to what the sender's ingress admitted (PF_CT_REPLY). Exactly the packets pf_judge passes
 * through pf_ct_state, found without looking up the pod. 0: judge it in full. */
static __always_inline __u32 pf_ct_egress_slot(const struct pf_ct_flow *flow)
{
	const struct pf_ct_value *entry = flow->entry;
	__u32 slot = entry ? pf_ct_way_slot(entry, flow->way) : 0;
	if (slot && ((pf_ct_way_flags(entry, flow->way) & PF_CT_EGRESS_OK) ||
		     (pf_ct_way_flags(entry, !flow->way) & PF_CT_INGRESS_OK)))
		return slot;
	return 0;
}

/* An egress deny withdraws what tc_from_pod recorded for the same tuple, so a peer cannot answer
 * a packet the pod was not allowed to send. (A DNATed tuple differs; its reply could only come
 * from conntrack's un-DNAT of a confirmed connection, which a dropped packet never confirms.) */
static __always_inline void pf_ct_forget_unjudged(struct pf_ct_flow *flow)
{
	struct pf_ct_value *entry = flow->entry;
	if (!entry || pf_ct_way_flags(entry, flow->way) != PF_CT_FROM_POD)
		return;
	if (!pf_ct_way_flags(entry, !flow->way))
		pf_ct.delete(&flow->key);
	else if (flow->way == PF_WAY_AB)
		entry->flags[0] = 0;
	else
		entry->flags[1] = 0;
}

#endif /* PF_LIB_CONNTRACK_H */
