/* podfence datapath: every program of the agent, compiled once at start by BCC.
 *
 *   tc_from_pod  tc ingress (clsact) of each pod's host-side interface: packets FROM the pod.
 *                Anti-spoofing (IP source, MAC, ARP, NDP), no VLAN tags (lib/neigh.h),
 *                unknown-endpoint guard, malformed and orphan-fragment drops for egress-isolated
 *                pods; notes the destination of new flows as sent (pre-DNAT), for the egress
 *                verdict.
 *   tc_to_pod    tc egress of the same interface: packets TO the pod, after routing and DNAT.
 *                The ingress verdict of the destination pod.
 *   nf_egress_link  netfilter program linked at FORWARD and LOCAL_IN (IPv4, IPv6): after
 *                kube-proxy's DNAT, before SNAT. The egress verdict of the source pod, found by
 *                its source address (anti-spoofed above). Kernel >= 6.4; loaded by
 *                agent/dataplane/bpf/netfilter.py.
 *   nf_egress    the same verdict as a socket filter, run by iptables' bpf match (xt_bpf) in
 *                the filter table's FORWARD and INPUT chains where netfilter links cannot be
 *                used. Returns non-zero for packets to DROP.
 *
 * All policy lives in pinned maps (see lib/); a policy change never recompiles or re-attaches.
 * See bpf/README.md for the design decisions.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/pkt_cls.h>

#include "podfence.h"
#include "lib/common.h"
#include "lib/kfunc.h"
#include "lib/parse.h"
#include "lib/endpoint.h"
#include "lib/neigh.h"
#include "lib/policy.h"
#include "lib/conntrack.h"
#include "lib/frag.h"
#include "lib/metrics.h"
#include "lib/audit.h"

#define PF_UNKNOWN_ENDPOINT_ID 0xffffffff

/* Is `pkt` one whose flow pf_judge looks up (pf_ct_find)? Not so for neighbour discovery, later
 * fragments and malformed packets (judged without conntrack), nor for ICMP errors (judged by the
 * flow they quote). */
static __always_inline int pf_tracked(const struct pf_packet *pkt)
{
	return !(pkt->flags & (PF_PKT_NDP | PF_PKT_FRAG_LATER | PF_PKT_MALFORMED | PF_PKT_ICMP_ERROR));
}

/* The flow of `pkt` where pf_judge reads it; zeroed where it does not, so that no path the
 * verifier walks reads it unwritten. */
static __always_inline void pf_flow_of(struct pf_ct_flow *flow, const struct pf_packet *pkt, __u64 now)
{
	__builtin_memset(flow, 0, sizeof(*flow));
	if (pf_tracked(pkt))
		pf_ct_find(flow, pkt, now);
}

/* Node traffic (kubelet probes) always reaches a pod: a packet whose source is the node's own
 * address. IPv4 cannot forge that from outside, Linux drops a packet arriving with a local source
 * (fib_validate_source), but IPv6 has no such check: any host that routes to the pod could claim
 * the node's IPv6 address. So an IPv6 source counts only on a packet the node sent itself,
 * which entered through no device. */
static __always_inline int pf_is_node_sent(const struct pf_packet *pkt)
{
	return (pkt->family == 4 || (pkt->flags & PF_PKT_NODE_SENT)) && pf_is_node_ip(&pkt->saddr);
}

/* The verdict of one direction of one endpoint. `flow`: the packet's flow (pf_flow_of), so that
 * the lookup that found it also serves the admission; `record`: 0 to admit without recording it
 * (pf_ct_expect_lets_record). Cost: <= 1 conntrack lookup (pf_flow_of)
 * and 1 insert, 1 node-address lookup, 1 ipcache + 1 CIDR LPM + 2 exact-port hash + 2 policy LPM
 * lookups, or 1 fragment lookup; a new ingress flow of a direction with an audit view, as many again. */
static __always_inline __u32 pf_judge(struct pf_packet *pkt, struct pf_endpoint_value *ep, int direction,
				      __u64 now, struct pf_ct_flow *flow, int record)
{
	__u32 policy_id = direction == PF_DIR_INGRESS ? ep->ingress_policy_id : ep->egress_policy_id;
	__u32 reason;

	pkt->policy_id = policy_id;

	if (pkt->flags & PF_PKT_NDP)
		return PF_REASON_ALLOWED;
	if (pkt->flags & PF_PKT_FRAG_LATER) {
		reason = pf_frag_verdict(pkt, direction, now);
		if (reason == PF_DROP_ORPHAN_FRAGMENT && policy_id == 0)
			return PF_REASON_ALLOWED;
		return reason;
	}
	if (!(pkt->flags & PF_PKT_MALFORMED) &&
	    (pkt->flags & PF_PKT_ICMP_ERROR ? pf_ct_related(pkt, direction, ep->generation, now) :
					      pf_ct_state(flow, direction, ep->endpoint_id + 1))) {
		reason = PF_REASON_ALLOWED;
		goto out;
	}
	/* node traffic is admitted whatever any policy says, audit ones included */
	int by_node = direction == PF_DIR_INGRESS && pf_is_node_sent(pkt);
	if (by_node)
		reason = PF_REASON_ALLOWED;
	else if (policy_id == 0)
		reason = PF_REASON_ALLOWED;
	else if (pkt->flags & PF_PKT_MALFORMED)
		return PF_DROP_MALFORMED;
	else if (pf_policy_allows(policy_id, ep->generation,
				  direction == PF_DIR_INGRESS ? &pkt->saddr : &pkt->daddr, pkt->protocol, pkt->dport_be,
				  ep->flags & (direction == PF_DIR_INGRESS ? PF_EP_INGRESS_TIERED : PF_EP_EGRESS_TIERED),
				  ep->flags & (direction == PF_DIR_INGRESS ? PF_EP_INGRESS_OPEN : PF_EP_EGRESS_OPEN),
				  &pkt->verdict_word))
		reason = PF_REASON_ALLOWED;
	else
		reason = PF_DROP_POLICY;
	/* not a SYN, and no flow to continue: see PF_TCP_NEEDS_SYN. Asked after the verdict, not
	 * before it: splitting on the TCP flags ahead of the policy lookups multiplied the paths the
	 * verifier walks past its limit (nf_egress_link of the reset build, 2026-12-07) */
	if (PF_TCP_NEEDS_SYN && reason == PF_REASON_ALLOWED && pkt->protocol == PF_IPPROTO_TCP &&
	    !(pkt->flags & PF_PKT_MALFORMED) && (pkt->tcp_flags & 0x12) != 0x02)
		reason = PF_DROP_POLICY;

	/* a new flow of a pod that holds its bound of entries is dropped (lib/conntrack.h); one
	 * admitted here is due its allowed flow record (pf_account) */
	if (reason == PF_REASON_ALLOWED && record && !(pkt->flags & (PF_PKT_MALFORMED | PF_PKT_ICMP_ERROR))) {
		if (pf_ct_admit(flow, direction == PF_DIR_INGRESS ? PF_CT_INGRESS_OK : PF_CT_EGRESS_OK, now,
				direction == PF_DIR_EGRESS ? ep->endpoint_id + 1 : 0,
				direction == PF_DIR_INGRESS ? ep->endpoint_id + 1 : 0, ep->endpoint_id + 1))
			pkt->flags |= PF_PKT_ADMITTED;
		else
			reason = PF_DROP_FLOW_LIMIT;
	}
	/* a new flow admitted and recorded: what its ingress audit view says, if it has one
	 * (lib/audit.h). Egress audit verdicts are the agent's, from the allowed record: see there */
	if (direction == PF_DIR_INGRESS && (pkt->flags & PF_PKT_ADMITTED) && !by_node &&
	    (ep->flags & PF_EP_INGRESS_AUDIT))
		pf_audit_judge(pkt, ep, direction);
out:
	if (pkt->flags & PF_PKT_FRAG_FIRST)
		pf_frag_remember(pkt, direction, reason, now);
	return reason;
}

/* The allowed record of a flow pf_judge newly admitted (established packets never get here). */
static __always_inline void pf_flow_admitted(const struct pf_packet *pkt, __u32 endpoint_id, int direction,
					     __u32 bytes, __u64 now)
{
	/* audit-denied: passes, recorded with what the audit view decided (pf_audit_judge) */
	if (pkt->flags & PF_PKT_ADMITTED)
		pf_emit_flow(pkt, endpoint_id, direction, PF_REASON_ALLOWED,
			     pkt->flags & PF_PKT_AUDIT_DENIED ? PF_FLOW_AUDIT_DENIED : PF_FLOW_ALLOWED, 0, 1, bytes,
			     pkt->policy_id, pkt->verdict_word, now);
}

/* Counters, drop reasons and flow records for one verdict. */
static __always_inline void pf_account(struct pf_packet *pkt, __u32 endpoint_id, int direction, __u32 reason,
				       __u32 bytes, __u64 now)
{
	if (endpoint_id != PF_UNKNOWN_ENDPOINT_ID)
		pf_count(endpoint_id, direction, reason == PF_REASON_ALLOWED, bytes);
	if (reason != PF_REASON_ALLOWED) {
		pf_count_drop(reason);
		pf_flow_denied_packet(pkt, endpoint_id, direction, reason, bytes, now);
	} else {
		pf_flow_admitted(pkt, endpoint_id, direction, bytes, now);
	}
}

static __always_inline int pf_unknown_endpoint(struct __sk_buff *skb, int direction, __u64 now)
{
	if (PF_UNKNOWN_ALLOW)
		return TC_ACT_OK;
	struct pf_source src = {.skb = skb};
	struct pf_packet pkt = {};
	pf_parse(&src, ETH_HLEN, skb->protocol, &pkt);
	pf_account(&pkt, PF_UNKNOWN_ENDPOINT_ID, direction, PF_DROP_UNKNOWN_ENDPOINT, skb->len, now);
	return TC_ACT_SHOT;
}

/* Does a packet from a pod open a flow, so that the destination it was sent to must be noted for
 * the egress verdict (pf_ct_note)? A TCP flow opens with a bare SYN: its later segments find the
 * entry the SYN made (the pod's own replies are no flow of its own), which spares tc_from_pod a
 * conntrack lookup per segment. Other protocols have no such mark: every datagram may open one. */
static __always_inline int pf_opens_flow(const struct pf_packet *pkt)
{
	if (pkt->flags & (PF_PKT_ICMP_ERROR | PF_PKT_NDP))
		return 0;
	return pkt->protocol != PF_IPPROTO_TCP || (pkt->tcp_flags & 0x12) == 0x02;
}

/* IPv4 options from a pod: only a lone Router Alert (IGMP) passes. A source route (LSRR, SSRR)
 * is the reason: the node rewrites the destination after the FORWARD hook, so the egress verdict
 * would judge a packet to the node that the node then forwards to any pod. Nothing a pod needs
 * carries other options (record route, timestamps: `ping -R` from a pod is refused). */
static __always_inline int pf_lone_router_alert(struct __sk_buff *skb)
{
	__u8 head[24];
	if (bpf_skb_load_bytes(skb, ETH_HLEN, head, sizeof(head)) < 0)
		return 0;
	return (head[0] & 0x0f) == 6 && head[20] == 0x94 && head[21] == 0x04 && head[22] == 0 && head[23] == 0;
}

int tc_from_pod(struct __sk_buff *skb)
{
	if (PF_BENCH_TC_PASS)
		return TC_ACT_OK;
	__u64 now = pf_now();
	struct pf_endpoint_value *ep = pf_endpoint_by_ifindex(skb->ifindex);
	struct pf_source src = {.skb = skb};
	struct pf_packet pkt = {};
	__u32 reason = PF_REASON_ALLOWED;

	if (!ep)
		return pf_unknown_endpoint(skb, PF_DIR_EGRESS, now);

	__u32 l2 = pf_check_l2(skb, ep);
	if (l2 != PF_REASON_ALLOWED) {
		reason = l2;
	} else if (skb->protocol == bpf_htons(ETH_P_ARP)) {
		reason = pf_check_arp(skb, ep);
	} else if (skb->protocol != bpf_htons(ETH_P_IP) && skb->protocol != bpf_htons(ETH_P_IPV6)) {
		reason = PF_DROP_UNSUPPORTED_L2;
	} else if (pf_parse(&src, ETH_HLEN, skb->protocol, &pkt) < 0) {
		/* without a readable IP header the source cannot be verified */
		reason = PF_DROP_MALFORMED;
	} else if (!pf_source_belongs_to(&pkt.saddr, skb->ifindex) &&
		   !(pkt.family == 6 && (pf_is_link_local_v6(&pkt.saddr) || pf_is_unspecified(&pkt.saddr)))) {
		reason = PF_DROP_SPOOFED_SOURCE;
	} else if ((pkt.flags & PF_PKT_IP_OPTIONS) && !pf_lone_router_alert(skb)) {
		reason = PF_DROP_IP_OPTIONS;
	} else if ((pkt.flags & PF_PKT_NDP) && (l2 = pf_check_ndp(skb, ep, &pkt)) != PF_REASON_ALLOWED) {
		reason = l2;
	} else if (ep->egress_policy_id && (pkt.flags & PF_PKT_MALFORMED)) {
		reason = PF_DROP_MALFORMED;
	} else if (ep->egress_policy_id && pkt.family == 6 && !(pkt.flags & PF_PKT_NDP) &&
		   (pf_is_link_local_v6(&pkt.saddr) || pf_is_unspecified(&pkt.saddr))) {
		/* a link-local or unspecified source names no pod, so nf_egress could not tie the
		 * packet to this pod and would pass it unjudged: judge its egress here */
		struct pf_ct_flow flow;
		pf_flow_of(&flow, &pkt, now);
		reason = pf_judge(&pkt, ep, PF_DIR_EGRESS, now, &flow, 1);
	} else if (pkt.flags & PF_PKT_FRAG_LATER) {
		/* the egress verdict itself is given after reassembly by nf_egress; here only
		 * fragments that belong to no datagram are refused, and each other one notes the
		 * datagram's destination again: any may be the one that completes it (pf_ct_note) */
		if (ep->egress_policy_id) {
			if (pf_frag_verdict(&pkt, PF_FRAG_SENT_BY_POD, now) == PF_DROP_ORPHAN_FRAGMENT)
				reason = PF_DROP_ORPHAN_FRAGMENT;
			else if (pf_opens_flow(&pkt))
				pf_ct_note(&pkt, now);
		}
	} else {
		if (pkt.flags & PF_PKT_FRAG_FIRST)
			pf_frag_remember(&pkt, PF_FRAG_SENT_BY_POD, PF_REASON_ALLOWED, now);
		if (!PF_BENCH_NO_FLOW_STATE && pf_opens_flow(&pkt)) {
			/* refreshes the flow's entry (the tuple the pod sent keeps its FROM_POD alive
			 * while the pod sends), and notes the destination for the egress verdict: no
			 * admission before it (lib/conntrack.h) */
			struct pf_ct_flow flow;
			pf_ct_find(&flow, &pkt, now);
			pf_ct_note(&pkt, now);
		}
	}
	if (reason != PF_REASON_ALLOWED) {
		pf_account(&pkt, ep->endpoint_id, PF_DIR_EGRESS, reason, skb->len, now);
		return TC_ACT_SHOT;
	}
	pf_flow_admitted(&pkt, ep->endpoint_id, PF_DIR_EGRESS, skb->len, now);
	return TC_ACT_OK;
}

int tc_to_pod(struct __sk_buff *skb)
{
	if (PF_BENCH_TC_PASS)
		return TC_ACT_OK;
	__u64 now = pf_now();
	struct pf_endpoint_value *ep = pf_endpoint_by_ifindex(skb->ifindex);
	struct pf_source src = {.skb = skb};
	struct pf_packet pkt = {};
	__u32 reason;

	if (!ep)
		return pf_unknown_endpoint(skb, PF_DIR_INGRESS, now);
	if (skb->protocol == bpf_htons(ETH_P_ARP))
		return TC_ACT_OK;
	if (skb->protocol != bpf_htons(ETH_P_IP) && skb->protocol != bpf_htons(ETH_P_IPV6))
		reason = ep->ingress_policy_id ? PF_DROP_UNSUPPORTED_L2 : PF_REASON_ALLOWED;
	else if (pf_parse(&src, ETH_HLEN, skb->protocol, &pkt) < 0)
		reason = ep->ingress_policy_id ? PF_DROP_MALFORMED : PF_REASON_ALLOWED;
	else {
		struct pf_ct_flow flow;
		if (skb->ingress_ifindex == 0)
			pkt.flags |= PF_PKT_NODE_SENT;
		if (PF_BENCH_NO_FLOW_STATE) {
			reason = PF_REASON_ALLOWED;
		} else {
			pf_flow_of(&flow, &pkt, now);
			reason = pf_judge(&pkt, ep, PF_DIR_INGRESS, now, &flow, 1);
		}
	}
	pf_account(&pkt, ep->endpoint_id, PF_DIR_INGRESS, reason, skb->len, now);
	return reason == PF_REASON_ALLOWED ? TC_ACT_OK : TC_ACT_SHOT;
}

/* The egress verdict after DNAT; returns 1 for packets to DROP. At the netfilter hooks the
 * packet starts at its IP header, which the kernel has validated. */
static __always_inline int pf_egress_drops(const struct pf_source *src, __be16 eth_proto_be, __u32 len,
					   __u64 now)
{
	struct pf_packet pkt = {};

	if (pf_parse(src, 0, eth_proto_be, &pkt) < 0)
		return 0;
	if (PF_BENCH_NO_FLOW_STATE) {  /* passed and counted as a known flow's (lib/common.h) */
		pf_count(0, PF_DIR_EGRESS, 1, len);
		return 0;
	}
	/* most packets belong to a known flow: one conntrack lookup, no endpoint lookups (a first
	 * fragment is judged in full, which remembers its verdict for the later ones) */
	struct pf_ct_flow flow;
	pf_flow_of(&flow, &pkt, now);
	__u32 slot = pkt.flags & PF_PKT_FRAG_FIRST ? 0 : pf_ct_egress_slot(&flow);
	if (slot) {
		/* a SYN again on a known flow (a retransmit): promotes what the first one could not,
		 * had its note gone missing (lib/conntrack.h); no other packet pays for it */
		if (pkt.protocol == PF_IPPROTO_TCP && (pkt.tcp_flags & 0x12) == 0x02)
			pf_ct_settle(pf_ct_expectation(&pkt), &pkt, 1, slot, now);
		pf_count(slot - 1, PF_DIR_EGRESS, 1, len);
		return 0;
	}
	struct pf_endpoint_ip_value *owner = pf_endpoint_ips.lookup(&pkt.saddr);
	if (!owner)
		return 0;  /* not sent by a local pod: its egress is not ours to judge */
	struct pf_endpoint_value *ep = pf_endpoint_by_ifindex(owner->ifindex);
	if (!ep)
		return 0;
	/* what tc_from_pod saw the pod send, for the tuple before DNAT (lib/conntrack.h) */
	int opens = pf_opens_flow(&pkt);
	struct pf_ct_expect_value *note = opens ? pf_ct_expectation(&pkt) : NULL;
	__u32 reason = pf_judge(&pkt, ep, PF_DIR_EGRESS, now, &flow, pf_ct_expect_lets_record(note, &pkt, now));
	pf_account(&pkt, ep->endpoint_id, PF_DIR_EGRESS, reason, len, now);
	if (opens)
		pf_ct_settle(note, &pkt, reason == PF_REASON_ALLOWED, ep->endpoint_id + 1, now);
	return reason != PF_REASON_ALLOWED;
}

/* Run by iptables' bpf match (xt_bpf): non-zero = the rule matches, its target DROPs. */
int nf_egress(struct __sk_buff *skb)
{
	if (PF_BENCH_NF_PASS)
		return 0;
	struct pf_source src = {.skb = skb};
	return pf_egress_drops(&src, skb->protocol, skb->len, pf_now());
}

/* The head of struct nf_hook_state (include/linux/netfilter.h) and struct bpf_nf_ctx
 * (include/linux/filter.h), the context of a netfilter program */
struct pf_nf_hook_state {
	__u8 hook;
	__u8 pf;  /* NFPROTO_IPV4 or NFPROTO_IPV6: the family of the link */
};

struct pf_nf_ctx {
	const struct pf_nf_hook_state *state;
	void *skb;
};

#define PF_NFPROTO_IPV4 2
#define PF_NFPROTO_IPV6 10
#define PF_NF_DROP 0
#define PF_NF_ACCEPT 1

/* The same verdict run by netfilter links (kernel >= 6.4) at FORWARD and LOCAL_IN, one link per
 * family and hook, without iptables' rule evaluation around it. Loaded through the kfunc path
 * (lib/kfunc.h). */
int nf_egress_link(struct pf_nf_ctx *ctx)
{
	if (PF_BENCH_NF_PASS)
		return PF_NF_ACCEPT;
	const struct pf_nf_hook_state *state = ctx->state;
	struct pf_dynptr ptr;

	/* cannot fail for flags 0; refused anyway rather than passed unread */
	if (pf_dynptr_from_skb(ctx->skb, 0, &ptr))
		return PF_NF_DROP;
	struct pf_source src = {.dynptr = &ptr};
	__u8 family = state->pf;
	__be16 eth_proto_be = family == PF_NFPROTO_IPV4 ? bpf_htons(ETH_P_IP) :
			      family == PF_NFPROTO_IPV6 ? bpf_htons(ETH_P_IPV6) : 0;
	__u32 len = pf_dynptr_size(&ptr);
	return pf_egress_drops(&src, eth_proto_be, len, pf_nf_now()) ? PF_NF_DROP : PF_NF_ACCEPT;
}
