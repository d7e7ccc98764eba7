"""The node agent: this node's policy from the control service, pod interfaces found, the kernel programmed.

`sync` keeps the desired state in step with the control service and acknowledges each version
(`decode` turns its snapshots and deltas into the dataplane's NodeState), `interfaces` finds the
host-side interface of every local pod (`monitor` says when to look again), `reconcile` hands both
to the dataplane, `hookguard` keeps the netfilter hooks first, `repair` puts back removed kernel
state and `ctrelease` counts the pods' conntrack entries (all three on `periodic`'s loop),
`flowfeed` hands the dataplane's flow records to `flowlog`, `flowbuffer` (relayed to the control
service) and `metrics`, and `main`/`teardown` are the commands (`build` makes the dataplane the
flags describe). Imports agent.api and agent.dataplane only.
"""
