"""All 24 upstream ClusterNetworkPolicy conformance tests, judged by the reference evaluator.

For each test (tests/data/npa/cases.json, 301 probes): build the base topology, create the test's
objects, then step by step apply the changes (they accumulate), load every object through the
model loader (so each policy also passes validation), and judge each probe with `evaluate`. A
probe to `nodeIP` goes to a host-network pod, whose IP is its node's. The deciding tier and rule
are also compared with the data's `why` where the data names a rule, so a right verdict for the
wrong reason fails too.
"""

from __future__ import annotations

import re

import pytest
import yaml

from agent.model.load import load_text
from agent.model.objects import Protocol
from agent.policy.evaluator import DirectionVerdict, evaluate
from agent.policy.state import ClusterState
from tests.cnp_conformance_model import Case, CnpCluster, Probe, cases, load_cases

CASES = cases()
_WHY_RULE = re.compile(r"^(Admin|Baseline) tier: (\S+) \(priority \d+\) (?:ingress|egress)\[(\d+)\]")


def _state(cluster: CnpCluster) -> ClusterState:
    result = load_text(yaml.safe_dump_all(cluster.objects()), "cnp-conformance")
    assert not result.errors, [str(e) for e in result.errors]
    assert result.ignored == 0
    return ClusterState.from_objects(result.objects)


def _deciding_rule(why: str) -> tuple[str, str, int] | None:
    """(tier, policy, rule index) of the last Admin/Baseline rule named in a `why` that decided
    (not a Pass); None when the data says another tier or the default decided."""
    for part in reversed(why.split("; ")):
        match = _WHY_RULE.match(part)
        if match and not part.endswith("-> Pass"):
            return match.group(1), match.group(2), int(match.group(3))
    return None


def _check_reason(probe: Probe, direction: str, verdict: DirectionVerdict) -> str | None:
    why = probe.why.get(direction, "")
    expected = _deciding_rule(why)
    got = None if verdict.rule is None else (verdict.rule.tier.value, verdict.rule.policy, verdict.rule.index)
    if expected is not None and got != expected:
        return f"{probe} {direction}: decided by {got}, the data says {why!r}"
    if "NetworkPolicy tier" in why and verdict.tier != "NetworkPolicy":
        return f"{probe} {direction}: decided by tier {verdict.tier}, the data says {why!r}"
    return None


def test_every_case_is_present() -> None:
    data = load_cases()
    assert len(CASES) == data["summary"]["tests"] == 24
    assert sum(len(s.probes) for c in CASES for s in c.steps) == data["summary"]["probes"] == 301
    assert sum(len(s.changes) for c in CASES for s in c.steps) == data["summary"]["changes"] == 42


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_case(case: Case) -> None:
    cluster = CnpCluster(case)
    for step in case.steps:
        for change in step.changes:
            cluster.apply(change)
        state = _state(cluster)
        wrong: list[str] = []
        for probe in step.probes:
            src = state.pods[probe.source]
            dst = state.pods[probe.destination]
            assert (probe.target == "nodeIP") == dst.host_network
            verdict = evaluate(state, src, dst, Protocol(probe.protocol), probe.port)
            if verdict.allowed != probe.expect:
                wrong.append(f"{probe}: expected {'allow' if probe.expect else 'deny'} ({probe.why})")
                continue
            for direction, judged in (("egress", verdict.egress), ("ingress", verdict.ingress)):
                problem = _check_reason(probe, direction, judged)
                if problem:
                    wrong.append(problem)
        assert not wrong, f"step {step.number} ({step.subtest}): {wrong}"


def test_the_check_fails_without_cluster_policies() -> None:
    """Guards the test above: with the ClusterNetworkPolicies left out, many probes change."""
    changed = 0
    for case in CASES:
        cluster = CnpCluster(case)
        for step in case.steps:
            for change in step.changes:
                cluster.apply(change)
            state = _state(cluster)
            state.cluster_policies.clear()
            for probe in step.probes:
                verdict = evaluate(
                    state,
                    state.pods[probe.source],
                    state.pods[probe.destination],
                    Protocol(probe.protocol),
                    probe.port,
                )
                changed += verdict.allowed != probe.expect
    assert changed >= 100
