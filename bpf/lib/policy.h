/* Policy lookups. The cost of a verdict is bounded whatever the number of rules or peers:
 * one ipcache hash lookup (peer address -> identity class), one host-prefix hash lookup and, when
 * it misses, one CIDR LPM lookup (peer address -> CIDR class) and for each at most one exact-port hash lookup and one policy LPM lookup.
 * ClusterNetworkPolicy tiers cost no more: precedence between overlapping rules is resolved at
 * compile time into each entry's verdict word, and the two peer kinds' words combine by rank. The
 * user-space compiler (agent/dataplane/bpf/compiler.py) expands selectors, except blocks and port
 * ranges into these maps; nothing here loops over rules. Single-port allows sit in a hash: an LPM
 * lookup walks one trie node per distinguishing bit, each a cache miss, and with 10,000 rules
 * that cost 5 % of the connection rate (bench/datapath.py, time-sliced, 2026-12-04). */
#ifndef PF_LIB_POLICY_H
#define PF_LIB_POLICY_H

PF_PINNED("hash", struct pf_ipcache_key, struct pf_ipcache_value, pf_ipcache, PF_IPCACHE_MAX, 0);
PF_PINNED("lpm_trie", struct pf_cidr_key, struct pf_cidr_value, pf_cidr, PF_CIDR_MAX, BPF_F_NO_PREALLOC);
PF_PINNED("hash", struct pf_ipcache_key, struct pf_cidr_value, pf_cidr_host, PF_CIDR_MAX, BPF_F_NO_PREALLOC);
PF_PINNED("lpm_trie", struct pf_policy_key, struct pf_policy_value, pf_policy, PF_POLICY_MAX, BPF_F_NO_PREALLOC);
PF_PINNED("hash", struct pf_policy_key, struct pf_policy_value, pf_policy_exact, PF_POLICY_MAX, BPF_F_NO_PREALLOC);

/* The verdict word of one cell (see PF_VERDICT_*), 0 when no entry covers it. */
static __always_inline __u32 pf_policy_cell(__u32 policy_id, __u32 peer_class, __u8 peer_kind, __u8 protocol,
					    __be16 dport_be)
{
	struct pf_policy_key key = {
		.prefixlen = 96,
		.policy_id = policy_id,
		.peer_class = peer_class,
		.peer_kind = peer_kind,
		.protocol = protocol,
		.dport_be = dport_be,
	};
	struct pf_policy_value *value = pf_policy_exact.lookup(&key);
	if (!value)
		value = pf_policy.lookup(&key);
	if (!value)
		return 0;
	return value->verdict ? value->verdict : PF_VERDICT_ALLOW;
}

/* Per tier, the hit of lower rank of two cells' verdicts. */
static __always_inline __u32 pf_verdict_merge(__u32 a, __u32 b)
{
	__u32 admin = a, rest = a;
	if (PF_VERDICT_ADMIN_ACTION(b) &&
	    (!PF_VERDICT_ADMIN_ACTION(a) || PF_VERDICT_ADMIN_RANK(b) < PF_VERDICT_ADMIN_RANK(a)))
		admin = b;
	if (PF_VERDICT_REST_ACTION(b) &&
	    (!PF_VERDICT_REST_ACTION(a) || PF_VERDICT_REST_RANK(b) < PF_VERDICT_REST_RANK(a)))
		rest = b;
	return PF_VERDICT_SET | (admin & 0x3fff3) | (rest & 0x7ffc000c);
}

/* Does policy `policy_id` admit `peer` (classes of peer-map `generation`) for (protocol, dport)?
 * `tiered`: the policy holds ClusterNetworkPolicy verdicts, so both peer kinds are looked up and
 * combined (the first Admin hit decides unless it is a Pass; then the rest's first hit); else
 * any hit is an allow and the first one ends the search. `open`: what no hit means. `word`
 * receives a tiered direction's merged verdict word, whose ranks name the deciding rules in the
 * flow record (untouched otherwise). */
static __always_inline int pf_policy_allows(__u32 policy_id, __u32 generation, const struct pf_addr *peer,
					    __u8 protocol, __be16 dport_be, int tiered, int open, __u32 *word)
{
	__u32 verdict = 0;
	struct pf_ipcache_key ipcache_key = {.generation = generation};
	__builtin_memcpy(&ipcache_key.addr, peer, sizeof(ipcache_key.addr));
	struct pf_ipcache_value *identity = pf_ipcache.lookup(&ipcache_key);
	if (identity && identity->class_id) {
		verdict = pf_policy_cell(policy_id, identity->class_id, PF_PEER_IDENTITY, protocol, dport_be);
		if (verdict && !tiered)
			return 1;
	}

	/* A host prefix (/32, /128) is the longest match there is: when the peer has one, the hash
	 * answers as the trie would, in one probe whatever the number of host peers (10,000 of them
	 * in the trie cost ~9 % of the connection rate, issue 27); otherwise the trie. */
	struct pf_cidr_value *cidr = pf_cidr_host.lookup(&ipcache_key);
	if (!cidr) {
		struct pf_cidr_key cidr_key = {.prefixlen = 32 + 128, .generation = generation};
		__builtin_memcpy(&cidr_key.addr, peer, sizeof(cidr_key.addr));
		cidr = pf_cidr.lookup(&cidr_key);
	}
	if (cidr && cidr->class_id) {
		__u32 found = pf_policy_cell(policy_id, cidr->class_id, PF_PEER_CIDR, protocol, dport_be);
		if (found && !tiered)
			return 1;
		verdict = pf_verdict_merge(verdict, found);
	}
	if (!tiered)
		return open;
	*word = verdict;
	__u32 admin = PF_VERDICT_ADMIN_ACTION(verdict);
	if (admin == PF_ACT_ACCEPT || admin == PF_ACT_DENY)
		return admin == PF_ACT_ACCEPT;
	__u32 rest = PF_VERDICT_REST_ACTION(verdict);
	if (rest)
		return rest != PF_ACT_DENY;
	return open;
}

#endif /* PF_LIB_POLICY_H */
