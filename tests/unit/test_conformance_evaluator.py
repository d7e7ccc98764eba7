"""All 48 upstream netpol e2e cases, judged by the reference evaluator (and the compiled form).

For each case, both topologies (the old 9-pod one and the new per-test one), each step: apply the
step's actions to the model cluster, load the objects through the model loader, and compare every
ordered non-loopback pod pair with the case's expected blocked list. The evaluator is judged pod to
pod, i.e. on the backend pod kube-proxy picks (the probe's Service ClusterIP is DNATed first).
The same pairs are then answered from the compiled NodePolicy, so the compiler is held to the
same 48 cases.
"""

from __future__ import annotations

import pytest
import yaml

from agent.model.load import load_text
from agent.model.objects import Pod, Protocol
from agent.policy.check import EGRESS, INGRESS, compiled_allows
from agent.policy.evaluator import evaluate
from agent.policy.resolver import Resolver
from agent.policy.state import ClusterState
from tests.conformance_model import NODE_NAME, Case, ConformanceCluster, load_cases, runs

RUNS = list(runs())


def _load(cluster: ConformanceCluster) -> ClusterState:
    result = load_text(yaml.safe_dump_all(cluster.objects()), "conformance")
    assert not result.errors, [str(e) for e in result.errors]
    return ClusterState.from_objects(result.objects)


def test_every_case_is_present() -> None:
    cases = load_cases()
    assert [c.id for c in cases] == list(range(1, 49))
    assert len(RUNS) == 96


@pytest.mark.parametrize(("case", "topology"), RUNS, ids=[f"{c.id:02d}-{t}" for c, t in RUNS])
def test_case(case: Case, topology: str) -> None:
    cluster = ConformanceCluster(case, topology)
    resolver = Resolver()
    for step in case.steps:
        for action in step.actions:
            cluster.apply(action)
        state = _load(cluster)
        resolver.replace_all([*state.namespaces.values(), *state.pods.values(), *state.policies.values()])
        node_policy = resolver.node_policy(NODE_NAME)
        protocol = Protocol(step.probe.protocol)
        pods: dict[str, Pod] = {}
        for pod in state.pods.values():
            pods[cluster.model_pod_of(pod.namespace, pod.name)] = pod

        wrong_evaluator, wrong_compiled = [], []
        for (src, dst), should_connect in step.expected(case.pods(topology), topology).items():
            verdict = evaluate(state, pods[src], pods[dst], protocol, step.probe.port)
            if verdict.allowed != should_connect:
                wrong_evaluator.append(f"{src}->{dst} expected {'allow' if should_connect else 'deny'}")
            src_pod, dst_pod = pods[src], pods[dst]
            compiled = compiled_allows(
                node_policy, src_pod.key, EGRESS, dst_pod.ips[0], protocol.number, step.probe.port
            ) and compiled_allows(
                node_policy, dst_pod.key, INGRESS, src_pod.ips[0], protocol.number, step.probe.port
            )
            if compiled != should_connect:
                wrong_compiled.append(f"{src}->{dst} expected {'allow' if should_connect else 'deny'}")
        assert not wrong_evaluator, f"step {step.index + 1} evaluator: {wrong_evaluator}"
        assert not wrong_compiled, f"step {step.index + 1} compiled: {wrong_compiled}"
