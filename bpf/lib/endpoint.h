/* Endpoint lookups: which pod sits behind an interface, which interface owns an address, and
 * the node's own addresses. */
#ifndef PF_LIB_ENDPOINT_H
#define PF_LIB_ENDPOINT_H

PF_PINNED("hash", struct pf_endpoint_key, struct pf_endpoint_value, pf_endpoints, PF_ENDPOINTS_MAX, 0);
PF_PINNED("hash", struct pf_addr, struct pf_endpoint_ip_value, pf_endpoint_ips, PF_ENDPOINTS_MAX * 4, 0);
PF_PINNED("hash", struct pf_addr, struct pf_ipcache_value, pf_node_ips, PF_NODE_IPS_MAX, 0);

static __always_inline struct pf_endpoint_value *pf_endpoint_by_ifindex(__u32 ifindex)
{
	struct pf_endpoint_key key = {.ifindex = ifindex};
	return pf_endpoints.lookup(&key);
}

static __always_inline int pf_is_link_local_v6(const struct pf_addr *addr)
{
	return addr->bytes[0] == 0xfe && (addr->bytes[1] & 0xc0) == 0x80;
}

static __always_inline int pf_is_unspecified(const struct pf_addr *addr)
{
	__u64 *words = (__u64 *)addr->bytes;
	return words[0] == 0 && words[1] == 0;
}

/* The source of a packet sent by the pod behind `ifindex` must be one of its own addresses.
 * IPv6 link-local and the unspecified address (duplicate address detection) are allowed so
 * neighbour discovery keeps working; nothing routable can be sent from them. */
static __always_inline int pf_source_belongs_to(const struct pf_addr *saddr, __u32 ifindex)
{
	struct pf_endpoint_ip_value *owner = pf_endpoint_ips.lookup((struct pf_addr *)saddr);
	return owner && owner->ifindex == ifindex;
}

static __always_inline int pf_is_node_ip(const struct pf_addr *addr)
{
	return pf_node_ips.lookup((struct pf_addr *)addr) != NULL;
}

#endif /* PF_LIB_ENDPOINT_H */
