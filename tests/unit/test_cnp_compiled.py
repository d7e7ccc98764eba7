"""ClusterNetworkPolicy in the compiled form, held against the upstream cases and the evaluator.

The 24 upstream cases (tests/data/npa/cases.json) are replayed through the incremental Resolver,
step by step, and every probe is answered from the compiled NodePolicy alone (check.compiled_allows:
the first-match-by-rank reading the dataplanes implement), so the compiler is held to the same
301 probes as the evaluator. Random clusters mixing ClusterNetworkPolicy and NetworkPolicy
(tests/cnp_scenarios.py) must get the same verdict from the evaluator and the compiled form on
every pod pair and port; the same scenarios fed one object at a time must compile to the same
NodePolicy as a full resync (the incremental paths).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings

from agent.model.objects import Pod, Protocol
from agent.policy.compiled import NodePolicy
from agent.policy.evaluator import evaluate
from agent.policy.resolver import Resolver
from agent.policy.state import ClusterState
from tests.cnp_conformance_model import NODE_NAMES, Case, CnpCluster, Step, cases
from tests.cnp_scenarios import PROBE_PORTS, Scenario, compiled_verdict, scenarios
from tests.unit.test_cnp_conformance import _state

CASES = cases()


def _all_objects(state: ClusterState) -> list[object]:
    return [
        *state.nodes.values(),
        *state.namespaces.values(),
        *state.pods.values(),
        *state.policies.values(),
        *state.cluster_policies.values(),
    ]


def _replay(case: Case) -> Iterator[tuple[Step, ClusterState, Resolver]]:
    """Each step of `case` with its objects loaded and fed to one Resolver (a resync per step)."""
    cluster = CnpCluster(case)
    resolver = Resolver()
    for step in case.steps:
        for change in step.changes:
            cluster.apply(change)
        state = _state(cluster)
        resolver.replace_all(_all_objects(state))  # type: ignore[arg-type]
        yield step, state, resolver


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_case_compiled(case: Case) -> None:
    for step, state, resolver in _replay(case):
        policies = {node: resolver.node_policy(node) for node in NODE_NAMES}
        wrong = []
        for probe in step.probes:
            src, dst = state.pods[probe.source], state.pods[probe.destination]
            allowed = compiled_verdict(policies, src, dst, Protocol(probe.protocol).number, probe.port)
            if allowed != probe.expect:
                wrong.append(f"{probe}: expected {'allow' if probe.expect else 'deny'} ({probe.why})")
        assert not wrong, f"step {step.number} ({step.subtest}): {wrong}"


def test_admin_deny_beats_a_namespace_allow_all_in_the_compiled_form() -> None:
    """Guards the test above against a compiled form that ignores tiers: probes whose verdict
    changes when the tiered entries are stripped must be many."""
    changed = 0
    for case in CASES:
        for step, state, resolver in _replay(case):
            stripped = {node: _strip(resolver.node_policy(node)) for node in NODE_NAMES}
            for probe in step.probes:
                src, dst = state.pods[probe.source], state.pods[probe.destination]
                allowed = compiled_verdict(stripped, src, dst, Protocol(probe.protocol).number, probe.port)
                changed += allowed != probe.expect
    assert changed >= 100


def _strip(policy: NodePolicy) -> NodePolicy:
    endpoints = {
        key: replace(e, ingress=replace(e.ingress, tiered=()), egress=replace(e.egress, tiered=()))
        for key, e in policy.endpoints.items()
    }
    return NodePolicy(endpoints=endpoints, identities=policy.identities)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_random_scenarios_compiled_agrees_with_the_evaluator(scenario: Scenario) -> None:
    resolver = Resolver()
    resolver.replace_all(scenario.objects)
    state = resolver.state
    policies = {node: resolver.node_policy(node) for node in scenario.nodes}
    wrong = []
    for src in state.pods.values():
        for dst in state.pods.values():
            if src.key == dst.key:
                continue  # a pod reaching its own IP never leaves its netns
            for protocol, port in PROBE_PORTS:
                expected = evaluate(state, src, dst, protocol, port).allowed
                if compiled_verdict(policies, src, dst, protocol, port) != expected:
                    wrong.append(f"{src.key} -> {dst.key} {protocol}/{port}: evaluator says {expected}")
    assert not wrong, wrong[:10]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_random_scenarios_incremental_equals_resync(scenario: Scenario) -> None:
    """Objects fed one at a time (cluster policies first, then pods, so identities appear after
    the policies that name them) compile as a fresh full resync does; so do pod deletions."""
    fresh = Resolver()
    fresh.replace_all(scenario.objects)
    incremental = Resolver()
    ordered = sorted(scenario.objects, key=lambda o: type(o).__name__ != "ClusterNetworkPolicy")
    for obj in ordered:
        incremental.upsert(obj)
    for node in scenario.nodes:
        assert incremental.node_policy(node) == fresh.node_policy(node)
    # every other pod goes: identities vanish, peers shrink
    gone = [o for o in scenario.objects if isinstance(o, Pod)][::2]
    for pod in gone:
        incremental.delete("Pod", pod.namespace, pod.name)
    remaining = Resolver()
    remaining.replace_all([o for o in scenario.objects if o not in gone])
    for node in scenario.nodes:
        assert incremental.node_policy(node) == remaining.node_policy(node)
