"""Typed field access for one object: JSON types checked as the API server's decoder checks them.

`FieldParser` reads one object's fields (strings, integers, lists, labels, selectors, protocols,
ports, IPs and CIDRs); every check that fails raises PolicyError naming the object and the field
path. It also bounds the list entries walked per object and per input (`Budget`), so YAML alias
bombs become errors. The object parsers (agent.model.parse, agent.model.cluster_policy_load) are
written on top of it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn

from agent.model.errors import ModelError, PolicyError
from agent.model.objects import (
    IPAddress,
    IPNetwork,
    LabelSelector,
    Operator,
    Protocol,
    Requirement,
    labels_from_dict,
)
from agent.model.validation import label_key_problem, label_value_problem, parse_cidr, type_name

MAX_ITEMS_PER_OBJECT = 200_000
MAX_ITEMS_PER_TEXT = 4_000_000
"""Bound the list entries (and objects) walked for one object and for one text. YAML aliases can
make a small text expand into billions of entries (the "billion laughs" attack), within one
object or by repeating one large object; these caps turn that into errors."""


@dataclass
class Budget:
    """List entries one text may still make the parser walk (shared by all its objects)."""

    items_left: int = field(default_factory=lambda: MAX_ITEMS_PER_TEXT)


class FieldParser:
    """Parses one object; every check that fails raises PolicyError naming this object."""

    def __init__(
        self, kind: str, namespace: str | None, name: str | None, source: str, budget: Budget
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
            self.fail(path, f"must be an object, not a {type_name(value)}")
        return value

    def sequence(self, value: object, path: str) -> list[Any]:
        if value is None:
            return []
        if not isinstance(value, list | tuple):
            self.fail(path, f"must be a list, not a {type_name(value)}")
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
            self.fail(path, f"must be a string, not a {type_name(value)}")
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
            self.fail(path, f"must be a boolean, not a {type_name(value)}")
        return value

    def integer(self, value: object, path: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(path, f"must be an integer, not a {type_name(value)}")
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
                self.fail(path, f"value of label {key!r} must be a string, not a {type_name(label_value)}")
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
            return parse_cidr(text)
        except ValueError:
            self.fail(path, f'invalid CIDR "{text}"')
