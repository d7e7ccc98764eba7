"""Validation of single values, as the API server's syntax rules state them (no object context).

Names (RFC 1123 labels and subdomains), label keys and values, port names (IANA_SVC_NAME) and
CIDRs as Go's ParseCIDR reads them. Each `*_problem` function returns the reason a value is
invalid, or None; the field parser (agent.model.fields) turns a reason into an error that names
the object and the field.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Mapping

from agent.model.objects import IPNetwork

# apimachinery/pkg/util/validation: the syntaxes of names, label keys and values, port names.
_DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_QUALIFIED_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
_IANA_SVC_NAME = re.compile(r"[-a-z0-9]+")
_IPV4_WITH_LEADING_ZEROS = re.compile(r"[0-9]{1,3}(\.[0-9]{1,3}){3}")  # Go's ParseCIDRSloppy reads them
_V4_MAPPED_SPACE = ipaddress.IPv6Network("::ffff:0:0/96")
_CIDR_SYNTAX = re.compile(r"[0-9A-Fa-f:.]+/(0|[1-9][0-9]{0,2})")  # Go's ParseCIDR: address/prefix only


_DNS1123_LABEL_RULE = (
    "must be a lowercase RFC 1123 label (lowercase alphanumerics and '-', alphanumeric at both ends)"
)
_DNS1123_SUBDOMAIN_RULE = (
    "must be a lowercase RFC 1123 subdomain (lowercase alphanumerics, '-' and '.', alphanumeric at both ends)"
)
_QUALIFIED_NAME_RULE = (
    "must consist of alphanumerics, '-', '_' or '.', and start and end with an alphanumeric"
)
_LABEL_VALUE_RULE = (
    "must be empty or alphanumerics, '-', '_' or '.', starting and ending with an alphanumeric"
)


def _syntax_problem(value: str, limit: int, syntax: re.Pattern[str], rule: str) -> str | None:
    """The length check, then the syntax check, in the API server's order and wording."""
    if len(value) > limit:
        return f"must be no more than {limit} characters"
    if not syntax.fullmatch(value):
        return rule
    return None


def dns1123_label_problem(value: str) -> str | None:
    return _syntax_problem(value, 63, _DNS1123_LABEL, _DNS1123_LABEL_RULE)


def dns1123_subdomain_problem(value: str) -> str | None:
    return _syntax_problem(value, 253, _DNS1123_SUBDOMAIN, _DNS1123_SUBDOMAIN_RULE)


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
    if len(name) > 63:  # inline, not _syntax_problem: every label key of every object comes here
        return "name part must be no more than 63 characters"
    if not _QUALIFIED_NAME.fullmatch(name):
        return f"name part {_QUALIFIED_NAME_RULE}"
    return None


def label_value_problem(value: str) -> str | None:
    return _syntax_problem(value, 63, _LABEL_VALUE, _LABEL_VALUE_RULE)


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


def type_name(value: object) -> str:
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


@functools.lru_cache(maxsize=1 << 17)
def parse_cidr(text: str) -> IPNetwork:
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
