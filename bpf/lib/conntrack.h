/* Stateful filtering. One LRU map, one entry per flow: the key holds the flow's two ends in
 * canonical order (podfence.h), so a packet and its reply find the same entry with ONE lookup.
 * Per way of the flow (a->b, b->a) the entry records which judgement admitted packets going that
 * way, and the counter slot of the local pod that sends them:
 *  - a packet passes a judgement point that already admitted its own way (EGRESS_OK at the
 *    egress hook, INGRESS_OK at the ingress hook);
 *  - a packet is a reply when the OTHER way was admitted by the other side's judgement: at the
 *    egress hook if the other way was admitted by ingress, at the ingress hook if it was admitted
 *    by egress (EGRESS_OK on the tuple the egress verdict saw, FROM_POD on the tuple the pod sent:
 *    replies of a Service connection come back with the ClusterIP as source once conntrack has
 *    reversed the DNAT, so they match neither the post-DNAT tuple nor anything else);
 *  - an ICMP error is related (pf_ct_related) when it travels back to the sender of the packet
 *    it quotes, from that packet's destination or from a router (no pod is one), and the quoted
 *    packet's way was admitted where it was judged.
 * Nothing is marked admitted before the verdict that admits it. FROM_POD is written by the egress
 * verdict, which sees the packet after DNAT, from what tc_from_pod saw the pod send: an
 * expectation (pf_ct_note, below) that grants nothing by itself. Before 2026-12-07 tc_from_pod
 * wrote FROM_POD itself and the egress verdict withdrew it on a deny; a packet the kernel discards
 * between the two (TTL or hop limit 1, a bad checksum, a foreign destination MAC, ...) never met
 * the verdict, so a pod isolated both ways could open a "reply" path from any peer to itself.
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

/* What one endpoint may hold (issue 21, item 10). pf_ct is one LRU for the node: a pod opening
 * flows faster than others' idle flows are used would evict every one of them (a reply of an
 * egress-only flow is then dropped, in reset mode a TCP connection ends). So each entry is
 * charged to the endpoint whose verdict inserted it (`owner`): the pod that opened the flow from
 * this node, or, for a flow from elsewhere, the local pod it goes to. An endpoint charged for
 * PF_CT_ENDPOINT_MAX live entries has its new flows dropped (PF_DROP_FLOW_LIMIT): a flood costs
 * that pod, and the LRU never fills with one pod's flows. An LRU evicts silently, so the datapath
 * cannot count what an endpoint still holds: it only adds to pf_ct_charged, and the agent
 * (dataplane.release_conntrack) counts the live entries per owner, deletes the expired ones
 * and writes pf_ct_released = charged before its count - live. Entries inserted during the count
 * make `released` smaller, never larger: an endpoint is never credited with an entry it holds.
 * Per endpoint and CPU the check and the charge are not one atomic step: a bound may be exceeded
 * by one entry per CPU. */
PF_PINNED("array", __u32, __u64, pf_ct_charged, PF_ENDPOINTS_MAX, 0);
PF_PINNED("array", __u32, __u64, pf_ct_released, PF_ENDPOINTS_MAX, 0);

/* Charges `owner` (endpoint_id + 1; 0: nobody) one entry; 0 when it already holds its bound. */
static __always_inline int pf_ct_charge(__u32 owner)
{
	if (!PF_CT_ENDPOINT_MAX || !owner)
		return 1;
	__u32 index = owner - 1;
	__u64 *charged = pf_ct_charged.lookup(&index);
	__u64 *released = pf_ct_released.lookup(&index);
	if (!charged || !released)
		return 1;  /* endpoint ids are below PF_ENDPOINTS_MAX: not reached */
	if ((__s64)(*charged - *released) >= PF_CT_ENDPOINT_MAX)
		return 0;
	__sync_fetch_and_add(charged, 1);
	return 1;
}

/* Records that `flag` admitted the packet's way of `flow` (found by pf_ct_find for this packet).
 * `sender_slot` / `receiver_slot`: endpoint_id + 1 of the local pod sending / receiving it (0:
 * none or not known here); the receiver sends the replies, so its slot is the other way's.
 * `owner`: endpoint_id + 1 of the pod whose verdict this is, charged for a new entry. Returns 0
 * when a new entry was refused because the owner holds its bound (pf_ct_charge). */
static __always_inline int pf_ct_admit(struct pf_ct_flow *flow, __u32 flag, __u64 now, __u32 sender_slot,
				       __u32 receiver_slot, __u32 owner)
{
	if (flow->entry) {
		pf_ct_way_mark(flow->entry, flow->way, flag, sender_slot, receiver_slot);
		return 1;
	}
	if (!pf_ct_charge(owner))
		return 0;
	struct pf_ct_value fresh = {.last_seen_ns = now, .owner = owner};
	pf_ct_way_mark(&fresh, flow->way, flag, sender_slot, receiver_slot);
	pf_ct.update(&flow->key, &fresh);
	return 1;
}

#define PF_CT_MISS 0
#define PF_CT_ESTABLISHED 1
#define PF_CT_REPLY 2
#define PF_CT_RELATED 3

static __always_inline int pf_addr_equal(const struct pf_addr *a, const struct pf_addr *b)
{
	const __u64 *x = (const __u64 *)a->bytes, *y = (const __u64 *)b->bytes;
	return x[0] == y[0] && x[1] == y[1];
}

/* May `addr` be a router that reports an error about a flow it is not an end of? Any address but
 * a pod's: a pod forwards nothing. Pods of this node are all known (anti-spoofed, so a local pod
 * can only claim its own address); a pod elsewhere is known when a policy here names it. */
static __always_inline int pf_ct_may_route(const struct pf_addr *addr, __u32 generation)
{
	if (pf_endpoint_ips.lookup((struct pf_addr *)addr))
		return 0;
	struct pf_ipcache_key key = {.generation = generation};
	__builtin_memcpy(&key.addr, addr, sizeof(key.addr));
	return pf_ipcache.lookup(&key) == NULL;
}

/* Is the ICMP error `pkt`, met at `direction`'s judgement of a pod, related to a flow admitted
 * before? As nf_conntrack accepts one (and so the iptables dataplane): it travels back to the
 * sender of the packet it quotes, and that packet's way of the flow was admitted where it was
 * judged: towards the pod (ingress) the quoted packet is one the pod sent, so its egress admitted
 * that way (EGRESS_OK, FROM_POD) or it answered what its ingress admitted; from the pod (egress)
 * it is one the pod received. The error comes from the quoted packet's destination, or from a
 * router on the path (pf_ct_may_route; conntrack's un-DNAT gives a Service's errors the
 * ClusterIP as source). Before 2026-12-07 any tracked quoted tuple passed, whatever the error's
 * addresses: a pod could hand payload in errors to a pod whose ingress denies it.
 * `generation`: the pod's peer-map generation. */
static __always_inline int pf_ct_related(const struct pf_packet *pkt, int direction, __u32 generation, __u64 now)
{
	if (!pf_addr_equal(&pkt->daddr, &pkt->inner_saddr))
		return PF_CT_MISS;
	struct pf_ct_key key;
	int way = pf_ct_key_fill(&key, &pkt->inner_saddr, &pkt->inner_daddr, pkt->inner_sport_be,
				 pkt->inner_dport_be, pkt->inner_protocol);
	struct pf_ct_value *quoted = pf_ct_entry(&key, way, now, NULL);
	if (!quoted)
		return PF_CT_MISS;
	__u8 own = pf_ct_way_flags(quoted, way), other = pf_ct_way_flags(quoted, !way);
	__u8 sent = PF_CT_EGRESS_OK | PF_CT_FROM_POD;
	int admitted = direction == PF_DIR_INGRESS ? (own & sent) || (other & PF_CT_INGRESS_OK) :
						     (own & PF_CT_INGRESS_OK) || (other & sent);
	if (!admitted)
		return PF_CT_MISS;
	if (pf_addr_equal(&pkt->saddr, &pkt->inner_daddr) || pf_ct_may_route(&pkt->saddr, generation))
		return PF_CT_RELATED;
	return PF_CT_MISS;
}

/* Is the packet of `flow` part of a flow admitted before, seen from `direction`'s judgement of the
 * pod whose counter slot (+1) is `slot`? The admission must be that pod's: its slot is the one of
 * the way it sends (this way at egress, the other at ingress). On a bridge a frame to a MAC not yet
 * learnt is flooded to every port; the copy at an open port admits the flow, and without the slot
 * the copy at an isolated pod's port would pass as that flow's (found by tests/adversarial). */
static __always_inline int pf_ct_state(const struct pf_ct_flow *flow, int direction, __u32 slot)
{
	__u32 same = direction == PF_DIR_EGRESS ? PF_CT_EGRESS_OK : PF_CT_INGRESS_OK;
	__u32 other = direction == PF_DIR_EGRESS ? PF_CT_INGRESS_OK : (PF_CT_EGRESS_OK | PF_CT_FROM_POD);
	const struct pf_ct_value *entry = flow->entry;

	if (!entry)
		return PF_CT_MISS;
	if (pf_ct_way_slot(entry, direction == PF_DIR_EGRESS ? flow->way : !flow->way) != slot)
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

/* Expectations: how the egress verdict learns the tuple a pod sent, to write FROM_POD on it.
 *
 * tc_from_pod sees a packet as the pod sent it; the egress verdict (FORWARD / LOCAL_IN) sees it
 * after kube-proxy's DNAT and is the one that may admit. So tc_from_pod only notes, per pod end
 * (address, port, protocol) and CPU, the destination a flow-opening packet went to
 * (pf_ct_note); the egress verdict, judging a flow-opening packet, reads the note of its own
 * source end on its CPU (pf_ct_expectation) and, if it admits the packet and the note names
 * another destination than the packet has now (it was DNATed), writes FROM_POD and the pod's slot
 * on the tuple the pod sent (pf_ct_settle). A note grants nothing by itself: a packet the kernel
 * drops before the verdict leaves one behind that no verdict ever turns into an admission.
 *
 * The note must be the judged packet's own. tc ingress and the hook run on one CPU for one
 * packet, so a note keyed by CPU is written by no other CPU in between; on that CPU, packets are
 * handled one by one (backlog) or, with list receive, tc for a batch and then the hook for the
 * same batch. So between a packet's note and its verdict only packets of the same batch can
 * write the same key, and a note that replaces a live one naming another destination marks the
 * key ambiguous for PF_CT_EXPECT_NS: the verdict then promotes nothing, and records nothing
 * either for a packet whose destination differs from the note (it was DNATed, or the note is
 * another packet's), so that the flow's next packet is judged and promoted again (a bare SYN on
 * the egress fast path settles its note as well: a retransmit heals a lost note). A fragmented
 * datagram reaches the hook when its last fragment completes it; every fragment of an
 * egress-isolated pod notes the destination again (tc_from_pod), so the completing one is in the
 * verdict's batch as well. (A pod whose egress is open could reach any destination anyway.) A
 * taken note is deleted (it vouches for nothing more, and the map stays nearly empty: inserts
 * then come from the free list, per CPU, instead of evicting). What this gives up: a socket that sends, from
 * one port and on one CPU, to a Service and to another destination within PF_CT_EXPECT_NS of
 * each other has its Service packets judged on each packet until the two stop overlapping; and a
 * queue between PREROUTING and the hook that moves packets to another CPU (NFQUEUE) makes
 * Service replies fail closed. */
PF_PINNED("lru_hash", struct pf_ct_expect_key, struct pf_ct_expect_value, pf_ct_expect, PF_CT_EXPECT_MAX,
	  BPF_F_NO_COMMON_LRU);

static __always_inline void pf_ct_expect_key_fill(struct pf_ct_expect_key *key, const struct pf_packet *pkt)
{
	__builtin_memset(key, 0, sizeof(*key));
	__builtin_memcpy(&key->saddr, &pkt->saddr, sizeof(key->saddr));
	key->sport_be = pkt->sport_be;
	key->protocol = pkt->protocol;
	key->cpu = bpf_get_smp_processor_id();
}

static __always_inline int pf_ct_expect_recent(__u64 stamp, __u64 now)
{
	return stamp && pf_elapsed(now, stamp) <= PF_CT_EXPECT_NS;
}

static __always_inline int pf_ct_expect_names(const struct pf_ct_expect_value *note, const struct pf_packet *pkt)
{
	return pf_addr_equal(&note->daddr, &pkt->daddr) && note->dport_be == pkt->dport_be;
}

/* tc_from_pod: the pod sends flow-opening `pkt` (its tuple as sent). Writes only what changes. */
static __always_inline void pf_ct_note(const struct pf_packet *pkt, __u64 now)
{
	struct pf_ct_expect_key key;
	pf_ct_expect_key_fill(&key, pkt);
	struct pf_ct_expect_value *note = pf_ct_expect.lookup(&key);
	if (!note) {
		struct pf_ct_expect_value fresh = {.dport_be = pkt->dport_be, .seen_ns = now};
		__builtin_memcpy(&fresh.daddr, &pkt->daddr, sizeof(fresh.daddr));
		pf_ct_expect.update(&key, &fresh);
		return;
	}
	if (!pf_ct_expect_names(note, pkt)) {
		if (pf_ct_expect_recent(note->seen_ns, now))
			note->conflict_ns = now;
		__builtin_memcpy(&note->daddr, &pkt->daddr, sizeof(note->daddr));
		note->dport_be = pkt->dport_be;
	}
	if (note->seen_ns != now)
		note->seen_ns = now;
}

/* The egress verdict: the note of flow-opening `pkt`'s source end on this CPU (NULL: none). */
static __always_inline struct pf_ct_expect_value *pf_ct_expectation(const struct pf_packet *pkt)
{
	struct pf_ct_expect_key key;
	pf_ct_expect_key_fill(&key, pkt);
	return pf_ct_expect.lookup(&key);
}

/* May the egress verdict record its admission of `pkt` (EGRESS_OK on its tuple)? Not when the note
 * is ambiguous and names another destination: the packet may have been DNATed from a destination
 * no note vouches for, and recording the flow would keep its next packets from being promoted. */
static __always_inline int pf_ct_expect_lets_record(const struct pf_ct_expect_value *note,
						   const struct pf_packet *pkt, __u64 now)
{
	return !note || !pf_ct_expect_recent(note->seen_ns, now) || !pf_ct_expect_recent(note->conflict_ns, now) ||
	       pf_ct_expect_names(note, pkt);
}

/* After the egress verdict on flow-opening `pkt` (`admitted` or not) of the pod whose counter slot
 * is `slot`: a live, unambiguous note is taken, and if the packet was admitted with another
 * destination than the pod sent it to (DNAT), the tuple the pod sent is admitted for its replies
 * (FROM_POD). */
static __always_inline void pf_ct_settle(struct pf_ct_expect_value *note, const struct pf_packet *pkt, int admitted,
					 __u32 slot, __u64 now)
{
	if (!note || !pf_ct_expect_recent(note->seen_ns, now) || pf_ct_expect_recent(note->conflict_ns, now))
		return;
	int dnat = !pf_ct_expect_names(note, pkt);
	struct pf_addr daddr;
	__builtin_memcpy(&daddr, &note->daddr, sizeof(daddr));
	__be16 dport_be = note->dport_be;
	/* taken: deleted rather than marked, so that the map stays nearly empty and the next note
	 * is inserted from the free list instead of evicting (bpf_stats: an LRU insert that evicts
	 * cost tc_from_pod ~100 ns a packet on the connection benchmark) */
	struct pf_ct_expect_key key;
	pf_ct_expect_key_fill(&key, pkt);
	pf_ct_expect.delete(&key);
	if (!admitted || !dnat)
		return;
	struct pf_ct_flow sent;
	sent.way = pf_ct_key_fill(&sent.key, &pkt->saddr, &daddr, pkt->sport_be, dport_be, pkt->protocol);
	sent.entry = pf_ct_entry(&sent.key, sent.way, now, pkt);
	pf_ct_admit(&sent, PF_CT_FROM_POD, now, slot, 0, slot);
}

#endif /* PF_LIB_CONNTRACK_H */
