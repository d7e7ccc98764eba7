"""ClusterNetworkPolicy and Node in the model: the CRD's limits, one rejected object at a time.

- The limits and enums in agent.model.cluster_policy_load are the ones in the CRD that deploy/
  ships (read from its OpenAPI schema), and that CRD validates as a Kubernetes object.
- Every invalid form is rejected alone, named `ClusterNetworkPolicy <name>` with the API field
  path, while the other objects of the same text still load.
- Fields of a newer CRD fail closed (upstream's rule): never a rejection that would drop a Deny.
"""

from __future__ import annotations

import copy
import ipaddress
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.model import cluster_policy_load as cpl
from agent.model.cluster_policy import Action, ClusterNetworkPolicy, Node, Tier
from agent.model.errors import PolicyError
from agent.model.load import load_text, parse_object
from agent.model.objects import Protocol

CRD = Path(__file__).resolve().parents[2] / "deploy" / "crd" / "clusternetworkpolicies.yaml"


def _crd() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(CRD.read_text())
    return doc


def _spec_schema() -> dict[str, Any]:
    schema: dict[str, Any] = _crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    return schema


def cnp(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "tier": "Admin",
        "priority": 10,
        "subject": {"namespaces": {"matchLabels": {"team": "a"}}},
    }
    base.update(spec)
    return {
        "apiVersion": "policy.networking.k8s.io/v1alpha2",
        "kind": "ClusterNetworkPolicy",
        "metadata": {"name": "guard"},
        "spec": base,
    }


def egress(*rules: dict[str, Any]) -> dict[str, Any]:
    return cnp(egress=list(rules))


def rule(action: str = "Deny", to: list[Any] | None = None, **extra: Any) -> dict[str, Any]:
    return {"action": action, "to": to if to is not None else [{"networks": ["169.254.169.254/32"]}], **extra}


# --- the CRD ------------------------------------------------------------------------------------


def test_the_shipped_crd_is_a_valid_kubernetes_object() -> None:
    kubernetes_validate.validate(_crd(), "1.33.0", strict=True)
    assert _crd()["spec"]["names"]["kind"] == "ClusterNetworkPolicy"
    assert _crd()["spec"]["versions"][0]["name"] == "v1alpha2"


def test_the_limits_are_the_crds() -> None:
    spec = _spec_schema()
    props = spec["properties"]
    assert set(spec["required"]) == {"tier", "priority", "subject"}
    assert props["tier"]["enum"] == [t.value for t in Tier]
    assert (props["priority"]["minimum"], props["priority"]["maximum"]) == (
        cpl.PRIORITY_MIN,
        cpl.PRIORITY_MAX,
    )
    for direction, peers_field in (("ingress", "from"), ("egress", "to")):
        assert props[direction]["maxItems"] == cpl.MAX_RULES
        item = props[direction]["items"]["properties"]
        assert item["action"]["enum"] == [a.value for a in Action]
        assert item["name"]["maxLength"] == cpl.MAX_RULE_NAME
        assert (item[peers_field]["minItems"], item[peers_field]["maxItems"]) == (1, cpl.MAX_PEERS)
        assert (item["protocols"]["minItems"], item["protocols"]["maxItems"]) == (1, cpl.MAX_PROTOCOLS)
        tcp = item["protocols"]["items"]["properties"]["tcp"]["properties"]["destinationPort"]["properties"]
        assert (tcp["number"]["minimum"], tcp["number"]["maximum"]) == (1, 65535)
    ingress_peer = props["ingress"]["items"]["properties"]["from"]["items"]["properties"]
    egress_peer = props["egress"]["items"]["properties"]["to"]["items"]["properties"]
    assert set(ingress_peer) == set(cpl.INGRESS_PEER_FIELDS)
    # The standard channel; the experimental one adds nodes and domainNames, read here too.
    assert set(egress_peer) == set(cpl.EGRESS_PEER_FIELDS) - {"nodes", "domainNames"}
    networks = egress_peer["networks"]
    assert (networks["minItems"], networks["maxItems"]) == (1, cpl.MAX_NETWORKS)
    assert networks["items"]["maxLength"] == cpl.MAX_CIDR_LENGTH


# --- valid objects ------------------------------------------------------------------------------


def test_a_full_policy_is_read() -> None:
    doc = cnp(
        tier="Baseline",
        priority=0,
        subject={"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "db"}}}},
        ingress=[
            {
                "name": "from-a",
                "action": "Accept",
                "from": [{"namespaces": {}}],
                "protocols": [
                    {"tcp": {"destinationPort": {"number": 5432}}},
                    {"udp": {"destinationPort": {"range": {"start": 1000, "end": 2000}}}},
                    {"destinationNamedPort": "metrics"},
                ],
            }
        ],
        egress=[
            rule(
                "Pass",
                [
                    {"pods": {"podSelector": {}}},
                    {"networks": ["10.0.0.0/8", "fd00::/8"]},
                    {"nodes": {"matchLabels": {"kubernetes.io/os": "linux"}}},
                    {"domainNames": ["*.example.com", "example.org."]},
                ],
            )
        ],
    )
    policy = parse_object(doc)
    assert isinstance(policy, ClusterNetworkPolicy)
    assert (policy.name, policy.tier, policy.priority) == ("guard", Tier.BASELINE, 0)
    assert policy.subject_pods is not None and policy.subject_namespaces is None
    ports = policy.ingress[0].ports
    assert (ports[0].protocol, ports[0].first, ports[0].last) == (Protocol.TCP, 5432, 5432)
    assert (ports[1].protocol, ports[1].first, ports[1].last) == (Protocol.UDP, 1000, 2000)
    assert ports[2].named_port == "metrics" and ports[2].protocol is None
    peers = policy.egress[0].peers
    assert peers[1].networks == (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8"))
    assert peers[2].nodes is not None and peers[3].domain_names == ("*.example.com", "example.org.")
    assert policy.egress[0].action is Action.PASS and policy.ingress[0].name == "from-a"


def test_a_node_keeps_its_labels_and_ip_addresses() -> None:
    node = parse_object(
        {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": "n1", "labels": {"zone": "a"}},
            "status": {
                "addresses": [
                    {"type": "InternalIP", "address": "10.1.0.5"},
                    {"type": "Hostname", "address": "n1"},
                    {"type": "ExternalIP", "address": "2001:db8::5"},
                ]
            },
        }
    )
    assert isinstance(node, Node)
    assert node.labels == {"zone": "a"}
    assert [str(a) for a in node.addresses] == ["10.1.0.5", "2001:db8::5"]


# --- rejections: one object, its name and the field path -----------------------------------------

NAMESPACES: dict[str, Any] = {"namespaces": {}}
BAD: list[tuple[str, dict[str, Any], str]] = [
    ("no tier", cnp(tier=None), "spec.tier"),
    ("unknown tier", cnp(tier="Platform"), "spec.tier"),
    ("no priority", cnp(priority=None), "spec.priority"),
    ("priority above 1000", cnp(priority=1001), "spec.priority"),
    ("negative priority", cnp(priority=-1), "spec.priority"),
    ("priority not a number", cnp(priority="high"), "spec.priority"),
    ("no subject", cnp(subject=None), "spec.subject"),
    ("empty subject", cnp(subject={}), "spec.subject"),
    ("two subjects", cnp(subject={"namespaces": {}, "pods": {"podSelector": {}}}), "spec.subject"),
    ("unknown subject", cnp(subject={"services": {}}), "spec.subject"),
    (
        "pods subject without podSelector",
        cnp(subject={"pods": {"namespaceSelector": {}}}),
        "spec.subject.pods.podSelector",
    ),
    (
        "bad selector operator",
        cnp(subject={"namespaces": {"matchExpressions": [{"key": "a", "operator": "Near"}]}}),
        "spec.subject.namespaces.matchExpressions[0].operator",
    ),
    ("26 rules", cnp(egress=[rule()] * 26), "spec.egress"),
    ("no action", egress({"to": [NAMESPACES]}), "spec.egress[0].action"),
    ("unknown action", egress(rule("Allow")), "spec.egress[0].action"),
    ("no peers", egress(rule(to=[])), "spec.egress[0].to"),
    ("26 peers", egress(rule(to=[NAMESPACES] * 26)), "spec.egress[0].to"),
    ("empty peer", egress(rule(to=[{}])), "spec.egress[0].to[0]"),
    (
        "two kinds in one peer",
        egress(rule(to=[{"namespaces": {}, "networks": ["10.0.0.0/8"]}])),
        "spec.egress[0].to[0]",
    ),
    ("rule name of 101 characters", egress(rule(name="x" * 101)), "spec.egress[0].name"),
    ("invalid CIDR", egress(rule(to=[{"networks": ["10.0.0.0/33"]}])), "spec.egress[0].to[0].networks[0]"),
    (
        "CIDR of 44 characters",
        egress(rule(to=[{"networks": ["2001:0db8:0000:0000:0000:0000:0000:0000/0128"]}])),
        "spec.egress[0].to[0].networks[0]",
    ),
    (
        "duplicate CIDR",
        egress(rule(to=[{"networks": ["10.0.0.0/8", "10.0.0.0/8"]}])),
        "spec.egress[0].to[0].networks[1]",
    ),
    ("no CIDR", egress(rule(to=[{"networks": []}])), "spec.egress[0].to[0].networks"),
    (
        "26 CIDRs",
        egress(rule(to=[{"networks": [f"10.0.{i}.0/24" for i in range(26)]}])),
        "spec.egress[0].to[0].networks",
    ),
    (
        "bad domain name",
        egress(rule("Accept", [{"domainNames": ["*example.com"]}])),
        "spec.egress[0].to[0].domainNames[0]",
    ),
    ("empty protocols", egress(rule(protocols=[])), "spec.egress[0].protocols"),
    (
        "26 protocols",
        egress(rule(protocols=[{"destinationNamedPort": "web"}] * 26)),
        "spec.egress[0].protocols",
    ),
    ("empty protocols entry", egress(rule(protocols=[{}])), "spec.egress[0].protocols[0]"),
    (
        "two protocols in one entry",
        egress(
            rule(
                protocols=[
                    {"tcp": {"destinationPort": {"number": 1}}, "udp": {"destinationPort": {"number": 1}}}
                ]
            )
        ),
        "spec.egress[0].protocols[0]",
    ),
    ("tcp without destinationPort", egress(rule(protocols=[{"tcp": {}}])), "spec.egress[0].protocols[0].tcp"),
    (
        "tcp with a null destinationPort",
        egress(rule(protocols=[{"tcp": {"destinationPort": None}}])),
        "spec.egress[0].protocols[0].tcp",
    ),
    (
        "port 0",
        egress(rule(protocols=[{"tcp": {"destinationPort": {"number": 0}}}])),
        "spec.egress[0].protocols[0].tcp.destinationPort.number",
    ),
    (
        "port 65536",
        egress(rule(protocols=[{"sctp": {"destinationPort": {"number": 65536}}}])),
        "spec.egress[0].protocols[0].sctp.destinationPort.number",
    ),
    (
        "number and range",
        egress(
            rule(protocols=[{"udp": {"destinationPort": {"number": 1, "range": {"start": 1, "end": 2}}}}])
        ),
        "spec.egress[0].protocols[0].udp.destinationPort",
    ),
    (
        "range start = end",
        egress(rule(protocols=[{"tcp": {"destinationPort": {"range": {"start": 80, "end": 80}}}}])),
        "spec.egress[0].protocols[0].tcp.destinationPort.range",
    ),
    (
        "range without end",
        egress(rule(protocols=[{"tcp": {"destinationPort": {"range": {"start": 80}}}}])),
        "spec.egress[0].protocols[0].tcp.destinationPort.range.end",
    ),
    (
        "empty named port",
        egress(rule(protocols=[{"destinationNamedPort": ""}])),
        "spec.egress[0].protocols[0].destinationNamedPort",
    ),
    ("ingress without from", cnp(ingress=[{"action": "Deny"}]), "spec.ingress[0].from"),
    ("bad name", {**cnp(), "metadata": {"name": "Guard!"}}, "metadata.name"),
    ("wrong apiVersion", {**cnp(), "apiVersion": "policy.networking.k8s.io/v1alpha1"}, "apiVersion"),
]


@pytest.mark.parametrize(("doc", "field"), [(doc, f) for _, doc, f in BAD], ids=[n for n, _, _ in BAD])
def test_an_invalid_policy_is_rejected_alone_with_its_field(doc: dict[str, Any], field: str) -> None:
    doc = copy.deepcopy(doc)
    doc["spec"] = {k: v for k, v in doc["spec"].items() if v is not None}
    with pytest.raises(PolicyError) as raised:
        parse_object(doc)
    error = raised.value.error
    assert (error.kind, error.namespace, error.field) == ("ClusterNetworkPolicy", None, field), str(error)
    assert error.name == doc["metadata"]["name"] or field == "metadata.name"
    good = cnp()
    good["metadata"]["name"] = "other"
    result = load_text(yaml.safe_dump_all([doc, good]))
    assert [type(o).__name__ for o in result.objects] == ["ClusterNetworkPolicy"]
    assert len(result.errors) == 1
    assert str(result.errors[0]).startswith("ClusterNetworkPolicy ")


# --- a newer CRD: fail closed, never rejected ----------------------------------------------------


def test_a_peer_of_a_newer_crd_is_kept_as_unknown() -> None:
    policy = parse_object(egress(rule(to=[{"services": [{"name": "dns"}]}])))
    assert isinstance(policy, ClusterNetworkPolicy)
    assert policy.egress[0].peers[0].unknown


def test_an_ingress_peer_with_an_egress_only_field_is_unknown() -> None:
    policy = parse_object(cnp(ingress=[{"action": "Deny", "from": [{"networks": ["10.0.0.0/8"]}]}]))
    assert isinstance(policy, ClusterNetworkPolicy)
    assert policy.ingress[0].peers[0].unknown


def test_a_protocol_of_a_newer_crd_is_kept_as_unknown() -> None:
    policy = parse_object(
        egress(rule(protocols=[{"icmp": {"type": 8}}, {"tcp": {"sourcePort": {"number": 1}}}]))
    )
    assert isinstance(policy, ClusterNetworkPolicy)
    assert [p.unknown for p in policy.egress[0].ports] == [True, True]


def test_named_port_beside_networks_is_accepted_as_the_standard_crd_does() -> None:
    policy = parse_object(
        egress(rule(to=[{"networks": ["10.0.0.0/8"]}], protocols=[{"destinationNamedPort": "web"}]))
    )
    assert isinstance(policy, ClusterNetworkPolicy)


# --- random damage: an error or a policy, never a crash -----------------------------------------

_SCALARS: st.SearchStrategy[Any] = st.sampled_from(
    [
        None,
        True,
        0,
        -1,
        1,
        25,
        1000,
        1001,
        65536,
        1.5,
        "",
        "x",
        "Admin",
        "Deny",
        "Pass",
        "10.0.0.0/8",
        "web",
        "*.a.b",
        [],
        {},
        [{}],
        {"number": 80},
        {"range": {"start": 2, "end": 1}},
        {"namespaces": {}},
    ]
)
_VALUES = st.recursive(
    _SCALARS,
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(
            st.sampled_from(["namespaces", "pods", "networks", "tcp", "x", "podSelector"]),
            children,
            max_size=3,
        )
    ),
    max_leaves=12,
)


def _paths(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [path]
    if isinstance(value, dict):
        for key, child in value.items():
            found += _paths(child, (*path, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            found += _paths(child, (*path, index))
    return found


def _full_policy() -> dict[str, Any]:
    return cnp(
        subject={"pods": {"namespaceSelector": {"matchLabels": {"a": "b"}}, "podSelector": {}}},
        ingress=[
            {
                "name": "i",
                "action": "Accept",
                "from": [{"pods": {"podSelector": {}}}, NAMESPACES],
                "protocols": [
                    {"tcp": {"destinationPort": {"range": {"start": 1, "end": 9}}}},
                    {"destinationNamedPort": "web"},
                ],
            }
        ],
        egress=[
            rule(
                "Deny",
                [{"networks": ["10.0.0.0/8"]}, {"nodes": {}}, {"domainNames": ["a.b"]}],
                protocols=[{"udp": {"destinationPort": {"number": 53}}}],
            )
        ],
    )


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_a_damaged_policy_is_a_policy_or_a_named_error(data: st.DataObject) -> None:
    doc = copy.deepcopy(_full_policy())  # NAMESPACES and friends are shared module objects
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(_paths(doc["spec"])))
        value = copy.deepcopy(data.draw(_VALUES))  # sampled values are shared objects
        if not path:
            doc["spec"] = value
            continue
        parent = doc["spec"]
        for step in path[:-1]:
            parent = parent[step]
        parent[path[-1]] = value
    try:
        parsed = parse_object(doc)
    except PolicyError as exc:
        assert (exc.error.kind, exc.error.name) == ("ClusterNetworkPolicy", "guard")
        assert exc.error.field.startswith("spec") and str(exc.error)
    else:
        assert isinstance(parsed, ClusterNetworkPolicy)
