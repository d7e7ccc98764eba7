"""The 24 upstream ClusterNetworkPolicy cases end to end on the node lab, on both dataplanes.

One lab per dataplane (routed CNI mode) holds the base topology's pods (tests/data/npa/cases.json)
spread over two nodes by ordinal as tests/cnp_conformance_model.py places them, each serving the
ports its containers listen on (TCP, UDP, and SCTP answered by raw sockets). The host-network
pods (centaur-<i>) serve in their node's own netns on the node's fabric IP, which the Node
objects give as their InternalIP: the probes to `nodeIP` reach them there. For each case, every
step's objects (Nodes, Namespaces, Pods, NetworkPolicies and ClusterNetworkPolicies, with the lab's
node names and pod IPs) are written into the control service's folder; the step waits until every
node applied the new version, then runs the step's pod-IP probes at once (agent.lab.prober). Like
upstream, a step whose probes disagree is probed again (up to 3 times, 1 s apart) before it fails.

Every probe runs, the 9 to `nodeIP` (nodes peers, experimental channel) included.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from agent.lab.cluster import PodfenceOnLab
from agent.lab.machine import LabError, teardown
from agent.lab.prober import Probe, run_probes
from agent.lab.topology import CniMode, Lab, PodSpec, ServerPort, node_name
from agent.lab.topology import Protocol as LabProtocol
from tests.cnp_conformance_model import Case, CnpCluster, cases, load_cases
from tests.cnp_conformance_model import Probe as CnpProbe
from tests.e2e.test_conformance import LAB_LOCK_WAIT_S, _missing_dataplane

CASES = cases()
PROBE_TIMEOUT = 0.6
ATTEMPTS = 3
LAB_NODES = (node_name(1), node_name(2))


def _lab_pods() -> list[PodSpec]:
    """The topology's pods, on the nodes the model places them."""
    specs = []
    for pod in load_cases()["topology"]["pods"]:
        ordinal = int(pod["name"].rsplit("-", 1)[1])
        ports = tuple(
            ServerPort(listen["port"], LabProtocol(listen["protocol"]))
            for container in pod["containers"]
            for listen in container["listens"]
        )
        specs.append(
            PodSpec(pod["namespace"], pod["name"], LAB_NODES[ordinal % 2], dict(pod["labels"]), ports,
                    host_network=pod["hostNetwork"])
        )
    return specs


class CnpLabRun:
    def __init__(self, lab: Lab, podfence: PodfenceOnLab) -> None:
        self.lab = lab
        self.podfence = podfence

    def cluster(self, case: Case) -> CnpCluster:
        return CnpCluster(
            case,
            pod_ips={key: pod.ip for key, pod in self.lab.pods.items()},
            node_names=LAB_NODES,
            node_ips=(self.lab.nodes[LAB_NODES[0]].fabric_ip, self.lab.nodes[LAB_NODES[1]].fabric_ip),
        )

    def write(self, cluster: CnpCluster) -> None:
        by_file: dict[str, list[dict[str, Any]]] = {"nodes.yaml": [], "namespaces.yaml": [], "pods.yaml": []}
        policies = []
        for obj in cluster.objects():
            kind = obj["kind"]
            if kind in ("Node", "Namespace", "Pod"):
                by_file[f"{kind.lower()}s.yaml"].append(obj)
            else:
                policies.append(obj)
        version = self.podfence.current_version()
        changed = [self.podfence.write_documents(name, docs) for name, docs in by_file.items()]
        if policies:
            changed.append(self.podfence.write_documents("policies.yaml", policies))
        else:
            changed.append(self.podfence.remove_file("policies.yaml"))
        if any(changed):
            self.podfence.wait_applied(after_version=version)

    def probe(self, probes: list[CnpProbe]) -> list[bool]:
        """Whether each probe was answered, all run at once."""
        runs = [
            Probe(p.source, self.lab.pods[p.source].netns, p.destination, self.lab.pods[p.destination].ip,
                  p.port, p.protocol)
            for p in probes
        ]  # fmt: skip
        answered = run_probes(runs, timeout=PROBE_TIMEOUT)
        return [answered[run] for run in runs]


@pytest.fixture(scope="module", params=["bpf", "iptables"])
def cnp_lab(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CnpLabRun]:
    dataplane = request.param
    missing = _missing_dataplane(dataplane)
    if missing:
        pytest.skip(missing)
    teardown(LAB_LOCK_WAIT_S)
    lab = Lab(node_count=2, mode=CniMode.ROUTED)
    work = tmp_path_factory.mktemp(f"cnp-{dataplane}")
    podfence = PodfenceOnLab(lab, dataplane, source_dir=work / "source", log_dir=work / "logs")
    try:
        lab.build(_lab_pods(), lock_wait_seconds=LAB_LOCK_WAIT_S)
        podfence.start()
        yield CnpLabRun(lab, podfence)
    finally:
        podfence.stop()
        teardown(LAB_LOCK_WAIT_S)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_cnp_case(cnp_lab: CnpLabRun, case: Case) -> None:
    cluster = cnp_lab.cluster(case)
    failures = []
    for step in case.steps:
        for change in step.changes:
            cluster.apply(change)
        try:
            cnp_lab.write(cluster)
        except LabError as err:
            pytest.fail(f"step {step.number}: podfence did not apply the step: {err}")
        probes = list(step.probes)  # to a host-network pod (nodeIP), lab.pods holds its node's IP
        wrong: list[str] = []
        for attempt in range(ATTEMPTS):
            observed = cnp_lab.probe(probes)
            wrong = [
                f"{p}: expected {'allow' if p.expect else 'deny'} ({p.why})"
                for p, passed in zip(probes, observed, strict=True)
                if passed != p.expect
            ]
            if not wrong:
                break
            if attempt + 1 < ATTEMPTS:
                time.sleep(1.0)
        if wrong:
            failures.append(f"step {step.number} ({step.subtest}): {wrong}")
    assert not failures, f"{case.id}\n" + "\n".join(failures)


def test_the_lab_places_host_network_pods_on_their_node_ip(cnp_lab: CnpLabRun) -> None:
    node_ip = [p for c in CASES for s in c.steps for p in s.probes if p.target == "nodeIP"]
    assert len(node_ip) == 9
    for probe in node_ip:
        pod = cnp_lab.lab.pods[probe.destination]
        assert pod.spec.host_network and pod.ip == cnp_lab.lab.nodes[pod.spec.node].fabric_ip, probe
