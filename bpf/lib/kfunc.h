/* Kernel functions (kfuncs) and the dynptr helper, for the netfilter-link program.
 *
 * BCC emits no kfunc calls, so each kfunc is declared here as a helper call with an id no helper
 * has (PF_KFUNC_*); the loader (agent/dataplane/bpf/netfilter.py) rewrites every such call into a
 * call of the kernel function of that name, whose id it reads from the kernel's BTF. A program
 * using them is loaded only through that path. */
#ifndef PF_LIB_KFUNC_H
#define PF_LIB_KFUNC_H

/* struct bpf_dynptr: opaque, 16 bytes, on the stack */
struct pf_dynptr {
	__u64 opaque[2];
} __attribute__((aligned(8)));

#define PF_KFUNC_DYNPTR_FROM_SKB 0x7f01  /* int bpf_dynptr_from_skb(skb, flags, ptr) */
#define PF_KFUNC_DYNPTR_SIZE     0x7f02  /* u32 bpf_dynptr_size(ptr) */
#define PF_HELPER_DYNPTR_READ    201     /* BPF_FUNC_dynptr_read (a helper, kernel >= 5.19) */

static long (*pf_dynptr_from_skb)(void *skb, __u64 flags, struct pf_dynptr *ptr) = (void *)PF_KFUNC_DYNPTR_FROM_SKB;
static __u32 (*pf_dynptr_size)(const struct pf_dynptr *ptr) = (void *)PF_KFUNC_DYNPTR_SIZE;
static long (*pf_dynptr_read)(void *dst, __u32 len, const struct pf_dynptr *src, __u32 offset,
			      __u64 flags) = (void *)PF_HELPER_DYNPTR_READ;

#endif /* PF_LIB_KFUNC_H */
