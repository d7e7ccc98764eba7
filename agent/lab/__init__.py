"""The node lab: simulated Kubernetes nodes and pods in network namespaces on one machine.

`topology` builds the nodes, pods and Services from `scenarios` (`machine` holds the lab's
footprint on the machine, its lock and its teardown), `servers` and `prober` serve and probe every
port a scenario names, `cluster` runs the control service and one agent per node on it, and
`cli` and `demo` are the `podfence lab` and `podfence demo` commands. Used by the end-to-end
tests, the benchmarks and the demo; never by the agent or the control service.
"""
