/* Build knobs (every one can be overridden with -D by agent/dataplane/bpf/loader.py) and the
 * pinning helper. Maps declared with PF_PINNED live in bpffs under PF_PIN_DIR, so they outlive
 * the agent: a restarted agent re-opens them instead of creating empty ones. */
#ifndef PF_LIB_COMMON_H
#define PF_LIB_COMMON_H

#ifndef PF_PIN_DIR
#define PF_PIN_DIR "/sys/fs/bpf/podfence"
#endif
#ifndef PF_CT_MAX
#define PF_CT_MAX 65536
#endif
#ifndef PF_POLICY_MAX
#define PF_POLICY_MAX 65536
#endif
#ifndef PF_IPCACHE_MAX
#define PF_IPCACHE_MAX 65536
#endif
#ifndef PF_CIDR_MAX
#define PF_CIDR_MAX 16384
#endif
#ifndef PF_ENDPOINTS_MAX
#define PF_ENDPOINTS_MAX 1024
#endif
#ifndef PF_NODE_IPS_MAX
#define PF_NODE_IPS_MAX 64
#endif
#ifndef PF_FRAG_MAX
#define PF_FRAG_MAX 8192
#endif
/* notes of what pods send, for the egress verdict (lib/conntrack.h): live for microseconds each,
 * so the LRU only needs room for the packets between tc and the netfilter hook; its per-CPU
 * lists share the entries, so the loader asks for 1024 per possible CPU */
#ifndef PF_CT_EXPECT_MAX
#define PF_CT_EXPECT_MAX 8192
#endif
/* how long a note vouches, and a conflict of two notes lasts: far beyond what separates a
 * packet's tc ingress from its netfilter hook (one batch of list receive) */
#ifndef PF_CT_EXPECT_NS
#define PF_CT_EXPECT_NS (100ULL * 1000000ULL)
#endif
/* the most conntrack entries one endpoint may be charged for (lib/conntrack.h); 0: no bound */
#ifndef PF_CT_ENDPOINT_MAX
#define PF_CT_ENDPOINT_MAX 0
#endif
/* 1 = traffic of a guarded interface that no endpoint claims passes; 0 = dropped */
#ifndef PF_UNKNOWN_ALLOW
#define PF_UNKNOWN_ALLOW 0
#endif
/* established_on_change=reset: a TCP flow conntrack does not know must start with a SYN.
 * Without it, after a reset the peer's next mid-stream segment would be judged as a flow of
 * its own (the other way round) and its replies would revive the flow the new policy denies. */
#ifndef PF_TCP_NEEDS_SYN
#define PF_TCP_NEEDS_SYN 0
#endif
/* Benchmark builds only (bench/hook_floor.py), never set by the agent: 1 = the tc programs
 * return "pass" at once; the netfilter programs accept at once; the programs keep parsing, the
 * endpoint and anti-spoofing lookups and the counters but neither read nor write the flow table
 * nor look up policy (each packet passes as if established). 0 (the shipped build) compiles none
 * of it in. */
#ifndef PF_BENCH_TC_PASS
#define PF_BENCH_TC_PASS 0
#endif
#ifndef PF_BENCH_NF_PASS
#define PF_BENCH_NF_PASS 0
#endif
#ifndef PF_BENCH_NO_FLOW_STATE
#define PF_BENCH_NO_FLOW_STATE 0
#endif
/* flow events per second per CPU (token bucket, burst = one second's worth) */
#ifndef PF_EVENT_RATE
#define PF_EVENT_RATE 1000
#endif
/* a denied flow's packets are aggregated into one record per this many seconds at most */
#ifndef PF_FLOW_DENY_INTERVAL
#define PF_FLOW_DENY_INTERVAL 5
#endif
/* denied flows remembered for aggregation (LRU) */
#ifndef PF_FLOW_DENIED_MAX
#define PF_FLOW_DENIED_MAX 16384
#endif
/* the flow records' ring buffer: 256 pages (1 MiB) hold ~11,900 records of 88 bytes, what 16
 * CPUs at the full budget send between two reads of the agent's feed (every 200 ms at most) */
#ifndef PF_EVENT_RING_PAGES
#define PF_EVENT_RING_PAGES 256
#endif
/* conntrack idle timeouts, seconds */
#ifndef PF_CT_TIMEOUT_TCP
#define PF_CT_TIMEOUT_TCP 7200
#endif
#ifndef PF_CT_TIMEOUT_TCP_CLOSING
#define PF_CT_TIMEOUT_TCP_CLOSING 10
#endif
#ifndef PF_CT_TIMEOUT_UDP
#define PF_CT_TIMEOUT_UDP 120
#endif
#ifndef PF_CT_TIMEOUT_SCTP
#define PF_CT_TIMEOUT_SCTP 7200
#endif
#ifndef PF_CT_TIMEOUT_ICMP
#define PF_CT_TIMEOUT_ICMP 30
#endif
#ifndef PF_CT_TIMEOUT_OTHER
#define PF_CT_TIMEOUT_OTHER 120
#endif
#define PF_FRAG_TIMEOUT_NS (30ULL * 1000000000ULL)

#define PF_PINNED(type, key, value, name, max, flags) \
	BPF_TABLE_PINNED(type, key, value, name, max, PF_PIN_DIR "/" #name, flags)

#define PF_NSEC 1000000000ULL

/* CLOCK_MONOTONIC at tick resolution (1-10 ms): every timeout here is seconds long, and the
 * coarse clock needs no clock-source read, which cost each program ~30 ns per packet on a VM
 * (bpf_stats run_time_ns, same-node TCP and connection benchmarks). */
#define pf_now() bpf_ktime_get_coarse_ns()

/* Netfilter programs may not read the coarse clock. pf_nf_now() gives them the same: the precise
 * clock (~24 ns a read here) read once per tick and CPU, the reading kept per CPU beside the
 * jiffies it was taken at (a jiffies read costs nothing). Like the coarse clock it lags by up to
 * a tick; it may run a little ahead of a coarse reading, which pf_elapsed absorbs. */
BPF_PERCPU_ARRAY(pf_nf_clock, struct pf_nf_clock, 1);

static __always_inline __u64 pf_nf_now(void)
{
	__u32 zero = 0;
	__u64 jiffies = bpf_jiffies64();
	struct pf_nf_clock *clock = pf_nf_clock.lookup(&zero);
	if (!clock)
		return bpf_ktime_get_ns();
	if (clock->jiffies != jiffies) {
		clock->jiffies = jiffies;
		clock->now_ns = bpf_ktime_get_ns();
	}
	return clock->now_ns;
}

/* now - then, 0 when `then` was written by a program reading the precise clock a tick ahead
 * of this one's coarse `now` (an unsigned difference would wrap and expire the entry). */
static __always_inline __u64 pf_elapsed(__u64 now, __u64 then)
{
	return now > then ? now - then : 0;
}

#endif /* PF_LIB_COMMON_H */
