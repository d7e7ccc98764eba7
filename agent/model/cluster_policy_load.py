"""Validates ClusterNetworkPolicy and Node objects as the CRD and the API server do.

Called by agent.model.parse with its field parser (agent.model.fields: typed access, selectors,
CIDRs, the input's list budget) once the metadata is read, so a bad object is rejected alone,
named by kind/name and the API field path, exactly as a bad NetworkPolicy is.

The limits are those of the v1alpha2 CRD (tests/data/npa/SPEC.md, section 5): tier and action
enums, priority 0..1000, at most 25 rules per direction, 1..25 peers and protocols per rule,
1..25 unique CIDRs (each at most 43 characters) per `networks`, rule names of at most 100
characters, "exactly one field" objects, port ranges with start < end.

Never stricter than the CRD where that would drop a policy the cluster holds (a dropped Deny
opens traffic):
- the experimental CEL rule "no destinationNamedPort beside networks/nodes/domainNames peers" is
  not applied: the standard CRD admits such rules, and a named port only ever matches a pod;
- a peer or protocols entry that holds no field known here but some other field (a CRD newer
  than podfence) is kept as `unknown` and fails closed, as upstream asks: an Accept rule with it
  matches nothing more, a Deny or Pass rule matches everything;
- an empty entry (`{}`), or one with two known fields, is rejected: no CRD version admits it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from agent.model.cluster_policy import (
    Action,
    ClusterNetworkPolicy,
    ClusterPeer,
    ClusterPort,
    ClusterRule,
    NamespacedPods,
    Node,
    Tier,
)
from agent.model.objects import IPAddress, IPNetwork, LabelSelector, Protocol

if TYPE_CHECKING:
    from agent.model.fields import FieldParser

MAX_RULES = 25
MAX_PEERS = 25
MAX_PROTOCOLS = 25
MAX_NETWORKS = 25
MAX_DOMAIN_NAMES = 25
MAX_RULE_NAME = 100
MAX_CIDR_LENGTH = 43
PRIORITY_MIN, PRIORITY_MAX = 0, 1000

INGRESS_PEER_FIELDS = ("namespaces", "pods")
EGRESS_PEER_FIELDS = ("namespaces", "pods", "networks", "nodes", "domainNames")
_PROTOCOL_FIELDS = {"tcp": Protocol.TCP, "udp": Protocol.UDP, "sctp": Protocol.SCTP}
# The CRD's pattern, including its `A-z` (which also admits [\]^_` : upstream's typo, kept so a
# name the API server stores is never rejected here).
_DOMAIN_NAME = re.compile(
    r"(\*\.)?([a-zA-z0-9]([-a-zA-Z0-9_]*[a-zA-Z0-9])?\.)+[a-zA-z0-9]([-a-zA-Z0-9_]*[a-zA-Z0-9])?\.?"
)
_NODE_IP_TYPES = ("InternalIP", "ExternalIP")


def _enum_problem(text: str, allowed: tuple[str, ...]) -> str:
    supported = ", ".join(f'"{value}"' for value in allowed)
    return f'Unsupported value: "{text}": supported values: {supported}'


def _bounded(p: FieldParser, value: object, path: str, low: int, high: int, what: str) -> list[Any]:
    """A list of `low`..`high` entries (absent counts as zero entries)."""
    items = p.sequence(value, path)
    if len(items) < low:
        p.fail(path, f"Required value: must have at least {low} {what}")
    if len(items) > high:
        p.fail(path, f"Too many: {len(items)}: must have at most {high} {what}")
    return items


def _one_of(p: FieldParser, raw: Mapping[Any, Any], path: str, known: tuple[str, ...]) -> str | None:
    """The one known field set in `raw`; None when only unknown fields are set (fail closed)."""
    present = [name for name in known if raw.get(name) is not None]
    if len(present) > 1:
        p.fail(
            path,
            f"Invalid value: must specify exactly one of {', '.join(known)}, not {' and '.join(present)}",
        )
    if present:
        return present[0]
    if not any(value is not None for value in raw.values()):
        p.fail(path, f"Required value: must specify exactly one of {', '.join(known)}")
    return None


def _namespaced_pods(p: FieldParser, value: object, path: str) -> NamespacedPods:
    raw = p.mapping(value, path)
    if raw.get("podSelector") is None:
        p.fail(f"{path}.podSelector", "Required value (use {} to select every pod)")
    return NamespacedPods(
        namespace_selector=p.selector(raw.get("namespaceSelector"), f"{path}.namespaceSelector"),
        pod_selector=p.selector(raw.get("podSelector"), f"{path}.podSelector"),
    )


def _networks(p: FieldParser, value: object, path: str) -> tuple[IPNetwork, ...]:
    items = _bounded(p, value, path, 1, MAX_NETWORKS, "CIDRs")
    seen: set[str] = set()
    networks: list[IPNetwork] = []
    for i, item in enumerate(items):
        text = p.required_string(item, f"{path}[{i}]")
        if len(text) > MAX_CIDR_LENGTH:
            p.fail(f"{path}[{i}]", f"Too long: may not be more than {MAX_CIDR_LENGTH} characters")
        if text in seen:
            p.fail(f"{path}[{i}]", f'Duplicate value: "{text}"')
        seen.add(text)
        networks.append(p.cidr(text, f"{path}[{i}]"))
    return tuple(networks)


def _domain_names(p: FieldParser, value: object, path: str) -> tuple[str, ...]:
    items = _bounded(p, value, path, 1, MAX_DOMAIN_NAMES, "domain names")
    names: list[str] = []
    for i, item in enumerate(items):
        text = p.required_string(item, f"{path}[{i}]")
        if not _DOMAIN_NAME.fullmatch(text):
            p.fail(
                f"{path}[{i}]", f'Invalid value: "{text}": must be a DNS name, optionally starting with "*."'
            )
        if text in names:
            p.fail(f"{path}[{i}]", f'Duplicate value: "{text}"')
        names.append(text)
    return tuple(names)


def _peer(p: FieldParser, value: object, path: str, known: tuple[str, ...]) -> ClusterPeer:
    raw = p.mapping(value, path, required=True)
    kind = _one_of(p, raw, path, known)
    field_path = f"{path}.{kind}"
    if kind is None:
        return ClusterPeer(unknown=True)
    if kind == "namespaces":
        return ClusterPeer(namespaces=p.selector(raw[kind], field_path))
    if kind == "pods":
        return ClusterPeer(pods=_namespaced_pods(p, raw[kind], field_path))
    if kind == "networks":
        return ClusterPeer(networks=_networks(p, raw[kind], field_path))
    if kind == "nodes":
        return ClusterPeer(nodes=p.selector(raw[kind], field_path))
    return ClusterPeer(domain_names=_domain_names(p, raw[kind], field_path))


def _port_number(p: FieldParser, value: object, path: str) -> int:
    if value is None:
        p.fail(path, "Required value")
    return p.port_number(value, path)


def _protocol(p: FieldParser, value: object, path: str) -> ClusterPort:
    raw = p.mapping(value, path, required=True)
    kind = _one_of(p, raw, path, (*_PROTOCOL_FIELDS, "destinationNamedPort"))
    if kind is None:
        return ClusterPort(unknown=True)
    if kind == "destinationNamedPort":
        name = p.required_string(raw[kind], f"{path}.{kind}")
        return ClusterPort(named_port=name)
    protocol = _PROTOCOL_FIELDS[kind]
    proto_path = f"{path}.{kind}"
    proto = p.mapping(raw[kind], proto_path)
    if not any(v is not None for v in proto.values()):  # null fields are pruned, as by the API
        p.fail(proto_path, "Invalid value: must have at least 1 property (destinationPort)")
    if proto.get("destinationPort") is None:
        return ClusterPort(unknown=True)  # only fields of a newer CRD: fail closed
    port_path = f"{proto_path}.destinationPort"
    port = p.mapping(proto["destinationPort"], port_path)
    which = _one_of(p, port, port_path, ("number", "range"))
    if which is None:
        return ClusterPort(unknown=True)
    if which == "number":
        number = _port_number(p, port["number"], f"{port_path}.number")
        return ClusterPort(protocol=protocol, first=number, last=number)
    range_path = f"{port_path}.range"
    port_range = p.mapping(port["range"], range_path)
    start = _port_number(p, port_range.get("start"), f"{range_path}.start")
    end = _port_number(p, port_range.get("end"), f"{range_path}.end")
    if not start < end:
        p.fail(range_path, f"Invalid value: start {start}, end {end}: Start port must be less than End port")
    return ClusterPort(protocol=protocol, first=start, last=end)


def _rules(
    p: FieldParser, value: object, path: str, peers_field: str, known: tuple[str, ...]
) -> tuple[ClusterRule, ...]:
    rules: list[ClusterRule] = []
    for i, item in enumerate(_bounded(p, value, path, 0, MAX_RULES, "rules")):
        rule_path = f"{path}[{i}]"
        raw = p.mapping(item, rule_path, required=True)
        name = p.string(raw.get("name"), f"{rule_path}.name") or ""
        if len(name) > MAX_RULE_NAME:
            p.fail(f"{rule_path}.name", f"Too long: may not be more than {MAX_RULE_NAME} characters")
        action_text = p.required_string(raw.get("action"), f"{rule_path}.action")
        try:
            action = Action(action_text)
        except ValueError:
            p.fail(f"{rule_path}.action", _enum_problem(action_text, tuple(a.value for a in Action)))
        peers_path = f"{rule_path}.{peers_field}"
        peers = tuple(
            _peer(p, peer, f"{peers_path}[{j}]", known)
            for j, peer in enumerate(_bounded(p, raw.get(peers_field), peers_path, 1, MAX_PEERS, "peers"))
        )
        ports: tuple[ClusterPort, ...] = ()
        if raw.get("protocols") is not None:
            protocols_path = f"{rule_path}.protocols"
            ports = tuple(
                _protocol(p, entry, f"{protocols_path}[{j}]")
                for j, entry in enumerate(
                    _bounded(p, raw["protocols"], protocols_path, 1, MAX_PROTOCOLS, "protocols")
                )
            )
        rules.append(ClusterRule(action=action, peers=peers, ports=ports, name=name))
    return tuple(rules)


def parse_cluster_network_policy(p: FieldParser, doc: Mapping[Any, Any], name: str) -> ClusterNetworkPolicy:
    """The spec of a ClusterNetworkPolicy whose metadata (cluster-scoped `name`) is already read."""
    spec = p.mapping(doc.get("spec"), "spec", required=True)
    tier_text = p.required_string(spec.get("tier"), "spec.tier")
    try:
        tier = Tier(tier_text)
    except ValueError:
        p.fail("spec.tier", _enum_problem(tier_text, tuple(t.value for t in Tier)))
    if spec.get("priority") is None:
        p.fail("spec.priority", "Required value")
    priority = p.integer(spec.get("priority"), "spec.priority")
    if not PRIORITY_MIN <= priority <= PRIORITY_MAX:
        p.fail(
            "spec.priority",
            f"Invalid value: {priority}: must be between {PRIORITY_MIN} and {PRIORITY_MAX}, inclusive",
        )
    subject = p.mapping(spec.get("subject"), "spec.subject", required=True)
    kind = _one_of(p, subject, "spec.subject", ("namespaces", "pods"))
    if kind is None:
        # Unlike a peer there is no closed side to fall to: which pods would it isolate?
        p.fail(
            "spec.subject",
            f"Unsupported value: fields {sorted(map(str, subject))}: podfence reads namespaces or pods",
        )
    subject_namespaces: LabelSelector | None = None
    subject_pods: NamespacedPods | None = None
    if kind == "namespaces":
        subject_namespaces = p.selector(subject["namespaces"], "spec.subject.namespaces")
    else:
        subject_pods = _namespaced_pods(p, subject["pods"], "spec.subject.pods")
    return ClusterNetworkPolicy(
        name=name,
        tier=tier,
        priority=priority,
        subject_namespaces=subject_namespaces,
        subject_pods=subject_pods,
        ingress=_rules(p, spec.get("ingress"), "spec.ingress", "from", INGRESS_PEER_FIELDS),
        egress=_rules(p, spec.get("egress"), "spec.egress", "to", EGRESS_PEER_FIELDS),
    )


def parse_node(p: FieldParser, doc: Mapping[Any, Any], name: str, labels: dict[str, str]) -> Node:
    """A Node's labels and IP addresses (`status.addresses` of type InternalIP or ExternalIP)."""
    status = p.mapping(doc.get("status"), "status")
    addresses: list[IPAddress] = []
    for i, entry in enumerate(p.sequence(status.get("addresses"), "status.addresses")):
        raw = p.mapping(entry, f"status.addresses[{i}]")
        if p.string(raw.get("type"), f"status.addresses[{i}].type") not in _NODE_IP_TYPES:
            continue  # Hostname, InternalDNS, ExternalDNS: names, not addresses
        address = p.ip_address(raw.get("address"), f"status.addresses[{i}].address")
        if address not in addresses:
            addresses.append(address)
    return Node(name=name, labels=labels, addresses=tuple(addresses))
