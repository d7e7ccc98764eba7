/* Audit (staged) policies: what a new flow's audit view says, counted, never enforced.
 *
 * A policy in audit (`podfence.io/mode: audit`) is left out of the endpoint's own policy ids; the
 * compiler gives an ingress whose audit view (every policy enforced) judges differently a policy
 * id of its own in pf_audit. The kernel judges INGRESS audit views only (tc_to_pod): the view is
 * looked up only on a flow's first packet, once the enforced view has admitted it (pf_judge), and
 * only for an endpoint whose flags say it has one. The egress audit verdict is the agent's,
 * computed from the flow's allowed record (agent/dataplane/bpf/flow_records.py): nf_egress_link
 * is near the verifier's 1,000,000-instruction limit, and every placement of the lookup in it
 * tried went over (2026-12-07), so pf_audit holds no egress views at all. Here:
 * established packets and endpoints without audit policies pay nothing. Its verdict never
 * touches the packet: a flow it would deny passes and counts in pf_audit_denied, per endpoint
 * direction (user space reads it: agent/dataplane/bpf/telemetry.py). Written by the writer
 * before the endpoint flips (agent/dataplane/bpf/plan.py); while a flip is under way a new flow
 * may be judged by the audit view of either side, which only its record can show. */
#ifndef PF_LIB_AUDIT_H
#define PF_LIB_AUDIT_H

PF_PINNED("array", u32, struct pf_audit_value, pf_audit, PF_ENDPOINTS_MAX, 0);
PF_PINNED("percpu_array", u32, u64, pf_audit_denied, PF_ENDPOINTS_MAX * 2, 0);

/* The audit view of `direction` (ingress: the only one pf_audit holds) of `ep` for a new flow the
 * enforced view admitted: a denial is counted and marks the packet (PF_PKT_AUDIT_DENIED) so that
 * its flow record is audit-denied, naming the audit view's policy id and verdict word. */
static __always_inline void pf_audit_judge(struct pf_packet *pkt, const struct pf_endpoint_value *ep, int direction)
{
	__u32 endpoint_id = ep->endpoint_id;
	__u32 slot = endpoint_id * 2 + direction;
	struct pf_audit_value *audit = pf_audit.lookup(&endpoint_id);
	if (!audit || audit->policy_id == 0)
		return;
	__u32 word = 0;
	if (pf_policy_allows(audit->policy_id, ep->generation,
			     direction == PF_DIR_INGRESS ? &pkt->saddr : &pkt->daddr, pkt->protocol, pkt->dport_be,
			     audit->flags & PF_AUDIT_TIERED, audit->flags & PF_AUDIT_OPEN, &word))
		return;
	pkt->flags |= PF_PKT_AUDIT_DENIED;
	pkt->policy_id = audit->policy_id;
	pkt->verdict_word = word;
	u64 *count = pf_audit_denied.lookup(&slot);
	if (count)
		*count += 1;
}

#endif /* PF_LIB_AUDIT_H */
