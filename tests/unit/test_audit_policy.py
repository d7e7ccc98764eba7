"""Audit (staged) policies in the model and the reference evaluator (agent.policy.audit).

A policy annotated `podfence.io/mode: audit` never changes the enforced verdict; the audit view
says what enforcing it would deny, with the deciding policy and rule."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import pytest

from agent.cli import main
from agent.model.cluster_policy import (
    Action,
    ClusterNetworkPolicy,
    ClusterPeer,
    ClusterRule,
    NamespacedPods,
    Tier,
)
from agent.model.errors import PolicyError
from agent.model.load import load_text, parse_object
from agent.model.objects import LabelSelector, NetworkPolicy, Peer, PolicyType, Protocol, Rule
from agent.policy.audit import audit_view, evaluate_staged, has_audit
from agent.policy.evaluator import evaluate
from agent.policy.state import ClusterState
from tests.unit.model_builders import pod, sel

TCP = Protocol.TCP


def _np_doc(mode: object = None, **spec: object) -> dict[str, object]:
    metadata: dict[str, object] = {"namespace": "shop", "name": "trial"}
    if mode is not None:
        metadata["annotations"] = {"podfence.io/mode": mode}
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": metadata,
        "spec": {"podSelector": {}, **spec},
    }


def _cnp_doc(mode: object) -> dict[str, object]:
    return {
        "apiVersion": "policy.networking.k8s.io/v1alpha2",
        "kind": "ClusterNetworkPolicy",
        "metadata": {"name": "guard", "annotations": {"podfence.io/mode": mode}},
        "spec": {
            "tier": "Admin",
            "priority": 10,
            "subject": {"namespaces": {}},
            "ingress": [{"action": "Deny", "from": [{"namespaces": {}}]}],
        },
    }


# --- model ---------------------------------------------------------------------------------------


def test_the_mode_annotation_is_read_on_both_policy_kinds() -> None:
    assert parse_object(_np_doc("audit")).audit is True  # type: ignore[union-attr]
    assert parse_object(_np_doc("enforce")).audit is False  # type: ignore[union-attr]
    assert parse_object(_np_doc()).audit is False  # type: ignore[union-attr]
    assert parse_object(_cnp_doc("audit")).audit is True  # type: ignore[union-attr]
    assert parse_object(_cnp_doc("enforce")).audit is False  # type: ignore[union-attr]


@pytest.mark.parametrize("mode", ["Audit", "dry-run", "", 1, True])
def test_a_bad_mode_rejects_that_object_naming_the_annotation(mode: object) -> None:
    with pytest.raises(PolicyError) as caught:
        parse_object(_np_doc(mode))
    assert caught.value.error.field == "metadata.annotations[podfence.io/mode]"
    assert caught.value.error.name == "trial"
    with pytest.raises(PolicyError, match=r"podfence\.io/mode"):
        parse_object(_cnp_doc(mode))


def test_a_bad_mode_rejects_only_its_own_object() -> None:
    text = (
        json.dumps(_np_doc("sometimes"))
        + "\n---\n"
        + json.dumps(
            {
                **_np_doc("audit"),
                "metadata": {
                    "namespace": "shop",
                    "name": "fine",
                    "annotations": {"podfence.io/mode": "audit"},
                },
            }
        )
    )
    result = load_text(text)
    assert [str(e) for e in result.errors] == [
        "NetworkPolicy shop/trial: metadata.annotations[podfence.io/mode]: Unsupported value: "
        '"sometimes": supported values: "audit", "enforce"'
    ]
    assert [(o.key, o.audit) for o in result.objects] == [("shop/fine", True)]  # type: ignore[union-attr]


def test_annotations_that_are_not_a_mapping_are_a_clear_error() -> None:
    doc = _np_doc()
    doc["metadata"] = {"namespace": "shop", "name": "trial", "annotations": ["podfence.io/mode"]}
    with pytest.raises(PolicyError, match=r"metadata\.annotations"):
        parse_object(doc)


# --- evaluator -----------------------------------------------------------------------------------

WEB = pod("shop", "web", "10.0.0.1", app="web")
CLIENT = pod("shop", "client", "10.0.0.2", app="client")
OTHER = pod("shop", "other", "10.0.0.3", app="other")
OUTSIDE = ipaddress.ip_address("192.0.2.9")


def _state(*policies: NetworkPolicy | ClusterNetworkPolicy) -> ClusterState:
    return ClusterState.from_objects([WEB, CLIENT, OTHER, *policies])


def _web_from_client(name: str = "web-from-client", audit: bool = False) -> NetworkPolicy:
    rule = Rule(peers=(Peer(pod_selector=sel(app="client")),))
    return NetworkPolicy(
        "shop", name, sel(app="web"), frozenset({PolicyType.INGRESS}), ingress=(rule,), audit=audit
    )


def _deny_other_to_web(audit: bool) -> ClusterNetworkPolicy:
    return ClusterNetworkPolicy(
        "no-other",
        Tier.ADMIN,
        5,
        subject_namespaces=LabelSelector(),
        ingress=(ClusterRule(Action.DENY, (ClusterPeer(pods=_pods(app="other")),), name="not-other"),),
        audit=audit,
    )


def _pods(**labels: str) -> NamespacedPods:
    return NamespacedPods(LabelSelector(), sel(**labels))


def test_an_audit_policy_changes_no_enforced_verdict() -> None:
    """evaluate() is the packet's fate: an audit policy takes no part in it, whichever way."""
    audit_np, audit_cnp = _web_from_client(audit=True), _deny_other_to_web(audit=True)
    plain, staged = _state(), _state(audit_np, audit_cnp)
    for src in (CLIENT, OTHER, OUTSIDE):
        for port in (80, 443):
            assert evaluate(staged, src, WEB, TCP, port) == evaluate(plain, src, WEB, TCP, port)


def test_an_audit_network_policy_newly_denies_by_isolating_a_pod() -> None:
    state = _state(_web_from_client(audit=True))
    assert has_audit(state)
    from_client = evaluate_staged(state, CLIENT, WEB, TCP, 80)
    assert from_client.enforced.allowed and from_client.audit is not None and from_client.audit.allowed
    assert not from_client.audit_denied
    from_other = evaluate_staged(state, OTHER, WEB, TCP, 80)
    assert from_other.enforced.allowed and from_other.audit_denied
    [(direction, verdict)] = from_other.audit_denying()
    assert direction == "ingress" and verdict.isolating == ("shop/web-from-client",)


def test_an_audit_network_policy_on_an_isolated_pod_never_newly_denies() -> None:
    """Allows add up: an audit policy beside an enforced one can only allow more."""
    enforced = _web_from_client()
    narrower = NetworkPolicy("shop", "deny-all", sel(app="web"), frozenset({PolicyType.INGRESS}), audit=True)
    state = _state(enforced, narrower)
    for src in (CLIENT, OTHER, OUTSIDE):
        staged = evaluate_staged(state, src, WEB, TCP, 80)
        assert not staged.audit_denied
        assert staged.audit is not None and staged.audit.allowed == staged.enforced.allowed


def test_an_audit_cluster_policy_deny_newly_denies_where_a_policy_allows() -> None:
    state = _state(_web_from_client(), _deny_other_to_web(audit=True))
    staged = evaluate_staged(state, OTHER, WEB, TCP, 80)
    assert not staged.enforced.allowed and not staged.audit_denied  # denied already: no news
    widened = NetworkPolicy(
        "shop", "web-from-all", sel(app="web"), frozenset({PolicyType.INGRESS}), ingress=(Rule(),)
    )
    staged = evaluate_staged(_state(widened, _deny_other_to_web(audit=True)), OTHER, WEB, TCP, 80)
    assert staged.enforced.allowed and staged.audit_denied
    [(direction, verdict)] = staged.audit_denying()
    assert direction == "ingress" and verdict.rule is not None
    assert (verdict.rule.policy, verdict.rule.index, verdict.rule.name) == ("no-other", 0, "not-other")


def test_no_audit_policy_no_audit_verdict() -> None:
    staged = evaluate_staged(_state(_web_from_client()), OTHER, WEB, TCP, 80)
    assert staged.audit is None and not staged.audit_denied and not staged.enforced.allowed


def test_audit_all_enforces_nothing_and_audits_everything() -> None:
    state = _state(_web_from_client(), _deny_other_to_web(audit=False))
    staged = evaluate_staged(state, OTHER, WEB, TCP, 80, audit_all=True)
    assert staged.enforced.allowed and staged.audit_denied
    assert staged.audit == evaluate(state, OTHER, WEB, TCP, 80)
    assert evaluate(audit_view(state), OTHER, WEB, TCP, 80) == evaluate(state, OTHER, WEB, TCP, 80)


# --- explain -------------------------------------------------------------------------------------

FOLDER = """
apiVersion: v1
kind: Pod
metadata: {namespace: shop, name: web, labels: {app: web}}
spec: {nodeName: node-1, containers: [{name: c}]}
status: {podIP: 10.0.0.1}
---
apiVersion: v1
kind: Pod
metadata: {namespace: shop, name: other, labels: {app: other}}
spec: {nodeName: node-1, containers: [{name: c}]}
status: {podIP: 10.0.0.3}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  namespace: shop
  name: web-from-client
  annotations: {podfence.io/mode: audit}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress: [{from: [{podSelector: {matchLabels: {app: client}}}]}]
"""


def test_explain_shows_the_enforced_and_the_audit_verdict(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "objects.yaml").write_text(FOLDER)
    args = ["explain", "--source", str(tmp_path), "--from", "shop/other", "--to", "shop/web", "--port", "80"]
    assert main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["allowed"] is True and out["verdict"] == "audit-denied"
    assert out["ingress"]["isolated"] is False
    assert out["audit"]["allowed"] is False
    assert out["audit"]["ingress"]["isolated_by"] == ["shop/web-from-client"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "ALLOWED (AUDIT-DENIED" in text
    assert "with the policies in audit enforced: denied" in text
    assert "isolated by shop/web-from-client" in text


def test_explain_without_audit_policies_has_no_audit_verdict(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "objects.yaml").write_text(
        FOLDER.replace("podfence.io/mode: audit", "podfence.io/mode: enforce")
    )
    args = ["explain", "--source", str(tmp_path), "--from", "shop/other", "--to", "shop/web", "--port", "80"]
    assert main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["allowed"], out["verdict"], out["audit"]) == (False, "denied", None)
    assert main([*args, "--json", "--audit-all"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["allowed"], out["verdict"], out["audit"]["allowed"]) == (True, "audit-denied", False)
