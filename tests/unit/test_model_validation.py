"""Validation of single objects: a table of invalid objects, each rejected at the API server's field path.

Every row is one object the Kubernetes API server rejects (or, for type errors, cannot decode);
the loader must name its kind, namespace and name and the exact field. Rows are also fed through
`load_text` next to a valid policy to show that one bad object costs only itself.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml

from agent.model import PolicyError, load_text, parse_object
from agent.model.load import label_key_problem, label_value_problem, port_name_problem
from agent.model.objects import NetworkPolicy, Pod

NS = "team-a"


def policy(spec: Any = None, name: str = "np", **metadata: Any) -> dict[str, Any]:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": NS, **metadata},
        "spec": {"podSelector": {}} if spec is None else spec,
    }


def ingress_port(**port: Any) -> dict[str, Any]:
    return policy({"podSelector": {}, "ingress": [{"ports": [port]}]})


def ingress_peer(peer: Any) -> dict[str, Any]:
    return policy({"podSelector": {}, "ingress": [{"from": [peer]}]})


def egress_peer(peer: Any) -> dict[str, Any]:
    return policy({"podSelector": {}, "egress": [{"to": [{"podSelector": {}}, peer]}]})


def selector(selector_value: Any) -> dict[str, Any]:
    return policy({"podSelector": selector_value})


def pod(spec: Any = None, status: Any = None, name: str = "web-0", **metadata: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, **metadata},
        "spec": {"containers": [{"name": "app"}]} if spec is None else spec,
    }
    if status is not None:
        doc["status"] = status
    return doc


def container_port(**port: Any) -> dict[str, Any]:
    return pod({"containers": [{"name": "app", "ports": [port]}]})


def namespace(name: Any = "team-b", **metadata: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, **metadata}}


NP, POD, NAMESPACE = "NetworkPolicy", "Pod", "Namespace"

# (case id, document, expected kind, expected namespace, expected name, expected field path)
INVALID: list[tuple[str, dict[str, Any], str, str | None, str | None, str]] = [
    # --- ipBlock -------------------------------------------------------------------------------
    ("cidr-short", ingress_peer({"ipBlock": {"cidr": "10.0.0/8"}}), NP, NS, "np",
     "spec.ingress[0].from[0].ipBlock.cidr"),
    ("cidr-no-prefix", ingress_peer({"ipBlock": {"cidr": "10.0.0.0"}}), NP, NS, "np",
     "spec.ingress[0].from[0].ipBlock.cidr"),
    ("cidr-prefix-too-long", ingress_peer({"ipBlock": {"cidr": "10.0.0.0/33"}}), NP, NS, "np",
     "spec.ingress[0].from[0].ipBlock.cidr"),
    ("cidr-netmask-form", ingress_peer({"ipBlock": {"cidr": "10.0.0.0/255.0.0.0"}}), NP, NS, "np",
     "spec.ingress[0].from[0].ipBlock.cidr"),
    ("cidr-v6-prefix-too-long", ingress_peer({"ipBlock": {"cidr": "fd00::/129"}}), NP, NS, "np",
     "spec.ingress[0].from[0].ipBlock.cidr"),
    ("cidr-missing", ingress_peer({"ipBlock": {}}), NP, NS, "np", "spec.ingress[0].from[0].ipBlock.cidr"),
    ("cidr-not-string", ingress_peer({"ipBlock": {"cidr": 10}}), NP, NS, "np",
     "spec.ingress[0].from[0].ipBlock.cidr"),
    ("except-outside", ingress_peer({"ipBlock": {"cidr": "10.0.0.0/16", "except": ["10.1.0.0/24"]}}),
     NP, NS, "np", "spec.ingress[0].from[0].ipBlock.except[0]"),
    ("except-equal", ingress_peer({"ipBlock": {"cidr": "10.0.0.0/16", "except": ["10.0.0.0/16"]}}),
     NP, NS, "np", "spec.ingress[0].from[0].ipBlock.except[0]"),
    ("except-wider", ingress_peer({"ipBlock": {"cidr": "10.0.0.0/16", "except": ["10.0.0.0/8"]}}),
     NP, NS, "np", "spec.ingress[0].from[0].ipBlock.except[0]"),
    ("except-other-family",
     ingress_peer({"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.0.0.0/9", "fd00::/64"]}}),
     NP, NS, "np", "spec.ingress[0].from[0].ipBlock.except[1]"),
    ("except-invalid", egress_peer({"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1/16"]}}),
     NP, NS, "np", "spec.egress[0].to[1].ipBlock.except[0]"),
    ("except-not-list", ingress_peer({"ipBlock": {"cidr": "10.0.0.0/8", "except": "10.1.0.0/16"}}),
     NP, NS, "np", "spec.ingress[0].from[0].ipBlock.except"),
    # --- peers ---------------------------------------------------------------------------------
    ("peer-empty", ingress_peer({}), NP, NS, "np", "spec.ingress[0].from[0]"),
    ("peer-ipblock-and-pods", ingress_peer({"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}}),
     NP, NS, "np", "spec.ingress[0].from[0]"),
    ("peer-ipblock-and-namespaces",
     egress_peer({"ipBlock": {"cidr": "10.0.0.0/8"}, "namespaceSelector": {}}),
     NP, NS, "np", "spec.egress[0].to[1]"),
    ("peer-not-object", ingress_peer("everyone"), NP, NS, "np", "spec.ingress[0].from[0]"),
    ("from-not-list", policy({"podSelector": {}, "ingress": [{"from": {"podSelector": {}}}]}),
     NP, NS, "np", "spec.ingress[0].from"),
    ("ingress-not-list", policy({"podSelector": {}, "ingress": {"from": []}}), NP, NS, "np", "spec.ingress"),
    ("rule-not-object", policy({"podSelector": {}, "egress": ["all"]}), NP, NS, "np", "spec.egress[0]"),
    # --- ports ---------------------------------------------------------------------------------
    ("port-zero", ingress_port(port=0), NP, NS, "np", "spec.ingress[0].ports[0].port"),
    ("port-too-big", ingress_port(port=65536), NP, NS, "np", "spec.ingress[0].ports[0].port"),
    ("port-negative", ingress_port(port=-1), NP, NS, "np", "spec.ingress[0].ports[0].port"),
    ("port-float", ingress_port(port=80.5), NP, NS, "np", "spec.ingress[0].ports[0].port"),
    ("port-bool", ingress_port(port=True), NP, NS, "np", "spec.ingress[0].ports[0].port"),
    ("port-name-digits", ingress_port(port="8080"), NP, NS, "np", "spec.ingress[0].ports[0].port"),
    ("port-name-too-long", ingress_port(port="a-very-long-port-name"), NP, NS, "np",
     "spec.ingress[0].ports[0].port"),
    ("port-name-uppercase", ingress_port(port="HTTP"), NP, NS, "np", "spec.ingress[0].ports[0].port"),
    ("port-name-double-hyphen", ingress_port(port="web--http"), NP, NS, "np",
     "spec.ingress[0].ports[0].port"),
    ("port-name-leading-hyphen", ingress_port(port="-http"), NP, NS, "np", "spec.ingress[0].ports[0].port"),
    ("port-name-trailing-hyphen", ingress_port(port="http-"), NP, NS, "np", "spec.ingress[0].ports[0].port"),
    ("endport-below-port", ingress_port(port=90, endPort=80), NP, NS, "np",
     "spec.ingress[0].ports[0].endPort"),
    ("endport-too-big", ingress_port(port=80, endPort=70000), NP, NS, "np",
     "spec.ingress[0].ports[0].endPort"),
    ("endport-named-port", ingress_port(port="http", endPort=90), NP, NS, "np",
     "spec.ingress[0].ports[0].endPort"),
    ("endport-without-port", ingress_port(endPort=90), NP, NS, "np", "spec.ingress[0].ports[0].endPort"),
    ("endport-string", ingress_port(port=80, endPort="90"), NP, NS, "np", "spec.ingress[0].ports[0].endPort"),
    ("protocol-icmp", ingress_port(protocol="ICMP", port=80), NP, NS, "np",
     "spec.ingress[0].ports[0].protocol"),
    ("protocol-lowercase", ingress_port(protocol="tcp"), NP, NS, "np", "spec.ingress[0].ports[0].protocol"),
    ("protocol-number", ingress_port(protocol=6), NP, NS, "np", "spec.ingress[0].ports[0].protocol"),
    ("second-port-bad",
     policy({"podSelector": {}, "egress": [{"ports": [{"port": 53, "protocol": "UDP"}, {"port": 99999}]}]}),
     NP, NS, "np", "spec.egress[0].ports[1].port"),
    ("ports-not-list", policy({"podSelector": {}, "ingress": [{"ports": 80}]}), NP, NS, "np",
     "spec.ingress[0].ports"),
    # --- label selectors -----------------------------------------------------------------------
    ("operator-unknown", selector({"matchExpressions": [{"key": "app", "operator": "Equals",
     "values": ["a"]}]}),
     NP, NS, "np", "spec.podSelector.matchExpressions[0].operator"),
    ("operator-missing", selector({"matchExpressions": [{"key": "app", "values": ["a"]}]}),
     NP, NS, "np", "spec.podSelector.matchExpressions[0].operator"),
    ("in-without-values", selector({"matchExpressions": [{"key": "app", "operator": "In"}]}),
     NP, NS, "np", "spec.podSelector.matchExpressions[0].values"),
    ("notin-empty-values",
     selector({"matchExpressions": [{"key": "app", "operator": "NotIn", "values": []}]}),
     NP, NS, "np", "spec.podSelector.matchExpressions[0].values"),
    ("exists-with-values",
     selector({"matchExpressions": [{"key": "app", "operator": "Exists", "values": ["a"]}]}),
     NP, NS, "np", "spec.podSelector.matchExpressions[0].values"),
    ("doesnotexist-with-values",
     selector({"matchExpressions": [{"key": "a", "operator": "Exists"},
                                    {"key": "b", "operator": "DoesNotExist", "values": ["x"]}]}),
     NP, NS, "np", "spec.podSelector.matchExpressions[1].values"),
    ("expression-key-invalid",
     selector({"matchExpressions": [{"key": "bad key", "operator": "Exists"}]}),
     NP, NS, "np", "spec.podSelector.matchExpressions[0].key"),
    ("expression-key-missing", selector({"matchExpressions": [{"operator": "Exists"}]}),
     NP, NS, "np", "spec.podSelector.matchExpressions[0].key"),
    ("expression-value-invalid",
     selector({"matchExpressions": [{"key": "app", "operator": "In", "values": ["ok", "not ok"]}]}),
     NP, NS, "np", "spec.podSelector.matchExpressions[0].values[1]"),
    ("expression-value-number",
     selector({"matchExpressions": [{"key": "app", "operator": "In", "values": [1]}]}),
     NP, NS, "np", "spec.podSelector.matchExpressions[0].values[0]"),
    ("matchlabels-key-two-slashes", selector({"matchLabels": {"a/b/c": "x"}}), NP, NS, "np",
     "spec.podSelector.matchLabels"),
    ("matchlabels-value-too-long", selector({"matchLabels": {"app": "x" * 64}}), NP, NS, "np",
     "spec.podSelector.matchLabels"),
    ("matchlabels-value-number", selector({"matchLabels": {"version": 2}}), NP, NS, "np",
     "spec.podSelector.matchLabels"),
    ("matchlabels-not-object", selector({"matchLabels": ["app=a"]}), NP, NS, "np",
     "spec.podSelector.matchLabels"),
    ("peer-namespace-selector-bad",
     ingress_peer({"namespaceSelector": {"matchExpressions": [{"key": "t", "operator": "in"}]}}),
     NP, NS, "np", "spec.ingress[0].from[0].namespaceSelector.matchExpressions[0].operator"),
    ("peer-pod-selector-bad", egress_peer({"podSelector": {"matchLabels": {"-app": "a"}}}), NP, NS, "np",
     "spec.egress[0].to[1].podSelector.matchLabels"),
    # --- policy spec and metadata --------------------------------------------------------------
    ("pod-selector-missing", policy({"ingress": []}), NP, NS, "np", "spec.podSelector"),
    ("spec-missing", {**policy(), "spec": None}, NP, NS, "np", "spec"),
    ("spec-not-object", {**policy(), "spec": "deny-all"}, NP, NS, "np", "spec"),
    ("policy-type-unknown", policy({"podSelector": {}, "policyTypes": ["Ingress", "Outgress"]}), NP, NS, "np",
     "spec.policyTypes[1]"),
    ("policy-type-lowercase", policy({"podSelector": {}, "policyTypes": ["ingress"]}), NP, NS, "np",
     "spec.policyTypes[0]"),
    ("policy-types-three", policy({"podSelector": {}, "policyTypes": ["Ingress", "Egress", "Ingress"]}),
     NP, NS, "np", "spec.policyTypes"),
    ("policy-types-not-list", policy({"podSelector": {}, "policyTypes": "Ingress"}), NP, NS, "np",
     "spec.policyTypes"),
    ("policy-name-uppercase", policy(name="DenyAll"), NP, NS, "DenyAll", "metadata.name"),
    ("policy-name-missing", {**policy(), "metadata": {"namespace": NS}}, NP, NS, None, "metadata.name"),
    ("policy-namespace-invalid", policy(namespace="Team_A"), NP, "Team_A", "np", "metadata.namespace"),
    ("policy-label-invalid", policy(labels={"app": "a b"}), NP, NS, "np", "metadata.labels"),
    ("policy-metadata-not-object", {**policy(), "metadata": "np"}, NP, "default", None, "metadata"),
    ("policy-api-version", {**policy(), "apiVersion": "extensions/v1beta1"}, NP, NS, "np", "apiVersion"),
    # --- pods ----------------------------------------------------------------------------------
    ("pod-port-zero", container_port(containerPort=0), POD, NS, "web-0",
     "spec.containers[0].ports[0].containerPort"),
    ("pod-port-too-big", container_port(containerPort=70000), POD, NS, "web-0",
     "spec.containers[0].ports[0].containerPort"),
    ("pod-port-missing", container_port(name="http"), POD, NS, "web-0",
     "spec.containers[0].ports[0].containerPort"),
    ("pod-port-string", container_port(containerPort="80"), POD, NS, "web-0",
     "spec.containers[0].ports[0].containerPort"),
    ("pod-port-protocol", container_port(containerPort=80, protocol="HTTP"), POD, NS, "web-0",
     "spec.containers[0].ports[0].protocol"),
    ("pod-port-name-invalid", container_port(containerPort=80, name="http_port"), POD, NS, "web-0",
     "spec.containers[0].ports[0].name"),
    ("pod-port-name-duplicate",
     pod({"containers": [{"name": "a", "ports": [{"containerPort": 80, "name": "web"},
                                                 {"containerPort": 81, "name": "web"}]}]}),
     POD, NS, "web-0", "spec.containers[0].ports[1].name"),
    ("pod-containers-not-list", pod({"containers": {"name": "app"}}), POD, NS, "web-0", "spec.containers"),
    ("pod-node-name-invalid", pod({"nodeName": "Node_1", "containers": []}), POD, NS, "web-0",
     "spec.nodeName"),
    ("pod-host-network-string", pod({"hostNetwork": "yes", "containers": []}), POD, NS, "web-0",
     "spec.hostNetwork"),
    ("pod-ip-invalid", pod(status={"podIP": "10.0.0.300"}), POD, NS, "web-0", "status.podIP"),
    ("pod-ip-zone", pod(status={"podIP": "fe80::1%eth0"}), POD, NS, "web-0", "status.podIP"),
    ("pod-ips-invalid", pod(status={"podIP": "10.0.0.3", "podIPs": [{"ip": "10.0.0.3"}, {"ip": "fd00::g"}]}),
     POD, NS, "web-0", "status.podIPs[1].ip"),
    ("pod-ips-entry-string", pod(status={"podIPs": ["10.0.0.3"]}), POD, NS, "web-0", "status.podIPs[0]"),
    ("pod-labels-not-object", pod(labels=["app"]), POD, NS, "web-0", "metadata.labels"),
    ("pod-label-key-prefix-invalid", pod(labels={"Example.com/app": "a"}), POD, NS, "web-0",
     "metadata.labels"),
    ("pod-name-invalid", pod(name="web_0"), POD, NS, "web_0", "metadata.name"),
    # --- namespaces ----------------------------------------------------------------------------
    ("namespace-name-dots", namespace("team.b"), NAMESPACE, None, "team.b", "metadata.name"),
    ("namespace-name-too-long", namespace("n" * 64), NAMESPACE, None, "n" * 64, "metadata.name"),
    ("namespace-name-number", namespace(42), NAMESPACE, None, None, "metadata.name"),
    ("namespace-label-value-bool", namespace(labels={"prod": True}), NAMESPACE, None, "team-b",
     "metadata.labels"),
    ("namespace-metadata-missing", {"apiVersion": "v1", "kind": "Namespace"}, NAMESPACE, None, None,
     "metadata"),
]


def test_the_table_is_large_and_its_ids_unique() -> None:
    assert len(INVALID) >= 45
    ids = [row[0] for row in INVALID]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize(("doc", "kind", "namespace_name", "name", "field"),
                         [pytest.param(*row[1:], id=row[0]) for row in INVALID])
def test_invalid_object_is_rejected_at_its_field(
    doc: dict[str, Any], kind: str, namespace_name: str | None, name: str | None, field: str
) -> None:
    with pytest.raises(PolicyError) as caught:
        parse_object(copy.deepcopy(doc))
    error = caught.value.error
    identity = (error.kind, error.namespace, error.name, error.field)
    assert identity == (kind, namespace_name, name, field), str(error)
    assert error.message
    # The message names the object and the field, as users see it.
    assert str(error).startswith(f"{kind} ")
    assert f": {field}: " in str(error)


@pytest.mark.parametrize(("doc", "field"), [pytest.param(row[1], row[5], id=row[0]) for row in INVALID])
def test_one_invalid_object_costs_only_itself(doc: dict[str, Any], field: str) -> None:
    good = policy({"podSelector": {"matchLabels": {"app": "db"}}}, name="still-enforced")
    text = yaml.safe_dump_all([good, doc, namespace("after")])
    result = load_text(text, "mixed.yaml")
    assert [error.field for error in result.errors] == [field]
    assert result.errors[0].source == "mixed.yaml"
    assert sorted(obj.name for obj in result.objects) == ["after", "still-enforced"]


def test_error_message_shape() -> None:
    with pytest.raises(PolicyError) as caught:
        parse_object(ingress_peer({"ipBlock": {"cidr": "10.0.0/8"}}))
    expected = f'NetworkPolicy {NS}/np: spec.ingress[0].from[0].ipBlock.cidr: invalid CIDR "10.0.0/8"'
    assert str(caught.value) == expected


# --- edge cases that are valid (the API server accepts them) ----------------------------------


@pytest.mark.parametrize(
    "port",
    [{"port": 1}, {"port": 65535}, {"port": 80, "endPort": 80}, {"port": 1, "endPort": 65535},
     {"port": "http"}, {"port": "a"}, {"port": "x" * 15}, {"port": "h2c-9"}, {"protocol": "SCTP"}, {}],
)
def test_valid_ports(port: dict[str, Any]) -> None:
    assert isinstance(parse_object(ingress_port(**port)), NetworkPolicy)


@pytest.mark.parametrize(
    "block",
    [{"cidr": "0.0.0.0/0"}, {"cidr": "::/0", "except": ["fd00::/8"]}, {"cidr": "10.0.0.0/8", "except": []},
     {"cidr": "192.168.1.7/32"}, {"cidr": "10.0.0.0/8", "except": ["10.0.0.0/9", "10.200.1.5/32"]}],
)
def test_valid_ip_blocks(block: dict[str, Any]) -> None:
    assert isinstance(parse_object(ingress_peer({"ipBlock": block})), NetworkPolicy)


@pytest.mark.parametrize(
    "key",
    ["app", "app.kubernetes.io/name", "a", "A_b.c-D", "example.com/" + "x" * 63, "kubernetes.io/os"],
)
def test_valid_label_keys(key: str) -> None:
    assert label_key_problem(key) is None


@pytest.mark.parametrize("key", ["", "/app", "a/", "-a", "a-", "x" * 64, "Example.com/a", "a b", "a/b/c"])
def test_invalid_label_keys(key: str) -> None:
    assert label_key_problem(key) is not None


@pytest.mark.parametrize(
    ("value", "valid"),
    [("", True), ("a", True), ("v1.2_3-x", True), ("-a", False), ("a.", False), ("x" * 63, True),
     ("x" * 64, False), ("a/b", False)],
)
def test_label_values(value: str, valid: bool) -> None:
    assert (label_value_problem(value) is None) is valid


@pytest.mark.parametrize(
    ("name", "valid"),
    [("http", True), ("serve-80-tcp", True), ("80", False), ("a--b", False), ("x" * 16, False),
     ("UDP", False), ("dns_udp", False), ("1a", True)],
)
def test_port_names(name: str, valid: bool) -> None:
    assert (port_name_problem(name) is None) is valid


def test_duplicate_policy_types_are_accepted_like_the_api_server() -> None:
    parsed = parse_object(policy({"podSelector": {}, "policyTypes": ["Egress", "Egress"]}))
    assert isinstance(parsed, NetworkPolicy)
    assert {str(t) for t in parsed.policy_types} == {"Egress"}


def test_same_port_name_in_two_containers_is_accepted() -> None:
    containers = [{"name": "a", "ports": [{"containerPort": 80, "name": "web"}]},
                  {"name": "b", "ports": [{"containerPort": 81, "name": "web"}]}]
    parsed = parse_object(pod({"containers": containers}))
    assert isinstance(parsed, Pod)
    assert [p.port for p in parsed.ports] == [80, 81]


def test_document_without_kind_is_an_error_without_an_object() -> None:
    result = load_text("apiVersion: v1\nmetadata: {name: x}\n", "nokind.yaml")
    assert result.objects == []
    assert [(e.kind, e.field, e.source) for e in result.errors] == [("", "kind", "nokind.yaml")]
    assert str(result.errors[0]).startswith("nokind.yaml: kind: ")
