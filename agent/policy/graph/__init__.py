"""The parts of the resolver's calculation graph; agent.policy.resolver wires them together.

Each module is one node of the graph, holding one index and answering one question:
rules (what a policy's rules need: selector keys, port ranges, patch plans; pure functions),
identities (pods -> (namespace, labels) identities), selectors (peer selector -> matching
identities), selection (policy -> the pods it selects), named_ports (which templates a pod's
named ports affect, and where a named egress port resolves), templates (a policy with its peers
resolved), endpoints (one pod's allow lists, memoised) and nodes (the per-node NodePolicy output).
The parts never import the resolver; .importlinter states their layering.
"""
