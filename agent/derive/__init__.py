"""Policies derived from what the application does: from the mesh's routes and from observed flows.

`podfence derive --istio DIR` reads an Istio configuration (istio, istio_scope, workloads),
`podfence suggest --flows FILE.jsonl` reads flow records (flows); both build a connection graph
(graph), render it as NetworkPolicies (render), and check those with the reference evaluator
before printing anything (verify, output). It imports agent.model and agent.policy only.
"""
