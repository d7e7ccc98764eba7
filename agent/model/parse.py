"""Object parsers: one API object (a dict) in, one validated model object out (`parse_object`).

One parser per kind podfence reads (Namespace, Pod, NetworkPolicy; ClusterNetworkPolicy and Node
through agent.model.cluster_policy_load), following the API server's validation and defaulting.
Kinds podfence does not read give None; an invalid object raises PolicyError.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from agent.model import cluster_policy_load
from agent.model.cluster_policy import CNP_API_VERSION
from agent.model.errors import ModelError, PolicyError
from agent.model.fields import Budget, FieldParser
from agent.model.objects import (
    MODE_ANNOTATION,
    MODE_AUDIT,
    MODE_ENFORCE,
    TERMINAL_PHASES,
    ContainerPort,
    IPAddress,
    IPBlock,
    IPNetwork,
    KubeObject,
    Namespace,
    NetworkPolicy,
    Peer,
    Pod,
    PolicyType,
    PortSpec,
    Rule,
)
from agent.model.validation import (
    dns1123_label_problem,
    dns1123_subdomain_problem,
    port_name_problem,
    type_name,
)

API_VERSIONS = {
    "Namespace": "v1",
    "Pod": "v1",
    "NetworkPolicy": "networking.k8s.io/v1",
    "ClusterNetworkPolicy": CNP_API_VERSION,
    "Node": "v1",
}
CLUSTER_SCOPED = frozenset({"Namespace", "ClusterNetworkPolicy", "Node"})


def _metadata_identity(doc: Mapping[Any, Any], kind: str) -> tuple[str | None, str | None]:
    """Best-effort (namespace, name) for naming an object in errors, before it is validated."""
    metadata = doc.get("metadata")
    if not isinstance(metadata, Mapping):
        return (None if kind in CLUSTER_SCOPED else "default"), None
    name = metadata.get("name")
    name = name if isinstance(name, str) and name else None
    if kind in CLUSTER_SCOPED:
        return None, name
    namespace = metadata.get("namespace")
    return (namespace if isinstance(namespace, str) and namespace else "default"), name


def _parse_metadata(
    p: FieldParser, doc: Mapping[Any, Any], namespaced: bool, name_problem: Any
) -> tuple[str, str, dict[str, str]]:
    metadata = p.mapping(doc.get("metadata"), "metadata", required=True)
    name = p.required_string(metadata.get("name"), "metadata.name")
    problem = name_problem(name)
    if problem:
        p.fail("metadata.name", f'"{name}": {problem}')
    namespace = ""
    if namespaced:
        namespace = p.string(metadata.get("namespace"), "metadata.namespace") or "default"
        problem = dns1123_label_problem(namespace)
        if problem:
            p.fail("metadata.namespace", f'"{namespace}": {problem}')
    labels = p.labels(metadata.get("labels"), "metadata.labels")
    return namespace, name, labels


def _parse_mode(p: FieldParser, doc: Mapping[Any, Any]) -> bool:
    """Is the policy in audit mode (`podfence.io/mode: audit`)? Absent or `enforce`: enforced. Any
    other value rejects the object: a typo must not silently enforce what was meant as a trial
    (or leave in audit what was meant to be enforced)."""
    metadata = p.mapping(doc.get("metadata"), "metadata")
    path = f"metadata.annotations[{MODE_ANNOTATION}]"
    annotations = p.mapping(metadata.get("annotations"), "metadata.annotations")
    mode = p.string(annotations.get(MODE_ANNOTATION), path)
    if mode is None or mode == MODE_ENFORCE:
        return False
    if mode != MODE_AUDIT:
        p.fail(path, f'Unsupported value: "{mode}": supported values: "{MODE_AUDIT}", "{MODE_ENFORCE}"')
    return True


def _parse_namespace(p: FieldParser, doc: Mapping[Any, Any]) -> Namespace:
    _, name, labels = _parse_metadata(p, doc, namespaced=False, name_problem=dns1123_label_problem)
    return Namespace(name=name, labels=labels)


def _parse_pod(p: FieldParser, doc: Mapping[Any, Any]) -> Pod:
    namespace, name, labels = _parse_metadata(p, doc, namespaced=True, name_problem=dns1123_subdomain_problem)
    spec = p.mapping(doc.get("spec"), "spec")
    node_name = p.string(spec.get("nodeName"), "spec.nodeName") or None
    if node_name:
        problem = dns1123_subdomain_problem(node_name)
        if problem:
            p.fail("spec.nodeName", f'"{node_name}": {problem}')
    host_network = p.boolean(spec.get("hostNetwork"), "spec.hostNetwork")
    # Only regular containers' ports can be named by a policy; init containers' are ignored.
    ports: list[ContainerPort] = []
    for i, container in enumerate(p.sequence(spec.get("containers"), "spec.containers")):
        container_path = f"spec.containers[{i}]"
        raw_container = p.mapping(container, container_path)
        names_seen: set[str] = set()
        for j, raw_port in enumerate(p.sequence(raw_container.get("ports"), f"{container_path}.ports")):
            port_path = f"{container_path}.ports[{j}]"
            port = p.mapping(raw_port, port_path)
            if port.get("containerPort") is None:
                p.fail(f"{port_path}.containerPort", "Required value")
            number = p.port_number(port.get("containerPort"), f"{port_path}.containerPort")
            protocol = p.protocol(port.get("protocol"), f"{port_path}.protocol")
            port_name = p.string(port.get("name"), f"{port_path}.name") or None
            if port_name is not None:
                problem = port_name_problem(port_name)
                if problem:
                    p.fail(f"{port_path}.name", f'"{port_name}": {problem}')
                if port_name in names_seen:
                    p.fail(f"{port_path}.name", f'Duplicate value: "{port_name}"')
                names_seen.add(port_name)
            ports.append(ContainerPort(port=number, protocol=protocol, name=port_name))
    status = p.mapping(doc.get("status"), "status")
    # Any other phase (Pending, Running, Unknown, one added later) is a pod that may hold its IPs.
    phase = p.string(status.get("phase"), "status.phase")
    ips: list[IPAddress] = []
    if status.get("podIP") not in (None, ""):
        ips.append(p.ip_address(status.get("podIP"), "status.podIP"))
    for i, entry in enumerate(p.sequence(status.get("podIPs"), "status.podIPs")):
        raw_ip = p.mapping(entry, f"status.podIPs[{i}]")
        ip = p.ip_address(raw_ip.get("ip"), f"status.podIPs[{i}].ip")
        if ip not in ips:  # podIPs[0] repeats podIP
            ips.append(ip)
    return Pod(
        namespace=namespace,
        name=name,
        node_name=node_name,
        labels=labels,
        ips=tuple(ips),
        ports=tuple(ports),
        host_network=host_network,
        terminated=phase in TERMINAL_PHASES,
        uid=p.string(p.mapping(doc.get("metadata"), "metadata").get("uid"), "metadata.uid") or "",
    )


def _parse_ip_block(p: FieldParser, value: object, path: str) -> IPBlock:
    raw = p.mapping(value, path)
    cidr = p.cidr(raw.get("cidr"), f"{path}.cidr")
    excepts: list[IPNetwork] = []
    for i, item in enumerate(p.sequence(raw.get("except"), f"{path}.except")):
        except_path = f"{path}.except[{i}]"
        carved = p.cidr(item, except_path)
        # A strict subset: same family, longer prefix, inside cidr.
        if carved.version != cidr.version or carved.prefixlen <= cidr.prefixlen or not carved.subnet_of(cidr):  # type: ignore[arg-type]
            p.fail(except_path, f'"{carved}": must be a strict subset of `cidr` "{cidr}"')
        excepts.append(carved)
    return IPBlock(cidr=cidr, excepts=tuple(excepts))


def _parse_peer(p: FieldParser, value: object, path: str) -> Peer:
    raw = p.mapping(value, path)
    pod_selector = raw.get("podSelector")
    namespace_selector = raw.get("namespaceSelector")
    ip_block = raw.get("ipBlock")
    given = sum(part is not None for part in (pod_selector, namespace_selector, ip_block))
    if given == 0:
        p.fail(path, "Required value: must specify a peer")
    if ip_block is not None and given > 1:
        p.fail(path, "Forbidden: may not specify both ipBlock and another peer")
    if ip_block is not None:
        return Peer(ip_block=_parse_ip_block(p, ip_block, f"{path}.ipBlock"))
    return Peer(
        pod_selector=None if pod_selector is None else p.selector(pod_selector, f"{path}.podSelector"),
        namespace_selector=(
            None
            if namespace_selector is None
            else p.selector(namespace_selector, f"{path}.namespaceSelector")
        ),
    )


def _parse_policy_port(p: FieldParser, value: object, path: str) -> PortSpec:
    """networking/validation ValidateNetworkPolicyPort."""
    raw = p.mapping(value, path)
    protocol = p.protocol(raw.get("protocol"), f"{path}.protocol")
    port = raw.get("port")
    end_port = raw.get("endPort")
    end: int | None = None
    if port is None:
        if end_port is not None:
            p.fail(f"{path}.endPort", "may not be specified when `port` is not specified")
        return PortSpec(protocol=protocol)
    if isinstance(port, str):
        if end_port is not None:
            p.fail(f"{path}.endPort", "may not be specified when `port` is non-numeric")
        problem = port_name_problem(port)
        if problem:
            p.fail(f"{path}.port", f'"{port}": {problem}')
        return PortSpec(protocol=protocol, port=port)
    if isinstance(port, bool) or not isinstance(port, int):
        p.fail(f"{path}.port", f"must be an integer or a port name, not a {type_name(port)}")
    number = p.port_number(port, f"{path}.port")
    if end_port is not None:
        end = p.integer(end_port, f"{path}.endPort")
        if end < number:
            p.fail(f"{path}.endPort", f"{end}: must be greater than or equal to `port` ({number})")
        if end > 65535:
            p.fail(f"{path}.endPort", f"{end}: must be between 1 and 65535, inclusive")
    return PortSpec(protocol=protocol, port=number, end_port=end)


def _parse_rules(p: FieldParser, value: object, path: str, peers_field: str) -> tuple[Rule, ...]:
    rules: list[Rule] = []
    for i, raw_rule in enumerate(p.sequence(value, path)):
        rule_path = f"{path}[{i}]"
        rule = p.mapping(raw_rule, rule_path)
        ports = tuple(
            _parse_policy_port(p, item, f"{rule_path}.ports[{j}]")
            for j, item in enumerate(p.sequence(rule.get("ports"), f"{rule_path}.ports"))
        )
        peers = tuple(
            _parse_peer(p, item, f"{rule_path}.{peers_field}[{j}]")
            for j, item in enumerate(p.sequence(rule.get(peers_field), f"{rule_path}.{peers_field}"))
        )
        rules.append(Rule(peers=peers, ports=ports))
    return tuple(rules)


def _parse_network_policy(p: FieldParser, doc: Mapping[Any, Any]) -> NetworkPolicy:
    namespace, name, _ = _parse_metadata(p, doc, namespaced=True, name_problem=dns1123_subdomain_problem)
    spec = p.mapping(doc.get("spec"), "spec", required=True)
    if spec.get("podSelector") is None:
        p.fail("spec.podSelector", "Required value (use {} to select every pod in the namespace)")
    pod_selector = p.selector(spec.get("podSelector"), "spec.podSelector")
    ingress = _parse_rules(p, spec.get("ingress"), "spec.ingress", "from")
    egress = _parse_rules(p, spec.get("egress"), "spec.egress", "to")
    raw_types = p.sequence(spec.get("policyTypes"), "spec.policyTypes")
    if len(raw_types) > 2:
        p.fail("spec.policyTypes", "may not specify more than two policyTypes")
    policy_types: set[PolicyType] = set()
    for i, item in enumerate(raw_types):
        text = p.required_string(item, f"spec.policyTypes[{i}]")
        try:
            policy_types.add(PolicyType(text))
        except ValueError:
            p.fail(
                f"spec.policyTypes[{i}]",
                f'Unsupported value: "{text}": supported values: "Ingress", "Egress"',
            )
    if not raw_types:
        # SetDefaults_NetworkPolicy: Ingress always; Egress only when egress rules are present.
        policy_types = {PolicyType.INGRESS, PolicyType.EGRESS} if egress else {PolicyType.INGRESS}
    return NetworkPolicy(
        namespace=namespace,
        name=name,
        pod_selector=pod_selector,
        policy_types=frozenset(policy_types),
        ingress=ingress,
        egress=egress,
        audit=_parse_mode(p, doc),
    )


def _parse_cluster_network_policy(p: FieldParser, doc: Mapping[Any, Any]) -> KubeObject:
    _, name, _ = _parse_metadata(p, doc, namespaced=False, name_problem=dns1123_subdomain_problem)
    policy = cluster_policy_load.parse_cluster_network_policy(p, doc, name)
    return replace(policy, audit=_parse_mode(p, doc))


def _parse_node(p: FieldParser, doc: Mapping[Any, Any]) -> KubeObject:
    _, name, labels = _parse_metadata(p, doc, namespaced=False, name_problem=dns1123_subdomain_problem)
    return cluster_policy_load.parse_node(p, doc, name, labels)


_PARSERS: dict[str, Callable[[FieldParser, Mapping[Any, Any]], KubeObject]] = {
    "Namespace": _parse_namespace,
    "Pod": _parse_pod,
    "NetworkPolicy": _parse_network_policy,
    "ClusterNetworkPolicy": _parse_cluster_network_policy,  # agent.model.cluster_policy_load
    "Node": _parse_node,
}


def parse_object(
    doc: Mapping[Any, Any], source: str = "", _budget: Budget | None = None
) -> KubeObject | None:
    """One API object (as a dict) → a validated model object; None for kinds podfence ignores.

    Raises PolicyError for an invalid object of a kind podfence reads, or a document without a kind.
    `source` (a file name, say) is carried into the error.
    """
    if not isinstance(doc, Mapping):
        raise PolicyError(
            ModelError("", None, None, "", f"must be an object, not a {type_name(doc)}", source)
        )
    kind = doc.get("kind")
    if not isinstance(kind, str) or not kind:
        raise PolicyError(
            ModelError("", None, None, "kind", "Required value: a Kubernetes object needs a kind", source)
        )
    if kind not in _PARSERS:
        return None
    namespace, name = _metadata_identity(doc, kind)
    parser = FieldParser(kind, namespace, name, source, _budget or Budget())
    api_version = doc.get("apiVersion")
    if api_version is not None and api_version != API_VERSIONS[kind]:
        parser.fail(
            "apiVersion",
            f'unsupported apiVersion "{api_version}" for {kind} (podfence reads {API_VERSIONS[kind]})',
        )
    return _PARSERS[kind](parser, doc)
