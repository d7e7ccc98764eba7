"""The policy layer: Kubernetes objects in, per-node allow lists out, plus the reference evaluator.

No I/O here; it imports only agent.model.

Representation (decided): Cilium-style numeric identities.
- An identity is (namespace name, pod label set); its id is blake2b-8 of a canonical JSON encoding
  (graph.rules.identity_id), so every process and replica derives the same id, and 0 is never used.
- An endpoint's allow list per direction is a set of AllowEntry(peer, protocol, port range), where
  the peer is an IdentityRef (pods matched by selectors) or a CidrRef (ipBlock with excepts; the
  "no peers" rule as 0.0.0.0/0 and ::/0; a named egress port resolved to one pod's /32 or /128).
- The node keeps IP -> identity (NodePolicy.identities, only the identities its endpoints use)
  and per endpoint a hash/LPM table keyed by (identity | CIDR, protocol, port): a new flow costs
  one IP->identity lookup and a few table lookups, independent of the number of policies or rules.
Why identities rather than Calico-style IP sets: many pods share a label set (one Deployment =
one identity), so a selector resolves to few numbers; a pod that starts or stops changes only
the IP -> identity table, never any endpoint's allow list; and the allow list is an exact-match
key, which is what a BPF hash map does in O(1). Why not identity per pod: churn would rewrite allow
lists on every pod start.

Decisions where Kubernetes leaves room (the evaluator and the compiler follow the same ones):
- hostNetwork pods are seen only by their IPs: no policy isolates them, no pod selector matches
  them, and they are never endpoints (state.takes_part_in_selectors).
- Pods in phase Succeeded or Failed take no part at all (state.is_live): no endpoint, no peer,
  no named port; their IPs may already belong to a new pod. A terminating pod (deletionTimestamp)
  in another phase still runs through its grace period and keeps taking part.
- A namespace without a Namespace object still exists for selectors, with only the automatic
  `kubernetes.io/metadata.name` label, which every namespace carries (state.effective_namespace_labels).
- A referenced identity whose pods have no IP yet is listed with an empty IP tuple, not omitted.
- Named ports match only pods; on egress they compile to the destination pod's /32 or /128.
- Every endpoint's allow list is sorted and deduplicated (compiled.normalize_allows), so equal
  lists compare equal and the control service can diff NodePolicy values cheaply.

Modules: compiled (output types), state (ClusterState and shared semantics), resolver
(incremental compiler: a thin dispatcher over the calculation-graph parts in graph/), evaluator
(the oracle, working on objects directly), check (answers a question from the compiled form, to
test the compiler against the oracle), explain (the CLI).
"""
