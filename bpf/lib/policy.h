/* Policy lookups. The cost of a verdict is bounded whatever the number of rules or peers:
 * one ipcache hash lookup (peer address -> identity class), one host-prefix hash lookup and, when
 * it misses, one CIDR LPM lookup (peer address -> CIDR class) and for each at most one exact-port hash lookup and one policy LPM lookup. The
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

static __always_inline int pf_policy_hit(__u32 policy_id, __u32 peer_class, __u8 peer_kind, __u8 protocol,
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
	return pf_policy_exact.lookup(&key) != NULL || pf_policy.lookup(&key) != NULL;
}

/* Does policy `policy_id` admit `peer` (classes of peer-map `generation`) for (protocol, dport)? */
static __always_inline int pf_policy_allows(__u32 policy_id, __u32 generation, const struct pf_addr *peer,
					    __u8 protocol, __be16 dport_be)
{
	struct pf_ipcache_key ipcache_key = {.generation = generation};
	__builtin_memcpy(&ipcache_key.addr, peer, sizeof(ipcache_key.addr));
	struct pf_ipcache_value *identity = pf_ipcache.lookup(&ipcache_key);
	if (identity && identity->class_id &&
	    pf_policy_hit(policy_id, identity->class_id, PF_PEER_IDENTITY, protocol, dport_be))
		return 1;

	/* A host prefix (/32, /128) is the longest match there is: when the peer has one, the hash
	 * answers as the trie would, in one probe whatever the number of host peers (10,000 of them
	 * in the trie cost ~9 % of the connection rate, issue 27); otherwise the trie. */
	struct pf_cidr_value *cidr = pf_cidr_host.lookup(&ipcache_key);
	if (!cidr) {
		struct pf_cidr_key cidr_key = {.prefixlen = 32 + 128, .generation = generation};
		__builtin_memcpy(&cidr_key.addr, peer, sizeof(cidr_key.addr));
		cidr = pf_cidr.lookup(&cidr_key);
	}
	if (cidr && cidr->class_id && pf_policy_hit(policy_id, cidr->class_id, PF_PEER_CIDR, protocol, dport_be))
		return 1;
	return 0;
}

#endif /* PF_LIB_POLICY_H */
