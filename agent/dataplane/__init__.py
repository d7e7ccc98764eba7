"""Kernel programming. Takes a NodeState (no Kubernetes objects) and makes the kernel enforce it.

Two implementations of the `Dataplane` protocol: `bpf` (tc eBPF, BCC + pyroute2) and
`iptables` (python-iptables + ipset). Nothing above this layer is imported from here.
"""
