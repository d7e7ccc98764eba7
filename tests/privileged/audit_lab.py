"""One audit rollout on three lab pods, shared by the real-traffic tests of both dataplanes.

Pods p1 (app=a), p2 (app=b), p3 (app=c) in namespace `lab` on node n1. Enforced: b admits TCP and
UDP from a and c; a reaches b on TCP and UDP, and c on anything. In audit:
  - `c-trial` isolates c's ingress to TCP from a (an audit NetworkPolicy newly denies by
    isolating a pod no enforced policy isolates);
  - `no-udp-from-a`, an Admin Deny of UDP from a to b (an audit ClusterNetworkPolicy newly denies
    what a NetworkPolicy allows);
  - `a-narrow` allows a's egress to b on TCP only: beside the enforced `a-egress` it can only
    allow more (allows add up), so it newly denies nothing.
The expectations come from the reference evaluator, per direction: the enforced verdict is each
packet's fate, and a direction counts an audit denial iff its enforced verdict admits the flow
and its audit view (every policy enforced) denies it.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Callable, Mapping, Sequence

from agent.control.encode import snapshot_message
from agent.dataplane.flows import FlowRecord, FlowVerdict
from agent.dataplane.types import NodeState
from agent.model.cluster_policy import (
    Action,
    ClusterNetworkPolicy,
    ClusterPeer,
    ClusterPort,
    ClusterRule,
    NamespacedPods,
    Tier,
)
from agent.model.objects import (
    KubeObject,
    LabelSelector,
    Namespace,
    NetworkPolicy,
    Peer,
    Pod,
    PolicyType,
    PortSpec,
    Protocol,
    Rule,
    labels_from_dict,
)
from agent.node.decode import apply_message
from agent.policy.audit import audit_view, enforced_view
from agent.policy.evaluator import DirectionVerdict, evaluate
from agent.policy.staged import StagedResolver
from agent.policy.state import ClusterState

NAMESPACE, NODE = "lab", "n1"
APPS = ("a", "b", "c")
ICMP = 1
INGRESS, EGRESS = frozenset({PolicyType.INGRESS}), frozenset({PolicyType.EGRESS})


def _app(name: str) -> LabelSelector:
    return LabelSelector(labels_from_dict({"app": name}))


def _from(*apps: str) -> tuple[Peer, ...]:
    return tuple(Peer(pod_selector=_app(app)) for app in apps)


def lab_objects(pod_ips: Sequence[Sequence[str]], tcp_port: int, udp_port: int) -> list[KubeObject]:
    tcp, udp = PortSpec(Protocol.TCP, tcp_port), PortSpec(Protocol.UDP, udp_port)
    pods = [
        Pod(NAMESPACE, f"p{i + 1}", NODE, {"app": app}, tuple(ipaddress.ip_address(a) for a in ips))
        for i, (app, ips) in enumerate(zip(APPS, pod_ips, strict=True))
    ]
    return [
        Namespace(NAMESPACE),
        *pods,
        NetworkPolicy(
            NAMESPACE, "b-ingress", _app("b"), INGRESS, ingress=(Rule(_from("a", "c"), (tcp, udp)),)
        ),
        NetworkPolicy(
            NAMESPACE,
            "a-egress",
            _app("a"),
            EGRESS,
            egress=(Rule(_from("b"), (tcp, udp)), Rule(_from("c"))),
        ),
        NetworkPolicy(
            NAMESPACE, "c-trial", _app("c"), INGRESS, ingress=(Rule(_from("a"), (tcp,)),), audit=True
        ),
        NetworkPolicy(
            NAMESPACE, "a-narrow", _app("a"), EGRESS, egress=(Rule(_from("b"), (tcp,)),), audit=True
        ),
        ClusterNetworkPolicy(
            "no-udp-from-a",
            Tier.ADMIN,
            10,
            subject_pods=NamespacedPods(LabelSelector(), _app("b")),
            ingress=(
                ClusterRule(
                    Action.DENY,
                    (ClusterPeer(pods=NamespacedPods(LabelSelector(), _app("a"))),),
                    (ClusterPort(Protocol.UDP, udp_port, udp_port),),
                    name="udp",
                ),
            ),
            audit=True,
        ),
    ]


@dataclasses.dataclass(frozen=True)
class Expect:
    source: int  # pod index 0..2
    target: int
    protocol: Protocol | int
    port: int
    passes: bool  # the enforced verdict: the packet's fate
    audit_denied: frozenset[tuple[str, str]]  # (endpoint key, direction) that count a denial
    # (endpoint key, direction, policy) of each: the ClusterNetworkPolicy whose rule denies, or ""
    # when a NetworkPolicy isolates without a matching rule (the record says so, naming no policy)
    audit_named: frozenset[tuple[str, str, str]] = frozenset()


def expectations(
    objects: list[KubeObject], tcp_port: int, udp_port: int, audit_all: bool = False
) -> list[Expect]:
    """Per probe: the fate and the counting directions. `audit_all`: as the agent's --audit-all."""
    view = audit_view(ClusterState.from_objects(objects))
    state = enforced_view(ClusterState.from_objects(objects), audit_all)
    pods = [view.pods[f"{NAMESPACE}/p{i + 1}"] for i in range(len(APPS))]
    found = []
    for s, src in enumerate(pods):
        for t, dst in enumerate(pods):
            if s == t:
                continue
            for protocol, port in ((Protocol.TCP, tcp_port), (Protocol.UDP, udp_port), (ICMP, 0)):
                enforced = evaluate(state, src, dst, protocol, port)
                audit = evaluate(view, src, dst, protocol, port)
                counted, named = set(), set()
                if enforced.egress.allowed and not audit.egress.allowed:
                    counted.add((src.key, "egress"))
                    named.add((src.key, "egress", _denier(audit.egress)))
                if enforced.egress.allowed and enforced.ingress.allowed and not audit.ingress.allowed:
                    counted.add((dst.key, "ingress"))  # judged only once the egress admitted it
                    named.add((dst.key, "ingress", _denier(audit.ingress)))
                found.append(
                    Expect(s, t, protocol, port, enforced.allowed, frozenset(counted), frozenset(named))
                )
    return found


def _denier(verdict: DirectionVerdict) -> str:
    return verdict.rule.policy if verdict.rule is not None else ""


def node_state(objects: list[KubeObject], ifindexes: dict[str, int], node_ips: tuple[str, ...]) -> NodeState:
    """n1's policy as the agent decodes it from the StagedResolver's snapshot."""
    resolver = StagedResolver()
    resolver.replace_all(objects)
    decoded = apply_message(None, snapshot_message(1, resolver.node_policy(NODE)))
    endpoints = {k: dataclasses.replace(e, ifindex=ifindexes[k]) for k, e in decoded.endpoints.items()}
    return NodeState(
        1,
        endpoints,
        decoded.identities,
        tuple(ipaddress.ip_address(a) for a in node_ips),
        frozenset(ifindexes.values()),
    )


def disagreements(
    expected: list[Expect],
    run_probe: Callable[[Expect], bool],
    audit_denied: Callable[[], Mapping[tuple[str, str], int]],
    records: Callable[[], Sequence[FlowRecord]] | None = None,
) -> list[str]:
    """Runs each probe alone (run_probe(expect) -> answered) and diffs the audit counters
    (audit_denied() -> {(key, direction): count}) around it. `records`: the flow records since
    the last call, if the dataplane's are to be checked: exactly one audit-denied record per
    direction the evaluator names, naming its denying policy, and none elsewhere. Read before
    the counters: the agent counts egress audit denials as it names their records."""
    wrong = []
    for expect in expected:
        if records is not None:
            records()
        before = audit_denied()
        passed = run_probe(expect)
        where = f"p{expect.source + 1}->p{expect.target + 1} {expect.protocol}/{expect.port}"
        if records is not None:
            audited = sorted(
                (r.endpoint, r.direction, r.policy)
                for r in records()
                if r.verdict is FlowVerdict.AUDIT_DENIED
            )
            if audited != sorted(expect.audit_named):
                wrong.append(
                    f"{where}: audit-denied records {audited}, expected {sorted(expect.audit_named)}"
                )
        after = audit_denied()
        grew = {ref for ref, count in after.items() if count > before.get(ref, 0)}
        if passed != expect.passes:
            wrong.append(f"{where}: {'passed' if passed else 'dropped'}, enforced verdict {expect.passes}")
        if grew != expect.audit_denied:
            wrong.append(
                f"{where}: audit denials counted at {sorted(grew)}, expected {sorted(expect.audit_denied)}"
            )
    return wrong
