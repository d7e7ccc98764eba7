"""The iptables/ipset dataplane: per-endpoint chains and shared ipsets, for nodes without eBPF.

compiler.py turns a NodeState into chains and sets (pure), kernel.py reads and writes them,
dataplane.py is the `Dataplane` implementation tying the two together.
"""

from agent.dataplane.iptables.dataplane import IptablesDataplane

__all__ = ["IptablesDataplane"]
