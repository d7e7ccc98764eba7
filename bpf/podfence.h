/* podfence: the ONE header of shared types.
 *
 * Every BPF map key/value struct and the verdict/drop-reason enum live here, included by the
 * programs (podfence.c and bpf/lib) and mirrored in Python by agent/dataplane/bpf/structs.py; a test
 * (tests/privileged/test_bpf_mirror.py) compares sizes and offsets against the compiled program.
 *
 * Conventions:
 *  - explicit padding everywhere, so that C and ctypes agree without relying on compiler rules;
 *  - byte order is in the field name: `_be` fields are network order, everything else host order;
 *  - every address is 16 bytes: IPv6 as is, IPv4 as a v4-mapped address (::ffff:a.b.c.d), so one
 *    map serves both families and an IPv4 prefix /n is stored as /(96+n).
 */
#ifndef PODFENCE_H
#define PODFENCE_H

/* Verdict and drop reasons: one numbered list shared by the datapath, the drop-reason counters,
 * the flow events and the metrics labels. NEVER renumber; only append before PF_REASON_MAX. */
enum pf_reason {
	PF_REASON_ALLOWED = 0,          /* not a drop */
	PF_DROP_POLICY = 1,             /* isolated and no allow matched */
	PF_DROP_SPOOFED_SOURCE = 2,     /* IP source is not one of the pod's addresses */
	PF_DROP_UNKNOWN_ENDPOINT = 3,   /* guarded interface that no endpoint claims */
	PF_DROP_MALFORMED = 4,          /* truncated or invalid header */
	PF_DROP_ORPHAN_FRAGMENT = 5,    /* non-first fragment whose first fragment was not seen */
	PF_DROP_UNSUPPORTED_L2 = 6,     /* neither IPv4, IPv6 nor ARP from a pod */
	PF_DROP_SPOOFED_ARP = 7,        /* ARP sender address is not one of the pod's addresses */
	PF_DROP_SPOOFED_NDP = 8,        /* neighbour advertisement for an address the pod does not own */
	PF_DROP_VLAN_TAGGED = 9,        /* 802.1Q/802.1ad-tagged frame from a pod (VLAN 0 included) */
	PF_DROP_SPOOFED_MAC = 10,       /* Ethernet source is not the pod's MAC */
	PF_DROP_ROGUE_NDP = 11,         /* NDP/MLD a pod may not send: router advertisement, redirect,
					 * MLD query, or more than address resolution needs */
	PF_DROP_IP_OPTIONS = 12,        /* IPv4 options from a pod other than a lone Router Alert
					 * (source routes reach the node's forwarding after the
					 * egress verdict saw the node as destination) */
	PF_DROP_FLOW_LIMIT = 13,        /* a new flow of a pod that already holds its bound of
					 * conntrack entries (PF_CT_ENDPOINT_MAX, lib/conntrack.h) */
	PF_REASON_MAX = 14,
};

/* Directions, seen from the pod: ingress = traffic to the pod, egress = traffic from it. */
enum pf_direction {
	PF_DIR_INGRESS = 0,
	PF_DIR_EGRESS = 1,
};

/* Peer kinds inside a policy key. */
enum pf_peer_kind {
	PF_PEER_IDENTITY = 1,  /* peer_class is an identity class (ipcache value) */
	PF_PEER_CIDR = 2,      /* peer_class is a CIDR class (cidr LPM value) */
};

/* Conntrack flags, kept per way of a flow: which judgement admitted packets going that way
 * (see lib/conntrack.h). */
#define PF_CT_EGRESS_OK  0x01  /* the sending pod's egress policy admitted them */
#define PF_CT_INGRESS_OK 0x02  /* the receiving pod's ingress policy admitted them */
#define PF_CT_FROM_POD   0x04  /* the sending pod's egress admitted them, recorded on the
				 * tuple the pod sent (pre-DNAT) */

/* How a TCP flow's entry is closing: a FIN each way, or a RST. */
#define PF_CT_FIN_AB     0x01
#define PF_CT_FIN_BA     0x02
#define PF_CT_RST        0x04

/* The two ways of a flow relative to its conntrack key: PF_WAY_AB runs from end a to end b. */
#define PF_WAY_AB 0
#define PF_WAY_BA 1

struct pf_addr {
	__u8 bytes[16];
};

/* endpoints: host-side ifindex -> the endpoint behind it. One map update flips an endpoint to new
 * policy ids AND the peer-map generation it reads, atomically: a packet sees either the old
 * policies with the old peer classes or the new ones with the new, never a mix. A policy id of 0
 * means "not isolated" (allow all) for that direction, unlooked. `flags` (PF_EP_*) say, per direction,
 * whether its policy holds ClusterNetworkPolicy verdicts (look up both peer kinds and combine)
 * and whether a packet that no entry decides passes (no NetworkPolicy isolates it) or drops. */
struct pf_endpoint_key {
	__u32 ifindex;
};

struct pf_endpoint_value {
	__u32 endpoint_id;          /* slot in the counters map */
	__u32 ingress_policy_id;
	__u32 egress_policy_id;
	__u32 generation;           /* which generation of pf_ipcache / pf_cidr entries to read */
	__u8 mac[6];                /* the pod's MAC: the only Ethernet source (and ARP/NDP link-layer
				     * address) its frames may carry; all zero: not bound */
	__u8 flags;                 /* PF_EP_*; 0 (what versions before tiers wrote): plain allow list */
	__u8 pad;
};

#define PF_EP_INGRESS_OPEN   0x01  /* ingress: no entry decided -> allowed (not isolated) */
#define PF_EP_EGRESS_OPEN    0x02
#define PF_EP_INGRESS_TIERED 0x04  /* ingress policy holds tiered verdicts (pf_policy_value.verdict) */
#define PF_EP_EGRESS_TIERED  0x08
#define PF_EP_INGRESS_AUDIT  0x10  /* ingress has an audit view: pf_audit[endpoint_id] */
/* 0x20 was PF_EP_EGRESS_AUDIT, never read: the agent judges egress audit views (lib/audit.h) */

/* audit (array, endpoint_id -> value): the audit view of an endpoint's ingress, read only when
 * the endpoint's flags say it has one (PF_EP_INGRESS_AUDIT), on a new flow the enforced view
 * admitted (lib/audit.h). A policy id and flags as the endpoint's own for ingress (PF_AUDIT_*);
 * policy id 0: the audit view allows everything. */
struct pf_audit_value {
	__u32 policy_id;
	__u32 flags;
};

#define PF_AUDIT_OPEN   0x01  /* no entry decided -> allowed (no NetworkPolicy isolates it) */
#define PF_AUDIT_TIERED 0x02  /* the policy holds tiered verdicts */

/* endpoint_ips: a local pod's address -> its host-side ifindex. Used for anti-spoofing on tc
 * ingress and to find the endpoint of a packet at the netfilter egress hook. */
struct pf_endpoint_ip_value {
	__u32 ifindex;
	__u32 reserved;
};

/* ipcache: (generation, exact peer address) -> identity class (the set of identities carrying
 * that address). A changed peer set is written as a new generation beside the old one.
 * node_ips (keyed by struct pf_addr): the node's own addresses (value unused, presence is the fact). */
struct pf_ipcache_key {
	__u32 generation;
	struct pf_addr addr;
};

struct pf_ipcache_value {
	__u32 class_id;
	__u32 reserved;
};

/* cidr: LPM trie, address prefix -> CIDR class. Each prefix maps to the set of CidrPeers whose
 * (cidr minus excepts) contains the addresses whose longest match is that prefix; identical sets
 * share one class id. A class containing no peer is stored as class 0 (matches nothing), which
 * is how an `except` shadows its enclosing cidr. */
struct pf_cidr_key {
	__u32 prefixlen;            /* 32 (generation, always exact) + 0..128; IPv4 prefixes are 32+96+n */
	__u32 generation;
	struct pf_addr addr;
};

struct pf_cidr_value {
	__u32 class_id;
	__u32 reserved;
};

/* cidr_host: hash, the host prefixes (/32, /128) of the same classes, keyed by struct
 * pf_ipcache_key (generation, address): an exact match needs no trie walk. A prefix lives in
 * exactly one of pf_cidr and pf_cidr_host; pf_cidr_host is looked up first. */

/* policy: LPM trie over (policy_id, peer_class, peer_kind, protocol, dport_be), in this byte order.
 *  - policy_id, peer_class and peer_kind are always matched exactly (prefix >= 72 bits);
 *  - protocol 0 in a rule ("every protocol, every port") is a prefix of exactly 72 bits, so it
 *    covers every protocol byte and every port;
 *  - a port range becomes at most 30 prefixes of 80 + k bits (k = matched high bits of dport_be);
 *  - a packet without ports (ICMP, other protocols) looks up dport 0 and so only matches
 *    protocol-0 rules.
 * Policy ids are shared by identical allow lists (dedup), whatever the direction. */
struct pf_policy_key {
	__u32 prefixlen;
	__u32 policy_id;
	__u32 peer_class;
	__u8 peer_kind;
	__u8 protocol;
	__be16 dport_be;
};

struct pf_policy_value {
	__u32 rule_count;           /* informational: how many allows produced this prefix */
	__u32 verdict;              /* PF_VERDICT_*; 0 (versions before tiers): a NetworkPolicy allow */
};

/* A policy entry's verdict for its cell (policy, peer class, protocol, port): for each of two
 * tiers, the first matching entry (lowest rank) and its action, resolved by the compiler over
 * every rule, peer of the class and overlapping port range (agent/dataplane/bpf/tiered.py).
 *  - "admin": the ClusterNetworkPolicy Admin tier; PF_ACT_PASS hands over to the rest;
 *  - "rest": the NetworkPolicy tier's allows (rank 0, Accept) or, when no NetworkPolicy isolates
 *    the direction, the Baseline tier (its Pass compiled as Accept: only the default follows).
 * The datapath combines the identity-class and CIDR-class entries by lowest rank per tier, so a
 * new flow costs the same lookups whatever the number of rules. Ranks fit 14 and 13 bits; the
 * compiler refuses more rules per endpoint direction. */
#define PF_ACT_NONE   0
#define PF_ACT_ACCEPT 1
#define PF_ACT_DENY   2
#define PF_ACT_PASS   3
#define PF_VERDICT_SET (1u << 31)
#define PF_VERDICT_ADMIN_ACTION(v) ((v) & 3)
#define PF_VERDICT_REST_ACTION(v) (((v) >> 2) & 3)
#define PF_VERDICT_ADMIN_RANK(v) (((v) >> 4) & 0x3fff)
#define PF_VERDICT_REST_RANK(v) (((v) >> 18) & 0x1fff)
/* what a value of verdict 0 means: a NetworkPolicy allow */
#define PF_VERDICT_ALLOW (PF_VERDICT_SET | (PF_ACT_ACCEPT << 2))

/* policy_exact: hash, the entries of single ports (prefixlen always 96) in the same key, so that
 * the allows most rules make cost one hash lookup whatever their number; policy (the LPM trie)
 * keeps port ranges and protocol-0 allows. An entry lives in exactly one of the two. */

/* ct: LRU conntrack, ONE entry per flow whichever way a packet runs. The key holds the flow's two
 * ends in canonical order, the lower (address, port) as end a (addresses compared as two 64-bit
 * words, then the port), so a packet and its reply build the same key and find the entry with
 * one lookup; which way the packet runs (PF_WAY_AB: from a to b) comes out of building the key.
 * For ICMP echo the id takes the place of the requester's port (the responder's is 0), so request
 * and reply are one flow. Other protocols without ports use 0/0 (tracked by address pair). */
struct pf_ct_key {
	struct pf_addr addr_a;
	struct pf_addr addr_b;
	__be16 port_a_be;
	__be16 port_b_be;
	__u8 protocol;
	__u8 pad[3];
};

struct pf_ct_value {
	__u64 last_seen_ns;         /* pf_now() (coarse CLOCK_MONOTONIC) of the last packet */
	__u32 slot[2];              /* per way: endpoint_id + 1 of the local pod that sends that way
				     * (0: none or unknown): its egress counters, so that nf_egress
				     * counts an established packet without finding the pod */
	__u8 flags[2];              /* per way: PF_CT_EGRESS_OK | PF_CT_INGRESS_OK | PF_CT_FROM_POD */
	__u8 closing;               /* PF_CT_FIN_AB | PF_CT_FIN_BA | PF_CT_RST seen; any: the entry
				     * expires after the closing timeout */
	__u8 pad;
	__u32 owner;                /* endpoint_id + 1 of the pod whose verdict inserted the entry,
				     * charged for it (pf_ct_charged); 0: nobody (older versions) */
};

/* ct_charged / ct_released: arrays indexed by endpoint_id, how many pf_ct entries the endpoint
 * was charged for (written by the datapath only, atomically) and how many of those are gone
 * (written by the agent only, after counting the live entries): each counter has one writer, so
 * no update of one side is lost to the other (lib/conntrack.h). */

/* ct_expect: LRU, what tc_from_pod saw a pod send last, for the egress verdict to confirm.
 * Keyed by the pod's end of the flow and the CPU: a packet meets tc ingress and the FORWARD /
 * LOCAL_IN hook on one CPU, and with the CPU in the key no other CPU writes the entry between the
 * two (lib/conntrack.h). The value holds the destination as the pod sent it, before DNAT. */
struct pf_ct_expect_key {
	struct pf_addr saddr;
	__be16 sport_be;
	__u8 protocol;
	__u8 pad;
	__u32 cpu;
};

struct pf_ct_expect_value {
	struct pf_addr daddr;       /* the destination as the pod sent it (pre-DNAT) */
	__be16 dport_be;
	__u8 pad[6];
	__u64 seen_ns;              /* pf_now() of the last write */
	__u64 conflict_ns;          /* pf_now() when another destination replaced a live one; 0: never */
};

/* frag: LRU, the verdict of a first fragment for the later fragments of the same datagram. */
struct pf_frag_key {
	struct pf_addr saddr;
	struct pf_addr daddr;
	__u32 id;                   /* IPv4 id (host order of the 16-bit field) or IPv6 fragment id */
	__u8 protocol;
	__u8 direction;             /* PF_DIR_*, or 2: seen sent by a pod, unjudged (lib/frag.h) */
	__u8 pad[2];
};

struct pf_frag_value {
	__u32 reason;               /* enum pf_reason of the first fragment */
	__be16 sport_be;
	__be16 dport_be;
	__u64 last_seen_ns;
};

/* counters: per-CPU array indexed by endpoint_id * 2 + direction. */
struct pf_counter_value {
	__u64 allowed_packets;
	__u64 allowed_bytes;
	__u64 denied_packets;
	__u64 denied_bytes;
};

/* Flow events, sent through the ring buffer (issue 24): one per flow, not per packet.
 *  - allowed: when a judgement newly admits a way of a flow (the packet that inserts or marks the
 *    conntrack entry: pf_judge), so established packets never emit;
 *  - denied: the first denied packet of a flow, and then the denied packets of the same flow
 *    (pf_flow_denied) aggregated into `packets`/`bytes`, sent when a denied packet meets the
 *    entry PF_FLOW_DENY_INTERVAL seconds after the last record (user space sends what an idle
 *    entry still holds, flows.py).
 * Every record takes a token of the per-CPU budget (pf_event_budget); one the budget or the ring
 * buffer refuses is counted in pf_events_lost. `policy_id` / `verdict_word` say what decided, for
 * user space to name the rule: the direction's policy id (0: no policy selects the pod) and, for
 * a tiered direction, the merged verdict word of the cells (its ranks name the rules). */
#define PF_FLOW_ALLOWED      0
#define PF_FLOW_DENIED       1
#define PF_FLOW_AUDIT_DENIED 2

#define PF_FLOW_FIRST        0x02  /* denied: the flow's first record (not a later aggregate) */

struct pf_flow_event {
	__u64 time_ns;              /* pf_now() of the packet (CLOCK_MONOTONIC) */
	__u64 packets;              /* packets the record stands for (denied: aggregated) */
	__u64 bytes;
	__u32 endpoint_id;
	__u32 policy_id;            /* the judged direction's policy id; 0: none selects the pod */
	__u32 verdict_word;         /* tiered direction: the merged PF_VERDICT_* word; else 0 */
	__u8 direction;
	__u8 reason;                /* enum pf_reason */
	__u8 verdict;               /* PF_FLOW_ALLOWED | PF_FLOW_DENIED | PF_FLOW_AUDIT_DENIED */
	__u8 protocol;
	__u8 family;                /* 4 or 6 (0: no IP header read) */
	__u8 flags;                 /* PF_FLOW_* */
	__be16 sport_be;
	__be16 dport_be;
	__u8 pad[6];
	struct pf_addr saddr;
	struct pf_addr daddr;
};

/* flow_denied: LRU, the denied flows seen lately, keyed by what a record names, with the packets
 * and bytes denied since the flow's last record. An entry the LRU evicts takes its counts along
 * (they are then missing from the records, never sent twice). */
struct pf_flow_key {
	struct pf_addr saddr;
	struct pf_addr daddr;
	__be16 sport_be;
	__be16 dport_be;
	__u8 protocol;
	__u8 direction;
	__u8 reason;
	__u8 pad;
	__u32 endpoint_id;
};

struct pf_flow_pending {
	__u64 packets;              /* denied since the last record (atomic adds) */
	__u64 bytes;
	__u64 recorded_ns;          /* pf_now() of the last record */
	__u32 policy_id;
	__u32 verdict_word;
};

/* event_budget: per-CPU token bucket for flow events. */
struct pf_event_budget {
	__u64 tokens;
	__u64 last_refill_ns;
};

/* nf_clock: per-CPU, the netfilter program's last precise clock reading and the jiffies it was
 * taken at (lib/common.h). */
struct pf_nf_clock {
	__u64 jiffies;
	__u64 now_ns;
};

#endif /* PODFENCE_H */
