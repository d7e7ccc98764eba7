/* Observability: per-endpoint/direction counters and per-reason drop counters (per-CPU, summed
 * in user space), and rate-limited flow events through a ring buffer (podfence.h). */
#ifndef PF_LIB_METRICS_H
#define PF_LIB_METRICS_H

PF_PINNED("percpu_array", u32, struct pf_counter_value, pf_counters, PF_ENDPOINTS_MAX * 2, 0);
PF_PINNED("percpu_array", u32, u64, pf_drop_reasons, PF_REASON_MAX, 0);
/* index 0: flow events not sent (rate limited or ring buffer full) */
PF_PINNED("percpu_array", u32, u64, pf_events_lost, 1, 0);
BPF_PERCPU_ARRAY(pf_event_budget, struct pf_event_budget, 1);
BPF_RINGBUF_OUTPUT(pf_events, PF_EVENT_RING_PAGES);

static __always_inline void pf_count(__u32 endpoint_id, int direction, int allowed, __u32 bytes)
{
	__u32 slot = endpoint_id * 2 + direction;
	struct pf_counter_value *counter = pf_counters.lookup(&slot);
	if (!counter)
		return;
	if (allowed) {
		counter->allowed_packets += 1;
		counter->allowed_bytes += bytes;
	} else {
		counter->denied_packets += 1;
		counter->denied_bytes += bytes;
	}
}

static __always_inline void pf_count_drop(__u32 reason)
{
	u64 *count = pf_drop_reasons.lookup(&reason);
	if (count)
		*count += 1;
}

static __always_inline void pf_event_lost(void)
{
	__u32 zero = 0;
	u64 *lost = pf_events_lost.lookup(&zero);
	if (lost)
		*lost += 1;
}

/* Token bucket per CPU: refills PF_EVENT_RATE tokens per second up to one second's worth. */
static __always_inline int pf_event_take_token(__u64 now)
{
	__u32 zero = 0;
	struct pf_event_budget *budget = pf_event_budget.lookup(&zero);
	if (!budget)
		return 0;
	__u64 elapsed = pf_elapsed(now, budget->last_refill_ns);
	if (elapsed >= PF_NSEC / PF_EVENT_RATE) {
		__u64 earned = elapsed / (PF_NSEC / PF_EVENT_RATE);
		__u64 tokens = budget->tokens + earned;
		budget->tokens = tokens > PF_EVENT_RATE ? PF_EVENT_RATE : tokens;
		budget->last_refill_ns = now;
	}
	if (budget->tokens == 0)
		return 0;
	budget->tokens -= 1;
	return 1;
}

/* Sends one flow record (podfence.h, struct pf_flow_event) if the budget has a token and the ring
 * buffer room; else counts it lost. Reserved in the ring buffer rather than built on the stack:
 * the verdict paths already hold the packet, the flow and its keys there. */
static __always_inline void pf_emit_flow(const struct pf_packet *pkt, __u32 endpoint_id, int direction,
					 __u32 reason, __u8 verdict, __u8 flags, __u64 packets, __u64 bytes,
					 __u32 policy_id, __u32 verdict_word, __u64 now)
{
	if (!pf_event_take_token(now)) {
		pf_event_lost();
		return;
	}
	struct pf_flow_event *event = pf_events.ringbuf_reserve(sizeof(struct pf_flow_event));
	if (!event) {
		pf_event_lost();
		return;
	}
	event->time_ns = now;
	event->packets = packets;
	event->bytes = bytes;
	event->endpoint_id = endpoint_id;
	event->policy_id = policy_id;
	event->verdict_word = verdict_word;
	event->direction = direction;
	event->reason = reason;
	event->verdict = verdict;
	event->protocol = pkt->protocol;
	event->family = pkt->family;
	event->flags = flags;
	event->sport_be = pkt->sport_be;
	event->dport_be = pkt->dport_be;
	__builtin_memset(event->pad, 0, sizeof(event->pad));
	__builtin_memcpy(&event->saddr, &pkt->saddr, sizeof(event->saddr));
	__builtin_memcpy(&event->daddr, &pkt->daddr, sizeof(event->daddr));
	pf_events.ringbuf_submit(event, 0);
}

/* A denied packet: the flow's first record, or counted into its pending aggregate, which is sent
 * once PF_FLOW_DENY_INTERVAL has passed since the flow's last record (user space sends what an
 * idle entry still holds). A flood of denied packets of one flow costs one record per interval.
 * Not pinned: what a previous agent's programs left pending is theirs to lose. */
BPF_TABLE("lru_hash", struct pf_flow_key, struct pf_flow_pending, pf_flow_denied, PF_FLOW_DENIED_MAX);

static __always_inline void pf_flow_denied_packet(const struct pf_packet *pkt, __u32 endpoint_id, int direction,
						  __u32 reason, __u32 bytes, __u64 now)
{
	struct pf_flow_key key = {
		.sport_be = pkt->sport_be,
		.dport_be = pkt->dport_be,
		.protocol = pkt->protocol,
		.direction = direction,
		.reason = reason,
		.endpoint_id = endpoint_id,
	};
	__builtin_memcpy(&key.saddr, &pkt->saddr, sizeof(key.saddr));
	__builtin_memcpy(&key.daddr, &pkt->daddr, sizeof(key.daddr));
	struct pf_flow_pending *pending = pf_flow_denied.lookup(&key);
	if (!pending) {
		struct pf_flow_pending fresh = {
			.recorded_ns = now,
			.policy_id = pkt->policy_id,
			.verdict_word = pkt->verdict_word,
		};
		pf_flow_denied.update(&key, &fresh);
		pf_emit_flow(pkt, endpoint_id, direction, reason, PF_FLOW_DENIED, PF_FLOW_FIRST, 1, bytes,
			     pkt->policy_id, pkt->verdict_word, now);
		return;
	}
	if (pf_elapsed(now, pending->recorded_ns) < PF_FLOW_DENY_INTERVAL * PF_NSEC) {
		__sync_fetch_and_add(&pending->packets, 1);
		__sync_fetch_and_add(&pending->bytes, bytes);
		return;
	}
	/* this packet and those pending since the last record; another CPU may add one meanwhile,
	 * which the subtraction leaves pending for the next record */
	__u64 packets = pending->packets, total = pending->bytes;
	__sync_fetch_and_add(&pending->packets, -packets);
	__sync_fetch_and_add(&pending->bytes, -total);
	pending->recorded_ns = now;
	pf_emit_flow(pkt, endpoint_id, direction, reason, PF_FLOW_DENIED, 0, packets + 1, total + bytes,
		     pkt->policy_id, pkt->verdict_word, now);
}

#endif /* PF_LIB_METRICS_H */
