"""Workloads and Services from Kubernetes objects: who runs, with which labels, behind which Service.

A workload is a controller's pod template (Deployment, StatefulSet, DaemonSet, ReplicaSet, Job,
CronJob) or a bare Pod whose stable labels no controller already covers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from agent.derive.graph import Note, Workload, stable_labels
from agent.derive.inputs import InputError, mapping, meta, port_number, sequence, string_map
from agent.derive.render import workload_name
from agent.model.objects import ContainerPort, Protocol

CONTROLLERS = ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job")


@dataclass(frozen=True)
class ServicePort:
    port: int
    target: int | str
    protocol: Protocol
    name: str | None


@dataclass(frozen=True)
class Service:
    namespace: str
    name: str
    selector: tuple[tuple[str, str], ...] | None  # None: no selector (endpoints managed by hand)
    ports: tuple[ServicePort, ...]

    @property
    def fqdn(self) -> str:
        return f"{self.name}.{self.namespace}.svc.cluster.local"

    def selects(self, workload: Workload) -> bool:
        return (
            self.selector is not None
            and workload.namespace == self.namespace
            and all(dict(workload.labels).get(k) == v for k, v in self.selector)
        )

    def target_port(self, port: ServicePort, workload: Workload) -> int | None:
        """The pod port `port` reaches on `workload`; None when a named target is not there."""
        if isinstance(port.target, int):
            return port.target
        for container_port in workload.ports:
            if container_port.name == port.target and container_port.protocol is port.protocol:
                return container_port.port
        return None


def _protocol(value: object, where: str) -> Protocol:
    try:
        return Protocol(str(value) if value is not None else "TCP")
    except ValueError:
        raise InputError(f"{where}: unknown protocol {value!r}") from None


def _template(doc: dict[str, Any], kind: str, where: str) -> dict[str, Any]:
    spec = mapping(doc.get("spec"), f"{where}: spec")
    if kind == "CronJob":
        spec = mapping(mapping(spec.get("jobTemplate"), f"{where}: spec.jobTemplate").get("spec"), where)
    if kind == "Pod":
        return {"metadata": doc.get("metadata"), "spec": spec}
    return mapping(spec.get("template"), f"{where}: spec.template")


def _workload(doc: dict[str, Any], kind: str) -> tuple[Workload, dict[str, str]]:
    namespace, name = meta(doc, kind)
    where = f"{kind} {namespace}/{name}"
    template = _template(doc, kind, where)
    labels = string_map(mapping(template.get("metadata"), where).get("labels"), f"{where}: labels")
    pod_spec = mapping(template.get("spec"), f"{where}: pod spec")
    ports = []
    for i, container in enumerate(sequence(pod_spec.get("containers"), f"{where}: containers")):
        for j, port in enumerate(sequence(mapping(container, where).get("ports"), f"{where}: ports")):
            port = mapping(port, f"{where}: containers[{i}].ports[{j}]")
            number = port_number(
                port.get("containerPort"), f"{where}: containers[{i}].ports[{j}].containerPort"
            )
            ports.append(ContainerPort(number, _protocol(port.get("protocol"), where), port.get("name")))
    account = pod_spec.get("serviceAccountName") or pod_spec.get("serviceAccount") or "default"
    selected = stable_labels(labels)
    if not selected:
        raise InputError(f"{where}: the pods have no labels to select them by")
    fallback = name if kind != "Pod" else workload_name(labels, name)
    return Workload(namespace, selected, fallback, tuple(ports), str(account)), labels


def _host_network(doc: dict[str, Any], kind: str) -> bool:
    namespace, name = meta(doc, kind)
    template = _template(doc, kind, f"{kind} {namespace}/{name}")
    return mapping(template.get("spec"), kind).get("hostNetwork") is True


def read_workloads(
    documents: list[tuple[str, dict[str, Any]]], notes: list[Note]
) -> tuple[list[Workload], dict[str, dict[str, str]]]:
    """Workloads of the controllers first, then bare pods that no controller's labels cover."""
    workloads: list[Workload] = []
    samples: dict[str, dict[str, str]] = {}
    for kind in (*CONTROLLERS, "CronJob", "Pod"):
        for _, doc in documents:
            if doc.get("kind") != kind:
                continue
            if _host_network(doc, kind):
                notes.append(
                    Note(
                        kind,
                        "/".join(meta(doc, kind)),
                        "spec.hostNetwork",
                        "its pods share their "
                        "node's addresses: no policy selects them, no rule is derived for them",
                    )
                )
                continue
            workload, labels = _workload(doc, kind)
            if any(w.namespace == workload.namespace and w.labels == workload.labels for w in workloads):
                continue  # a replica of a controller already read, or a second ReplicaSet of one
            workloads.append(workload)
            samples[workload.key] = labels
    return workloads, samples


def read_services(documents: list[tuple[str, dict[str, Any]]]) -> list[Service]:
    services = []
    for _, doc in documents:
        if doc.get("kind") != "Service":
            continue
        namespace, name = meta(doc, "Service")
        where = f"Service {namespace}/{name}"
        spec = mapping(doc.get("spec"), f"{where}: spec")
        selector = spec.get("selector")
        ports = []
        for i, port in enumerate(sequence(spec.get("ports"), f"{where}: spec.ports")):
            port = mapping(port, f"{where}: spec.ports[{i}]")
            number = port_number(port.get("port"), f"{where}: spec.ports[{i}].port")
            target = port.get("targetPort", number)
            if not isinstance(target, str):
                target = port_number(target, f"{where}: spec.ports[{i}].targetPort")
            ports.append(
                ServicePort(number, target, _protocol(port.get("protocol"), where), port.get("name"))
            )
        parsed = tuple(sorted(string_map(selector, f"{where}: spec.selector").items())) if selector else None
        services.append(Service(namespace, name, parsed, tuple(ports)))
    return services
