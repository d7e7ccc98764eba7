"""Loads Namespace, Pod, NetworkPolicy, ClusterNetworkPolicy and Node objects from YAML/JSON.

ClusterNetworkPolicy and Node are validated in agent.model.cluster_policy_load.

Input is what `kubectl get -o yaml|json` writes or what the API server returns: single objects,
multi-document YAML, `kind: List` and typed lists (`PodList`, ...). Validation follows the API
server (Kubernetes `pkg/apis/networking/validation`, `pkg/apis/core/validation` for the parts of a
Pod podfence reads, and apimachinery's label and selector validation), including its defaulting:
a missing port protocol is TCP, a NetworkPolicy without `policyTypes` gets `Ingress`, plus
`Egress` when it has egress rules, and a namespaced object without `metadata.namespace` is in
"default" (where `kubectl apply` without `-n` would put it).

Nothing here raises on bad input from `load_*`: each invalid object becomes one `ModelError`
(the first problem found, with the API-style field path), documents that cannot be parsed become
errors too, and every valid object is still returned. `parse_object` is the strict single-object
form used by sources that already hold a dict (it raises `PolicyError`).

Where this is stricter or looser than the API server, on purpose:
- a NetworkPolicy without `spec.podSelector` is rejected (the API server would decode it as `{}`,
  selecting every pod; in a hand-written file that is far more often a mistake than the intent);
- duplicate keys in YAML/JSON are rejected, as kubectl rejects them (PyYAML would keep the last);
- duplicate `policyTypes` entries are accepted, as the API server accepts them;
- IPv4 CIDRs with leading zeros (`010.0.0.0/8`) are read as decimal, as the API server's legacy
  CIDR parsing does, so a policy a cluster holds is never dropped here;
- fields podfence does not use are not validated, and a text holding only comments or
  whitespace is simply empty.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import yaml

from agent.model import cluster_policy_load
from agent.model.cluster_policy import CNP_API_VERSION
from agent.model.errors import ModelError, PolicyError
from agent.model.objects import (
    TERMINAL_PHASES,
    ContainerPort,
    IPAddress,
    IPBlock,
    IPNetwork,
    KubeObject,
    LabelSelector,
    Namespace,
    NetworkPolicy,
    Operator,
    Peer,
    Pod,
    PolicyType,
    PortSpec,
    Protocol,
    Requirement,
    Rule,
    labels_from_dict,
)

MAX_FILE_BYTES = 16 * 1024 * 1024
"""Larger inputs are refused whole: the API server caps objects near 1.5 MiB, so a bigger file is
a mistake (or an attack on the control service), and parsing it would stall every other update."""

MAX_ITEMS_PER_OBJECT = 200_000
MAX_ITEMS_PER_TEXT = 4_000_000
"""Bound the list entries (and objects) walked for one object and for one text. YAML aliases can
make a small text expand into billions of entries (the "billion laughs" attack), within one
object or by repeating one large object; these caps turn that into errors."""

MAX_LIST_DEPTH = 4  # a List inside a List is legal YAML but never what kubectl writes


class _NoDuplicateKeys:
    """Rejects duplicate mapping keys, as kubectl does: with PyYAML's default the last `ingress:`
    of a policy that has two would silently win."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        values = [key.value for key, _ in node.value if isinstance(key, yaml.ScalarNode)]
        if len(set(values)) != len(values):  # cheap test first; the exact one only on a collision
            seen: set[tuple[str, str]] = set()
            for key_node, _ in node.value:
                if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                    key = (key_node.tag, key_node.value)
                    if key in seen:
                        raise yaml.constructor.ConstructorError(
                            "while constructing a mapping",
                            node.start_mark,
                            f"found duplicate key {key_node.value!r}",
                            key_node.start_mark,
                        )
                    seen.add(key)
        return super().construct_mapping(node, deep=deep)  # type: ignore[misc,no-any-return]


class _PythonLoader(_NoDuplicateKeys, yaml.SafeLoader):
    pass


_FastLoader: type[Any] = _PythonLoader
if hasattr(yaml, "CSafeLoader"):

    class _CLoader(_NoDuplicateKeys, yaml.CSafeLoader):  # type: ignore[misc]
        pass

    _FastLoader = _CLoader

MAX_FAST_NESTING = 1000
"""libyaml's composer recurses on the C stack without a limit and crashes the whole process
(SIGSEGV) at a few ten thousand nesting levels; texts that might nest deeper than this go to the
pure-Python parser, which raises RecursionError instead."""


_FLOW_BRACKETS = re.compile(r"[\[\]{}]")
_LINE_INDICATORS = re.compile(r"^( *)(.*)$", re.MULTILINE)


def _nesting_upper_bound(text: str) -> int:
    """Cheap over-estimate of how deeply a YAML text nests: flow brackets (even inside quoted
    strings) plus, per line, the indentation and the block indicators `- ` and `? `."""
    flow = deepest_flow = 0
    for bracket in _FLOW_BRACKETS.finditer(text):
        if bracket.group() in "[{":
            flow += 1
            deepest_flow = max(deepest_flow, flow)
        elif flow:
            flow -= 1
    deepest_block = 0
    for line in _LINE_INDICATORS.finditer(text):
        indent, rest = line.groups()
        deepest_block = max(deepest_block, len(indent) + rest.count("- ") + rest.count("? "))
    return deepest_flow + deepest_block


API_VERSIONS = {
    "Namespace": "v1",
    "Pod": "v1",
    "NetworkPolicy": "networking.k8s.io/v1",
    "ClusterNetworkPolicy": CNP_API_VERSION,
    "Node": "v1",
}
CLUSTER_SCOPED = frozenset({"Namespace", "ClusterNetworkPolicy", "Node"})

# apimachinery/pkg/util/validation: the syntaxes of names, label keys and values, port names.
_DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_QUALIFIED_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
_IANA_SVC_NAME = re.compile(r"[-a-z0-9]+")
_IPV4_WITH_LEADING_ZEROS = re.compile(r"[0-9]{1,3}(\.[0-9]{1,3}){3}")  # Go's ParseCIDRSloppy reads them
_V4_MAPPED_SPACE = ipaddress.IPv6Network("::ffff:0:0/96")
_CIDR_SYNTAX = re.compile(r"[0-9A-Fa-f:.]+/(0|[1-9][0-9]{0,2})")  # Go's ParseCIDR: address/prefix only


def dns1123_label_problem(value: str) -> str | None:
    if len(value) > 63:
        return "must be no more than 63 characters"
    if not _DNS1123_LABEL.fullmatch(value):
        return (
            "must be a lowercase RFC 1123 label (lowercase alphanumerics and '-', alphanumeric at both ends)"
        )
    return None


def dns1123_subdomain_problem(value: str) -> str | None:
    if len(value) > 253:
        return "must be no more than 253 characters"
    if not _DNS1123_SUBDOMAIN.fullmatch(value):
        return (
            "must be a lowercase RFC 1123 subdomain (lowercase alphanumerics, '-' and '.', "
            "alphanumeric at both ends)"
        )
    return None


def label_key_problem(key: str) -> str | None:
    """A label key is a qualified name: an optional DNS subdomain prefix and '/', then a name."""
    prefix, slash, name = key.rpartition("/")
    if slash and ("/" in prefix or not prefix):
        return "a qualified name must have at most one '/' and a non-empty prefix before it"
    if slash:
        problem = dns1123_subdomain_problem(prefix)
        if problem:
            return f"prefix part {problem}"
    if not name:
        return "name part must be non-empty"
    if len(name) > 63:
        return "name part must be no more than 63 characters"
    if not _QUALIFIED_NAME.fullmatch(name):
        return (
            "name part must consist of alphanumerics, '-', '_' or '.', and start and end with an alphanumeric"
        )
    return None


def label_value_problem(value: str) -> str | None:
    if len(value) > 63:
        return "must be no more than 63 characters"
    if not _LABEL_VALUE.fullmatch(value):
        return "must be empty or alphanumerics, '-', '_' or '.', starting and ending with an alphanumeric"
    return None


def port_name_problem(name: str) -> str | None:
    """IANA_SVC_NAME (RFC 6335): what a named port must look like."""
    if len(name) > 15:
        return "must be no more than 15 characters"
    if not _IANA_SVC_NAME.fullmatch(name):
        return "must contain only lowercase alphanumerics and '-'"
    if not re.search(r"[a-z]", name):
        return "must contain at least one letter"
    if "--" in name:
        return "must not contain consecutive hyphens"
    if name.startswith("-") or name.endswith("-"):
        return "must not begin or end with a hyphen"
    return None


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list | tuple):
        return "list"
    if isinstance(value, Mapping):
        return "object"
    return type(value).__name__


@dataclass
class _Budget:
    """List entries one text may still make the parser walk (shared by all its objects)."""

    items_left: int = field(default_factory=lambda: MAX_ITEMS_PER_TEXT)


class _Parser:
    """Parses one object; every check that fails raises PolicyError naming this object."""

    def __init__(
        self, kind: str, namespace: str | None, name: str | None, source: str, budget: _Budget
    ) -> None:
        self.kind = kind
        self.namespace = namespace
        self.name = name
        self.source = source
        self._items_left = MAX_ITEMS_PER_OBJECT
        self._budget = budget

    def fail(self, path: str, message: str) -> NoReturn:
        raise PolicyError(ModelError(self.kind, self.namespace, self.name, path, message, self.source))

    # --- typed access: JSON types as the API server's decoder checks them ---------------------

    def mapping(self, value: object, path: str, required: bool = False) -> Mapping[Any, Any]:
        if value is None:
            if required:
                self.fail(path, "Required value")
            return {}
        if not isinstance(value, Mapping):
            self.fail(path, f"must be an object, not a {_type_name(value)}")
        return value

    def sequence(self, value: object, path: str) -> list[Any]:
        if value is None:
            return []
        if not isinstance(value, list | tuple):
            self.fail(path, f"must be a list, not a {_type_name(value)}")
        self._spend(len(value), path)
        return list(value)

    def _spend(self, entries: int, path: str) -> None:
        self._items_left -= entries
        self._budget.items_left -= entries
        if self._items_left < 0:
            self.fail(path, f"too many list entries in one object (limit {MAX_ITEMS_PER_OBJECT})")
        if self._budget.items_left < 0:
            self.fail(path, f"too many list entries in one input (limit {MAX_ITEMS_PER_TEXT})")

    def string(self, value: object, path: str) -> str | None:
        """An optional string: None when absent."""
        if value is None:
            return None
        if not isinstance(value, str):
            self.fail(path, f"must be a string, not a {_type_name(value)}")
        return value

    def required_string(self, value: object, path: str) -> str:
        text = self.string(value, path)
        if not text:
            self.fail(path, "Required value")
        return text

    def boolean(self, value: object, path: str) -> bool:
        if value is None:
            return False
        if not isinstance(value, bool):
            self.fail(path, f"must be a boolean, not a {_type_name(value)}")
        return value

    def integer(self, value: object, path: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(path, f"must be an integer, not a {_type_name(value)}")
        return value

    # --- shared pieces ------------------------------------------------------------------------

    def labels(self, value: object, path: str) -> dict[str, str]:
        labels: dict[str, str] = {}
        raw = self.mapping(value, path)
        self._spend(len(raw), path)  # a label map can be an alias, repeated like a list
        for key, label_value in raw.items():
            if not isinstance(key, str):
                self.fail(path, f"label key {key!r} must be a string")
            if label_value is None:
                label_value = ""  # `app:` with no value: Go's decoder reads JSON null as ""
            if not isinstance(label_value, str):
                self.fail(path, f"value of label {key!r} must be a string, not a {_type_name(label_value)}")
            problem = label_key_problem(key)
            if problem:
                self.fail(path, f"invalid label key {key!r}: {problem}")
            problem = label_value_problem(label_value)
            if problem:
                self.fail(path, f"invalid value {label_value!r} of label {key!r}: {problem}")
            labels[key] = label_value
        return labels

    def selector(self, value: object, path: str) -> LabelSelector:
        """metav1.LabelSelector, validated as apimachinery's ValidateLabelSelector does."""
        raw = self.mapping(value, path)
        match_labels = self.labels(raw.get("matchLabels"), f"{path}.matchLabels")
        requirements: list[Requirement] = []
        for i, expression in enumerate(
            self.sequence(raw.get("matchExpressions"), f"{path}.matchExpressions")
        ):
            expression_path = f"{path}.matchExpressions[{i}]"
            expr = self.mapping(expression, expression_path)
            key = self.required_string(expr.get("key"), f"{expression_path}.key")
            problem = label_key_problem(key)
            if problem:
                self.fail(f"{expression_path}.key", f"invalid label key {key!r}: {problem}")
            operator_text = self.required_string(expr.get("operator"), f"{expression_path}.operator")
            try:
                operator = Operator(operator_text)
            except ValueError:
                self.fail(
                    f"{expression_path}.operator",
                    f'Unsupported value: "{operator_text}": supported values: '
                    '"In", "NotIn", "Exists", "DoesNotExist"',
                )
            values_path = f"{expression_path}.values"
            values: list[str] = []
            for j, item in enumerate(self.sequence(expr.get("values"), values_path)):
                text = self.string(item, f"{values_path}[{j}]")
                if text is None:
                    self.fail(f"{values_path}[{j}]", "must be a string, not a null")
                problem = label_value_problem(text)
                if problem:
                    self.fail(f"{values_path}[{j}]", f"invalid label value {text!r}: {problem}")
                values.append(text)
            if operator in (Operator.IN, Operator.NOT_IN) and not values:
                self.fail(values_path, "must be specified when `operator` is 'In' or 'NotIn'")
            if operator in (Operator.EXISTS, Operator.DOES_NOT_EXIST) and values:
                self.fail(values_path, "may not be specified when `operator` is 'Exists' or 'DoesNotExist'")
            requirements.append(Requirement(key, operator, frozenset(values)))
        return LabelSelector(labels_from_dict(match_labels), tuple(requirements))

    def protocol(self, value: object, path: str) -> Protocol:
        text = self.string(value, path)
        if text is None:
            return Protocol.TCP  # the API server's default
        try:
            return Protocol(text)
        except ValueError:
            self.fail(path, f'Unsupported value: "{text}": supported values: "TCP", "UDP", "SCTP"')

    def port_number(self, value: object, path: str) -> int:
        number = self.integer(value, path)
        if not 1 <= number <= 65535:
            self.fail(path, f"{number}: must be between 1 and 65535, inclusive")
        return number

    def ip_address(self, value: object, path: str) -> IPAddress:
        text = self.required_string(value, path)
        try:
            if "%" in text:  # Python accepts IPv6 zone ids; Kubernetes does not
                raise ValueError(text)
            address = ipaddress.ip_address(text)
        except ValueError:
            self.fail(path, f'must be a valid IP address, not "{text}"')
        # ::ffff:10.0.0.5 is 10.0.0.5 to Go (To4) and so to the kubelet and every Go CNI
        return address.ipv4_mapped or address if isinstance(address, ipaddress.IPv6Address) else address

    def cidr(self, value: object, path: str) -> IPNetwork:
        text = self.required_string(value, path)
        try:
            return _parse_cidr(text)
        except ValueError:
            self.fail(path, f'invalid CIDR "{text}"')


@functools.lru_cache(maxsize=1 << 17)
def _parse_cidr(text: str) -> IPNetwork:
    """A CIDR as Go's ParseCIDR reads it. Cached: a 10,000-ipBlock file re-read after a one-line
    edit parses the same texts again (200 ms of its 450 ms load); networks are immutable."""
    if not _CIDR_SYNTAX.fullmatch(text):
        raise ValueError(text)
    address, _, prefix = text.partition("/")
    if _IPV4_WITH_LEADING_ZEROS.fullmatch(address):
        address = ".".join(str(int(octet)) for octet in address.split("."))
    # Host bits set (10.0.0.1/8) are accepted and masked, as the API server does.
    network = ipaddress.ip_network(f"{address}/{prefix}", strict=False)
    if network.version == 6 and network.subnet_of(_V4_MAPPED_SPACE):  # type: ignore[arg-type]
        # Go's net package (the API server, Go CNIs) reads ::ffff:10.0.0.0/104 as 10.0.0.0/8
        mapped = network.network_address.ipv4_mapped  # type: ignore[union-attr]
        assert mapped is not None
        return ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network


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
    p: _Parser, doc: Mapping[Any, Any], namespaced: bool, name_problem: Any
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


def _parse_namespace(p: _Parser, doc: Mapping[Any, Any]) -> Namespace:
    _, name, labels = _parse_metadata(p, doc, namespaced=False, name_problem=dns1123_label_problem)
    return Namespace(name=name, labels=labels)


def _parse_pod(p: _Parser, doc: Mapping[Any, Any]) -> Pod:
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
    )


def _parse_ip_block(p: _Parser, value: object, path: str) -> IPBlock:
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


def _parse_peer(p: _Parser, value: object, path: str) -> Peer:
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


def _parse_policy_port(p: _Parser, value: object, path: str) -> PortSpec:
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
        p.fail(f"{path}.port", f"must be an integer or a port name, not a {_type_name(port)}")
    number = p.port_number(port, f"{path}.port")
    if end_port is not None:
        end = p.integer(end_port, f"{path}.endPort")
        if end < number:
            p.fail(f"{path}.endPort", f"{end}: must be greater than or equal to `port` ({number})")
        if end > 65535:
            p.fail(f"{path}.endPort", f"{end}: must be between 1 and 65535, inclusive")
    return PortSpec(protocol=protocol, port=number, end_port=end)


def _parse_rules(p: _Parser, value: object, path: str, peers_field: str) -> tuple[Rule, ...]:
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


def _parse_network_policy(p: _Parser, doc: Mapping[Any, Any]) -> NetworkPolicy:
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
    )


def _parse_cluster_network_policy(p: _Parser, doc: Mapping[Any, Any]) -> KubeObject:
    _, name, _ = _parse_metadata(p, doc, namespaced=False, name_problem=dns1123_subdomain_problem)
    return cluster_policy_load.parse_cluster_network_policy(p, doc, name)


def _parse_node(p: _Parser, doc: Mapping[Any, Any]) -> KubeObject:
    _, name, labels = _parse_metadata(p, doc, namespaced=False, name_problem=dns1123_subdomain_problem)
    return cluster_policy_load.parse_node(p, doc, name, labels)


_PARSERS: dict[str, Callable[[_Parser, Mapping[Any, Any]], KubeObject]] = {
    "Namespace": _parse_namespace,
    "Pod": _parse_pod,
    "NetworkPolicy": _parse_network_policy,
    "ClusterNetworkPolicy": _parse_cluster_network_policy,  # agent.model.cluster_policy_load
    "Node": _parse_node,
}


def parse_object(
    doc: Mapping[Any, Any], source: str = "", _budget: _Budget | None = None
) -> KubeObject | None:
    """One API object (as a dict) → a validated model object; None for kinds podfence ignores.

    Raises PolicyError for an invalid object of a kind podfence reads, or a document without a kind.
    `source` (a file name, say) is carried into the error.
    """
    if not isinstance(doc, Mapping):
        raise PolicyError(
            ModelError("", None, None, "", f"must be an object, not a {_type_name(doc)}", source)
        )
    kind = doc.get("kind")
    if not isinstance(kind, str) or not kind:
        raise PolicyError(
            ModelError("", None, None, "kind", "Required value: a Kubernetes object needs a kind", source)
        )
    if kind not in _PARSERS:
        return None
    namespace, name = _metadata_identity(doc, kind)
    parser = _Parser(kind, namespace, name, source, _budget or _Budget())
    api_version = doc.get("apiVersion")
    if api_version is not None and api_version != API_VERSIONS[kind]:
        parser.fail(
            "apiVersion",
            f'unsupported apiVersion "{api_version}" for {kind} (podfence reads {API_VERSIONS[kind]})',
        )
    return _PARSERS[kind](parser, doc)


@dataclass
class LoadResult:
    """The valid objects of some input, one error per rejected object or unreadable document, and
    how many objects of other kinds were skipped."""

    objects: list[KubeObject] = field(default_factory=list)
    errors: list[ModelError] = field(default_factory=list)
    ignored: int = 0

    @property
    def unreadable(self) -> list[ModelError]:
        """Errors about the input itself (syntax, size, shape) rather than about a named object."""
        return [error for error in self.errors if not error.kind]

    def extend(self, other: LoadResult) -> None:
        self.objects.extend(other.objects)
        self.errors.extend(other.errors)
        self.ignored += other.ignored


def _input_error(source: str, where: str, message: str) -> ModelError:
    return ModelError("", None, None, where, message, source)


def _within(where: str, path: str) -> str:
    """Where in the input: a document/list position, then a field path inside it."""
    return f"{where}: {path}" if where and path else where or path


def _add_document(
    result: LoadResult, doc: object, source: str, where: str, budget: _Budget, depth: int = 0
) -> None:
    if doc is None:
        return  # an empty document, e.g. after a trailing '---'
    if not isinstance(doc, Mapping):
        result.errors.append(
            _input_error(source, where, f"a document must be an object, not a {_type_name(doc)}")
        )
        return
    kind = doc.get("kind")
    if isinstance(kind, str) and kind.endswith("List") and "items" in doc:
        items = doc.get("items")
        if items is None:
            return
        if not isinstance(items, list):
            result.errors.append(
                _input_error(source, _within(where, "items"), f"must be a list, not a {_type_name(items)}")
            )
            return
        if depth >= MAX_LIST_DEPTH:
            result.errors.append(_input_error(source, _within(where, "items"), "lists nested too deeply"))
            return
        # Typed lists (PodList) from the API may leave kind/apiVersion off their items.
        item_kind = kind[: -len("List")] if kind != "List" else None
        budget.items_left -= len(items)
        if budget.items_left < 0:
            result.errors.append(
                _input_error(source, _within(where, "items"), f"too many items (limit {MAX_ITEMS_PER_TEXT})")
            )
            return
        for i, item in enumerate(items):
            if item_kind and isinstance(item, Mapping) and "kind" not in item:
                item = {"kind": item_kind, **item}
            _add_document(result, item, source, _within(where, f"items[{i}]"), budget, depth + 1)
        return
    try:
        obj = parse_object(doc, source, budget)
    except PolicyError as exc:
        error = exc.error
        if not error.kind and where:
            error = ModelError("", None, None, _within(where, error.field), error.message, source)
        result.errors.append(error)
        return
    except RecursionError:
        result.errors.append(_input_error(source, where, "nested too deeply"))
        return
    if obj is None:
        result.ignored += 1
    else:
        result.objects.append(obj)


def _yaml_documents(text: str) -> Iterator[object]:
    loader = _FastLoader if _nesting_upper_bound(text) <= MAX_FAST_NESTING else _PythonLoader
    yield from yaml.load_all(text, Loader=loader)


_DOCUMENT_SEPARATOR = re.compile(r"^---(?=[ \t]|$)", re.MULTILINE)


def _split_documents(text: str) -> list[tuple[int, str]]:
    """(first line number, text) of each '---'-separated chunk, for recovering after a YAML error."""
    chunks: list[tuple[int, str]] = []
    start = 0
    for match in _DOCUMENT_SEPARATOR.finditer(text):
        chunks.append((text.count("\n", 0, start) + 1, text[start : match.start()]))
        start = match.start()
    chunks.append((text.count("\n", 0, start) + 1, text[start:]))
    return chunks


def _describe_yaml_error(exc: Exception, line_offset: int = 0) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    if mark is not None:
        return f"invalid YAML at line {mark.line + 1 + line_offset}, column {mark.column + 1}: {problem}"
    return f"invalid YAML: {problem}"


class _DuplicateKey(Exception):
    pass


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise _DuplicateKey(key)
        obj[key] = value
    return obj


def load_text(text: str, source: str = "<string>") -> LoadResult:
    """Every object of a YAML or JSON text; never raises for bad input."""
    result = LoadResult()
    if len(text) > MAX_FILE_BYTES or len(text.encode("utf-8", "surrogatepass")) > MAX_FILE_BYTES:
        result.errors.append(
            _input_error(source, "", f"larger than the {MAX_FILE_BYTES // (1024 * 1024)} MiB limit")
        )
        return result
    if "\x00" in text:
        result.errors.append(_input_error(source, "", "contains NUL bytes: not a YAML or JSON text"))
        return result
    budget = _Budget()
    stripped = text.lstrip()
    if stripped.startswith(("{", "[")):
        try:
            document = json.loads(text, object_pairs_hook=_json_object)
        except _DuplicateKey as exc:
            result.errors.append(_input_error(source, "", f"invalid JSON: duplicate key {exc.args[0]!r}"))
            return result
        except (ValueError, RecursionError):
            pass  # YAML flow style also starts with '{' or '['; let the YAML parser judge
        else:
            _add_document(result, document, source, "", budget)
            return result
    try:
        documents = list(_yaml_documents(text))
    except (yaml.YAMLError, ValueError, RecursionError, OverflowError) as exc:
        return _load_chunks(text, source, exc, budget)
    many = len(documents) > 1
    for index, document in enumerate(documents):
        _add_document(result, document, source, f"document {index + 1}" if many else "", budget)
    return result


def _load_chunks(text: str, source: str, first_error: Exception, budget: _Budget) -> LoadResult:
    """After a YAML error, parses each '---' chunk alone so one bad document loses only itself."""
    result = LoadResult()
    chunks = _split_documents(text)
    if len(chunks) == 1:
        result.errors.append(_input_error(source, "", _describe_yaml_error(first_error)))
        return result
    for index, (first_line, chunk) in enumerate(chunks):
        where = f"document {index + 1}"
        try:
            documents = list(_yaml_documents(chunk))
        except (yaml.YAMLError, ValueError, RecursionError, OverflowError) as exc:
            result.errors.append(_input_error(source, where, _describe_yaml_error(exc, first_line - 1)))
            continue
        for document in documents:
            _add_document(result, document, source, where, budget)
    return result


def load_file(path: str | Path) -> LoadResult:
    """Every object of one file; unreadable, oversized and non-UTF-8 files become errors."""
    path = Path(path)
    source = str(path)
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            return LoadResult(
                errors=[
                    _input_error(
                        source,
                        "",
                        f"{size} bytes: larger than the {MAX_FILE_BYTES // (1024 * 1024)} MiB limit",
                    )
                ]
            )
        data = path.read_bytes()
    except OSError as exc:
        return LoadResult(errors=[_input_error(source, "", f"cannot read: {exc.strerror or exc}")])
    try:
        text = data.decode("utf-8-sig")  # tolerate a BOM, as kubectl does
    except UnicodeDecodeError as exc:
        return LoadResult(errors=[_input_error(source, "", f"not UTF-8 text (byte {exc.start})")])
    return load_text(text, source)


SUFFIXES = (".yaml", ".yml", ".json")


def folder_files(path: str | Path) -> list[Path]:
    """The files load_folder reads: *.yaml, *.yml, *.json below `path`, sorted, hidden ones skipped."""
    root = Path(path)
    files = []
    for candidate in root.rglob("*"):
        relative = candidate.relative_to(root)
        if any(part.startswith(".") for part in relative.parts):
            continue  # editors' swap files, kubectl caches, ..data symlink farms of ConfigMap mounts
        if candidate.suffix.lower() in SUFFIXES and candidate.is_file():
            files.append(candidate)
    return sorted(files)


def load_folder(path: str | Path) -> LoadResult:
    """Every object of every YAML/JSON file below `path`, in sorted file order."""
    result = LoadResult()
    root = Path(path)
    if not root.is_dir():
        result.errors.append(_input_error(str(root), "", "not a directory"))
        return result
    for file in folder_files(root):
        result.extend(load_file(file))
    return result
