"""The iptables/ipset dataplane: per-endpoint chains and shared ipsets, for nodes without eBPF.

compiler.py turns a NodeState into chains and sets (pure; their names and shapes in layout.py,
the targets of deciding rules with flow records or audit views in targets.py), kernel.py reads
and writes them,
dataplane.py is the `Dataplane` implementation tying the two together, with layer2.py (bridged
pods' ebtables rules, compiled by bridge.py) and counters.py (rule counters per endpoint).
"""

from agent.dataplane.iptables.dataplane import IptablesDataplane

__all__ = ["IptablesDataplane"]
