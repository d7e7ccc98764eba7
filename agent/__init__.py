"""podfence: node-level Kubernetes NetworkPolicy enforcement (eBPF tc, iptables/ipset fallback)."""

__version__ = "0.1.0"
