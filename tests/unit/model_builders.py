"""Builders of model objects for the policy and control tests: a selector from labels, a pod
from its addresses and labels (agent.model.objects, as the loader's parsed objects are)."""

from __future__ import annotations

import ipaddress

from agent.model.objects import ContainerPort, LabelSelector, Pod, labels_from_dict


def sel(**labels: str) -> LabelSelector:
    return LabelSelector(labels_from_dict(labels))


def pod(
    ns: str,
    name: str,
    *ips: str,
    node: str | None = "n1",
    ports: tuple[ContainerPort, ...] = (),
    host_network: bool = False,
    **labels: str,
) -> Pod:
    return Pod(
        ns,
        name,
        node,
        dict(labels),
        tuple(ipaddress.ip_address(ip) for ip in ips),
        ports,
        host_network=host_network,
    )
