"""The node agent: this node's policy from the control service, pod interfaces found, the kernel programmed.

`sync` keeps the desired state in step with the control service and acknowledges each version,
`interfaces` finds the host-side interface of every local pod, `reconcile` hands both to the
dataplane, `hookguard` keeps the netfilter hooks first, `metrics` and `flowlog` report, and
`main`/`teardown` are the commands. Imports agent.api and agent.dataplane only.
"""
