/* Observability: per-endpoint/direction counters and per-reason drop counters (per-CPU, summed
 * in user space), and rate-limited deny events through a ring buffer. */
#ifndef PF_LIB_METRICS_H
#define PF_LIB_METRICS_H

PF_PINNED("percpu_array", u32, struct pf_counter_value, pf_counters, PF_ENDPOINTS_MAX * 2, 0);
PF_PINNED("percpu_array", u32, u64, pf_drop_reasons, PF_REASON_MAX, 0);
/* index 0: deny events not sent (rate limited or ring buffer full) */
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

static __always_inline void pf_emit_deny(const struct pf_packet *pkt, __u32 endpoint_id, int direction,
					 __u32 reason, __u64 now)
{
	if (!pf_event_take_token(now)) {
		pf_event_lost();
		return;
	}
	struct pf_deny_event event = {
		.endpoint_id = endpoint_id,
		.direction = direction,
		.reason = reason,
		.protocol = pkt->protocol,
		.family = pkt->family,
		.sport_be = pkt->sport_be,
		.dport_be = pkt->dport_be,
	};
	__builtin_memcpy(&event.saddr, &pkt->saddr, sizeof(event.saddr));
	__builtin_memcpy(&event.daddr, &pkt->daddr, sizeof(event.daddr));
	if (pf_events.ringbuf_output(&event, sizeof(event), 0) < 0)
		pf_event_lost();
}

#endif /* PF_LIB_METRICS_H */
