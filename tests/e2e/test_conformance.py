"""The 48 upstream Netpol cases end to end on the node lab: control service, agents, real dataplane.

One lab per (dataplane, CNI mode) holds the 9 upstream pods spread over two nodes, each serving
80/81 on TCP, UDP and SCTP. For each case, every step's objects (from tests/conformance_model.py,
with the lab's node names and pod IPs) are written into the control service's folder; the step
waits until `podfence status --json` shows every node at the new version, then probes all 72
ordered pairs through the destination's Service ClusterIP, as upstream does. Like upstream's
`ValidateOrFail`, a mismatching table is probed again (here up to 3 times, 1 s apart) before the
step fails with the expected/observed/comparison tables.
"""

from __future__ import annotations

import copy
import importlib
import ipaddress
import time
from collections.abc import Iterator
from typing import Any

import pytest

from agent.lab.cluster import PodfenceOnLab
from agent.lab.machine import LabError, teardown
from agent.lab.prober import Endpoint, TruthTable, comparison, probe_table
from agent.lab.topology import CniMode, Lab, PodSpec
from tests.conformance_model import (
    ALL_PODS,
    OLD,
    Case,
    ConformanceCluster,
    load_cases,
    namespace_name,
    pod_ip,
)

CASES = load_cases()
PROBE_TIMEOUT = 0.6  # blocked probes dominate a step's time; replies here take < 10 ms
ATTEMPTS = 3
DATAPLANE_CLASSES = {
    "bpf": ("agent.dataplane.bpf", "BpfDataplane"),
    "iptables": ("agent.dataplane.iptables", "IptablesDataplane"),
}

# Another test session may be using the lab; wait for it (within pytest's 300 s per test).
LAB_LOCK_WAIT_S = 240.0


def _missing_dataplane(dataplane: str) -> str | None:
    module_name, class_name = DATAPLANE_CLASSES[dataplane]
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        return f"{module_name} cannot be imported: {err}"
    if not hasattr(module, class_name):
        return f"{module_name}.{class_name} does not exist yet (the {dataplane} dataplane has not landed)"
    return None


def _lab_pods() -> list[PodSpec]:
    """The model's 9 pods in their actual namespaces, alternating between the two nodes."""
    from agent.lab.scenarios import UPSTREAM_PORTS

    pods = []
    for index, model_pod in enumerate(ALL_PODS):
        base, name = model_pod.split("/")
        pods.append(
            PodSpec(namespace_name(base), name, f"node{index % 2 + 1}", {"pod": name}, UPSTREAM_PORTS)
        )
    return pods


class LabRun:
    """One lab with podfence running on it, and the translation from model objects to lab objects."""

    def __init__(self, lab: Lab, podfence: PodfenceOnLab) -> None:
        self.lab = lab
        self.podfence = podfence
        self.by_model = {
            model_pod: lab.pods[f"{namespace_name(model_pod.split('/')[0])}/{model_pod.split('/')[1]}"]
            for model_pod in ALL_PODS
        }
        # ipBlock peers name model pod IPs; the same pods have other IPs in the lab.
        self.ip_translation = {pod_ip(model_pod): pod.ip for model_pod, pod in self.by_model.items()}

    def _translate_cidr(self, cidr: str) -> str:
        network = ipaddress.ip_network(cidr, strict=False)
        host = str(network.network_address)
        if network.prefixlen == network.max_prefixlen and host in self.ip_translation:
            return f"{self.ip_translation[host]}/{network.prefixlen}"
        # Case 35/36's /4 around x/b: the lab's pod range must fall in the same /4 for the case to mean
        # the same thing; it does (10.240.0.0/16 and 10.244.0.0/16 are both in 0.0.0.0/4).
        return cidr

    def to_lab(self, obj: dict[str, Any]) -> dict[str, Any]:
        lab_obj = copy.deepcopy(obj)
        if obj["kind"] == "Pod":
            pod = self.by_model[f"{obj['metadata']['namespace'].split('-')[-1]}/{obj['metadata']['name']}"]
            lab_obj["spec"]["nodeName"] = pod.spec.node
            lab_obj["status"]["podIP"] = pod.ip
            lab_obj["status"]["podIPs"] = [{"ip": pod.ip}]
        if obj["kind"] == "NetworkPolicy":
            for direction, peers_key in (("ingress", "from"), ("egress", "to")):
                for rule in lab_obj["spec"].get(direction) or []:
                    for peer in rule.get(peers_key) or []:
                        block = peer.get("ipBlock")
                        if block:
                            block["cidr"] = self._translate_cidr(block["cidr"])
                            block["except"] = [self._translate_cidr(c) for c in block.get("except") or []]
        return lab_obj

    def write(self, cluster: ConformanceCluster) -> None:
        objects = [self.to_lab(obj) for obj in cluster.objects()]
        by_kind: dict[str, list[dict[str, Any]]] = {"Namespace": [], "Pod": [], "NetworkPolicy": []}
        for obj in objects:
            by_kind[obj["kind"]].append(obj)
        version = self.podfence.current_version()
        changed = [
            self.podfence.write_documents("namespaces.yaml", by_kind["Namespace"]),
            self.podfence.write_documents("pods.yaml", by_kind["Pod"]),
            self.podfence.write_documents("policies.yaml", by_kind["NetworkPolicy"])
            if by_kind["NetworkPolicy"]
            else self.podfence.remove_file("policies.yaml"),
        ]
        if any(changed):
            self.podfence.wait_applied(after_version=version)

    def probe(self, port: int, protocol: str) -> TruthTable:
        endpoints = [Endpoint(m, pod.netns, pod.service_ip) for m, pod in self.by_model.items()]
        return probe_table(endpoints, endpoints, port, protocol, timeout=PROBE_TIMEOUT)


@pytest.fixture(
    scope="module",
    params=[(dp, mode) for dp in ("bpf", "iptables") for mode in CniMode],
    ids=lambda p: f"{p[0]}-{p[1].value}",
)
def lab_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabRun]:
    dataplane, mode = request.param
    missing = _missing_dataplane(dataplane)
    if missing:
        pytest.skip(missing)
    teardown(LAB_LOCK_WAIT_S)
    lab = Lab(node_count=2, mode=mode)
    work = tmp_path_factory.mktemp(f"{dataplane}-{mode.value}")
    podfence = PodfenceOnLab(lab, dataplane, source_dir=work / "source", log_dir=work / "logs")
    try:
        lab.build(_lab_pods(), lock_wait_seconds=LAB_LOCK_WAIT_S)
        podfence.start()
        # The contract the steps rely on, checked once through the real command line.
        status = podfence.status_via_cli()
        assert status is not None and set(status["nodes"]) == set(lab.nodes), status
        yield LabRun(lab, podfence)
    finally:
        podfence.stop()
        teardown(LAB_LOCK_WAIT_S)


@pytest.mark.parametrize("case", CASES, ids=[f"case{c.id:02d}" for c in CASES])
def test_conformance_case(lab_run: LabRun, case: Case) -> None:
    cluster = ConformanceCluster(case, OLD)
    lab_run.write(cluster)  # a clean slate: no policies, original labels
    failures = []
    for step in case.steps:
        for action in step.actions:
            cluster.apply(action)
        try:
            lab_run.write(cluster)
        except LabError as err:
            pytest.fail(f"step {step.index + 1}: podfence did not apply the step: {err}")
        expected_cells = step.expected(ALL_PODS, OLD)
        expected = TruthTable.filled(list(ALL_PODS), list(ALL_PODS))
        expected.cells.update(expected_cells)
        for attempt in range(ATTEMPTS):
            observed = lab_run.probe(step.probe.port, step.probe.protocol)
            if not expected.differences(observed):
                break
            if attempt + 1 < ATTEMPTS:
                time.sleep(1.0)
        else:
            failures.append(
                f"step {step.index + 1} ({step.probe.protocol}/{step.probe.port}), "
                f"{len(expected.differences(observed))} cells differ:\n{comparison(expected, observed)}"
            )
    assert not failures, f"case {case.id} {case.it}\n" + "\n\n".join(failures)


def test_every_case_is_collected() -> None:
    """All 48 upstream cases run here; SCTP ones too (raw-socket probes), none is left out."""
    assert [c.id for c in CASES] == list(range(1, 49))
    assert {c.protocols[0] for c in CASES if c.id >= 46} == {"SCTP"}
