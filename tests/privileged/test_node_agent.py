"""The real `podfence agent` process in a node netns, fed by a real `podfence control` over gRPC.

Topology (all namespaces named pfn-<id>-*): a node netns holding both processes (control on
127.0.0.1) and routed pods (a /32 route per pod via its host veth, like ptp/Calico). Each pod
runs a TCP listener; reachability is a TCP connect from one pod netns to another (a denied SYN
is dropped silently, so a deny shows as a timeout).
"""

from __future__ import annotations

import http.client
import json
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from pyroute2.netns import setns

from agent.dataplane.bpf import state_file
from agent.dataplane.xtables import IPTABLES
from agent.lab import wiring
from agent.lab.prober import Probe, forget_namespaces, run_probes
from tests.readme_tables import documented_metrics, exposition_problems

REPO = Path(__file__).resolve().parents[2]
PORT = 8080

LISTENER = textwrap.dedent(
    f"""
    import socket
    PORT = {PORT}
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", PORT)); s.listen(64)
    while True:
        c, _ = s.accept(); c.close()
    """
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Pod:
    name: str
    ip: str
    labels: dict[str, str]
    netns: str


class NodeLab:
    def __init__(self, tmp: Path, cni: str) -> None:
        self.cni = cni
        self.prefix = f"pfn-{uuid.uuid4().hex[:6]}"
        self.node = f"{self.prefix}-node"
        self.source = tmp / "source"
        self.source.mkdir()
        self.namespaces: list[str] = []
        self.processes: list[subprocess.Popen[bytes]] = []
        self.pods: dict[str, Pod] = {}
        self.logs = tmp
        self.pin_dir = Path(f"/sys/fs/bpf/{self.prefix}")

    def build(self) -> None:
        self._add_netns(self.node)
        wiring.sysctl(self.node, {"net.ipv4.ip_forward": 1})
        # An uplink with the node's address and default route, as on a real node; its peer is
        # in another netns too, so only the route and the address tell it from a pod's veth.
        outside = f"{self.prefix}-out"
        self._add_netns(outside)
        uplink = wiring.add_veth(self.node, "up0", outside)
        with wiring.ipr(self.node) as ipr:
            ipr.addr("add", index=uplink, address="192.168.77.2", prefixlen=24)
            ipr.route("add", dst="0.0.0.0/0", gateway="192.168.77.1")
        if self.cni == "bridged":
            wiring.add_bridge(self.node, "br0", "10.244.0.1/24")
            # Bridged traffic through iptables and conntrack, as the bridge CNI plugin sets it.
            wiring.sysctl(self.node, {"net.bridge.bridge-nf-call-iptables": 1})
        self._write(
            "namespace.yaml",
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "ns", "labels": {"name": "ns"}}},
        )

    def _add_netns(self, name: str) -> None:
        wiring.create(name)
        self.namespaces.append(name)

    def _write(self, filename: str, obj: dict) -> None:
        # JSON is YAML; write atomically so the control service never reads half a file.
        target = self.source / filename
        scratch = target.with_suffix(".tmp")
        scratch.write_text(json.dumps(obj))
        scratch.rename(target)

    def add_pod_interface(self, name: str, ip: str, labels: dict[str, str]) -> Pod:
        """What a CNI plugin does: netns, veth, address, route or bridge port; podfence is not told."""
        netns = f"{self.prefix}-{name}"
        self._add_netns(netns)
        if self.cni == "routed":  # ptp/Calico style
            wiring.wire_routed(self.node, netns, f"hv{name}", ip)
        else:  # bridge plugin / flannel style
            wiring.wire_bridged(self.node, netns, f"hv{name}", "br0", f"{ip}/24", gateway="10.244.0.1")
        self.processes.append(subprocess.Popen(wiring.argv_in(netns, [sys.executable, "-c", LISTENER])))
        pod = Pod(name, ip, labels, netns)
        self.pods[name] = pod
        return pod

    def publish_pod(self, pod: Pod) -> None:
        """What the API server does: the pod object (scheduled here, with its IP) appears."""
        self._write(
            f"pod-{pod.name}.yaml",
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": pod.name, "namespace": "ns", "labels": pod.labels},
                "spec": {"nodeName": "n1", "containers": [{"name": "c", "ports": [{"containerPort": PORT}]}]},
                "status": {"podIP": pod.ip, "podIPs": [{"ip": pod.ip}]},
            },
        )

    def publish_policy(self, name: str, spec: dict) -> None:
        self._write(
            f"policy-{name}.yaml",
            {
                "apiVersion": "networking.k8s.io/v1",
                "kind": "NetworkPolicy",
                "metadata": {"name": name, "namespace": "ns"},
                "spec": spec,
            },
        )

    def spawn(self, name: str, *argv: str) -> subprocess.Popen[bytes]:
        log = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 (lives as long as the process)
        process = subprocess.Popen(
            wiring.argv_in(self.node, [sys.executable, "-m", "agent.cli", *argv]),
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.processes.append(process)
        return process

    def log_text(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def connects(self, src: str, dst: str, timeout: float = 0.5) -> bool:
        # a TCP connect from a thread in the source pod's netns: no Python process per probe
        probe = Probe(src, self.pods[src].netns, dst, self.pods[dst].ip, PORT, "TCP")
        return run_probes([probe], timeout=timeout)[probe]

    def fetch(self, url: str) -> tuple[int, str]:
        """(status, body) of a GET from the node netns; status 0 while nothing answers."""

        def get() -> tuple[int, str]:
            setns(self.node, flags=0)  # this helper thread only; flags=0: never creates it
            try:
                with urllib.request.urlopen(url, timeout=3) as response:
                    return response.status, response.read().decode()
            except urllib.error.HTTPError as error:
                return error.code, ""
            except (OSError, http.client.HTTPException):
                return 0, ""

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="fetch") as pool:
            return pool.submit(get).result()

    def close(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        forget_namespaces()  # the prober's cached fds would keep the removed namespaces alive
        for name in reversed(self.namespaces):
            wiring.remove(name)
        shutil.rmtree(self.pin_dir, ignore_errors=True)
        # The bpf dataplane keeps its id bookkeeping beside the pins' lifetime, in /run.
        state_file.remove(Path(f"/run/podfence/{self.pin_dir.name}.bpf-state.json"))


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> float:
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)
    return time.monotonic() - started


@pytest.fixture(params=["routed", "bridged"])
def lab(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[NodeLab]:
    built = NodeLab(tmp_path, request.param)
    try:
        built.build()
        yield built
    finally:
        built.close()


@pytest.mark.parametrize("dataplane", ["iptables", "bpf"])
def test_new_pod_dropped_until_known_then_enforced(lab: NodeLab, dataplane: str, tmp_path: Path):
    if dataplane == "iptables" and not shutil.which("iptables-restore"):
        pytest.skip("iptables-restore not installed")
    if dataplane == "bpf":
        from agent.dataplane import bpf

        if not hasattr(bpf, "BpfDataplane"):
            pytest.skip("agent.dataplane.bpf.BpfDataplane not available in this tree")
    server = lab.add_pod_interface("server", "10.244.0.10", {"app": "server"})
    client = lab.add_pod_interface("client", "10.244.0.11", {"app": "client"})
    for pod in (server, client):
        lab.publish_pod(pod)
    lab.publish_policy(
        "server-from-client",
        {
            "podSelector": {"matchLabels": {"app": "server"}},
            "policyTypes": ["Ingress"],
            "ingress": [
                {
                    "from": [{"podSelector": {"matchLabels": {"app": "client"}}}],
                    "ports": [{"protocol": "TCP", "port": PORT}],
                }
            ],
        },
    )
    grpc_port, metrics_port, control_metrics_port = free_port(), free_port(), free_port()
    lab.spawn(
        "control",
        "control",
        "--source",
        str(lab.source),
        "--listen",
        f"127.0.0.1:{grpc_port}",
        "--insecure",
        "--metrics-listen",
        f"127.0.0.1:{control_metrics_port}",
    )
    agent = lab.spawn(
        "agent",
        "--log-format",
        "json",
        "agent",
        "--node",
        "n1",
        "--control",
        f"127.0.0.1:{grpc_port}",
        "--insecure",
        "--dataplane",
        dataplane,
        "--metrics-listen",
        f"127.0.0.1:{metrics_port}",
        "--pin-dir",
        str(lab.pin_dir),
        "--generation-file",
        str(lab.logs / "enforced-generation"),
    )
    metrics = f"http://127.0.0.1:{metrics_port}"
    try:

        def ready() -> bool:
            assert agent.poll() is None, f"the agent exited: {lab.log_text('agent')[-2000:]}"
            return lab.fetch(f"{metrics}/readyz")[0] == 200

        wait_for(ready, 60, "the agent to apply a version")
        assert wait_for(lambda: lab.connects("client", "server"), 10, "client -> server allowed") < 10

        # A pod interface appears before the API server tells anyone about the pod.
        newcomer = lab.add_pod_interface("newcomer", "10.244.0.12", {"app": "newcomer"})
        wait_for(
            lambda: "podfence_pod_interfaces 3.0" in lab.fetch(f"{metrics}/metrics")[1],
            10,
            "the agent to guard the new interface",
        )
        if lab.cni == "bridged" and dataplane == "iptables":
            # the interface is counted when it appears, before it joins the bridge; its guard then
            # moves to a physdev match, which the probe below must meet (the probe is quick)
            wait_for(
                lambda: "--physdev-in hvnewcomer" in wiring.run_in(lab.node, [IPTABLES[4], "-S"]).stdout,
                10,
                "the agent to guard the new interface as a bridge port",
            )
        assert not lab.connects("newcomer", "client"), "an unknown pod interface must be dropped"
        assert lab.connects("client", "server")

        # Once its pod is known: its own (non-isolated) traffic flows, the server's policy holds.
        lab.publish_pod(newcomer)
        wait_for(lambda: lab.connects("newcomer", "client"), 15, "the newcomer's endpoint to be programmed")
        assert not lab.connects("newcomer", "server"), "the server only admits the client"
        assert lab.connects("client", "server")

        # Every metric docs/metrics.md documents, exposed by the process it names (type, labels too).
        documented = documented_metrics()
        status, body = lab.fetch(f"{metrics}/metrics")
        assert status == 200
        assert exposition_problems(documented["agent"], body) == []
        control_metrics = f"http://127.0.0.1:{control_metrics_port}/metrics"
        # The ack of the newcomer's version may still be on its way.
        wait_for(
            lambda: 'podfence_control_node_lag_versions{node="n1"} 0.0' in lab.fetch(control_metrics)[1],
            10,
            "the control service to see node n1 in sync",
        )
        control_status, control_body = lab.fetch(control_metrics)
        assert control_status == 200
        # This control service reads a folder: the API server's freshness gauges are not its own.
        folder_source = [m for m in documented["control"] if not m.name.startswith("podfence_control_source_")
                         or m.name == "podfence_control_source_errors_total"]
        assert exposition_problems(folder_source, control_body) == []
        assert "podfence_control_connected_nodes 1.0" in control_body
        assert "podfence_sync_connected 1.0" in body
        assert "podfence_managed_endpoints 3.0" in body
        denied = [
            line
            for line in body.splitlines()
            if line.startswith("podfence_endpoint_packets_total")
            and 'namespace="ns"' in line and 'pod="server"' in line
            and 'verdict="denied"' in line
        ]
        assert denied and any(float(line.rsplit(" ", 1)[1]) > 0 for line in denied), denied

        # Root on the node removes a piece by hand: the agent puts it back (a tc notification or
        # the 5 s state check), counts it and tells `podfence status`.
        if dataplane == "bpf":
            wiring.run_in(lab.node, ["tc", "filter", "del", "dev", "hvserver", "egress"])
            kind = "tc_filter"
        else:
            wiring.run_in(lab.node, ["iptables-legacy", "-F", "PF-TO"])
            kind = "chain"
        repaired = f'podfence_state_repairs_total{{kind="{kind}"}} 1.0'
        wait_for(
            lambda: repaired in lab.fetch(f"{metrics}/metrics")[1],
            12,
            f"the agent to repair the removed {kind}",
        )
        assert not lab.connects("newcomer", "server") and lab.connects("client", "server")
        shown = subprocess.run(  # the control service listens on the lab node's loopback
            ["nsenter", f"--net=/run/netns/{lab.node}", "--", sys.executable, "-m", "agent.cli", "status",
             "--control", f"127.0.0.1:{grpc_port}", "--insecure", "--json"],
            cwd=REPO, capture_output=True, text=True, timeout=30, check=True,
        )
        node_view = json.loads(shown.stdout)["nodes"]["n1"]
        assert node_view["state_repairs"] >= 1 and node_view["last_repair"].startswith(f"{kind}: "), node_view
    finally:
        agent.send_signal(signal.SIGTERM)
        code = agent.wait(timeout=20)
        print(lab.log_text("agent")[-4000:])
    assert code == 0, lab.log_text("agent")[-2000:]
    assert "did not stop" not in lab.log_text("agent"), "every worker thread stops on SIGTERM"
    # Kernel enforcement outlives the agent process.
    assert not lab.connects("newcomer", "server")
    assert lab.connects("client", "server")
    # Denied flow records became structured log lines naming the pod and the reason (iptables:
    # from its NFLOG group, --nflog-group's default).
    records = [json.loads(line) for line in lab.log_text("agent").splitlines() if line.startswith("{")]
    flows = [r["flow"] for r in records if "flow" in r]
    assert any(
        f["pod"] == "ns/server"
        and f["reason"] == "policy"
        and f["src"] == newcomer.ip
        and f["dport"] == PORT
        for f in flows
    ), flows[-10:]
    if dataplane == "bpf":  # iptables logs no record of an unclaimed interface's drops
        assert any(f["pod"] == "<unknown endpoint>" and f["reason"] == "unknown_endpoint" for f in flows)


@pytest.mark.parametrize("lab", ["routed"], indirect=True)
def test_agent_kill_and_restart_keeps_enforcing(lab: NodeLab):
    from agent.dataplane import bpf

    if not hasattr(bpf, "BpfDataplane"):
        pytest.skip("agent.dataplane.bpf.BpfDataplane not available in this tree")
    pods = {
        name: lab.add_pod_interface(name, f"10.244.0.{20 + i}", {"app": name})
        for i, name in enumerate(("server", "client", "intruder"))
    }
    for pod in pods.values():
        lab.publish_pod(pod)
    lab.publish_policy(
        "server-from-client",
        {
            "podSelector": {"matchLabels": {"app": "server"}},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}]}],
        },
    )
    grpc_port = free_port()
    lab.spawn(
        "control", "control", "--source", str(lab.source), "--listen", f"127.0.0.1:{grpc_port}", "--insecure"
    )

    def start_agent(name: str) -> tuple[subprocess.Popen[bytes], str]:
        metrics_port = free_port()
        process = lab.spawn(
            name,
            "agent",
            "--node",
            "n1",
            "--control",
            f"127.0.0.1:{grpc_port}",
            "--insecure",
            "--metrics-listen",
            f"127.0.0.1:{metrics_port}",
            "--pin-dir",
            str(lab.pin_dir),
            "--generation-file",
            str(lab.logs / "enforced-generation"),
        )
        url = f"http://127.0.0.1:{metrics_port}"

        def ready() -> bool:
            assert process.poll() is None, lab.log_text(name)[-2000:]
            return lab.fetch(f"{url}/readyz")[0] == 200

        wait_for(ready, 60, f"{name} to apply a version")
        return process, url

    first, _ = start_agent("agent-1")
    wait_for(lambda: lab.connects("client", "server"), 10, "client -> server allowed")
    assert not lab.connects("intruder", "server")

    first.kill()  # SIGKILL: no clean-up of any kind
    first.wait(timeout=10)
    assert lab.connects("client", "server"), "allowed traffic must keep flowing without the agent"
    assert not lab.connects("intruder", "server"), "denied traffic must stay denied without the agent"

    second, url = start_agent("agent-2")
    assert lab.connects("client", "server")
    assert not lab.connects("intruder", "server")
    _, body = lab.fetch(f"{url}/metrics")
    assert "podfence_managed_endpoints 3.0" in body
    assert "podfence_apply_errors_total 0.0" in body
    second.send_signal(signal.SIGTERM)
    assert second.wait(timeout=20) == 0


@pytest.mark.parametrize("lab", ["routed"], indirect=True)
def test_agent_over_mutual_tls_only_as_its_own_node(lab: NodeLab, tmp_path: Path):
    if not shutil.which("iptables-restore"):
        pytest.skip("iptables-restore not installed")
    from tests.unit.control_helpers import TestCA

    ca = TestCA()
    files = {"ca.pem": ca.pem}
    server = ca.issue("podfence-control", server=True)
    files |= {"server.pem": server.cert, "server-key.pem": server.key}
    for node in ("n1", "n2"):
        issued = ca.issue(node)
        files |= {f"{node}.pem": issued.cert, f"{node}-key.pem": issued.key}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    pod = lab.add_pod_interface("server", "10.244.0.30", {"app": "server"})
    lab.publish_pod(pod)
    grpc_port = free_port()
    lab.spawn(
        "control",
        "control",
        "--source",
        str(lab.source),
        "--listen",
        f"127.0.0.1:{grpc_port}",
        "--tls-cert",
        str(tmp_path / "server.pem"),
        "--tls-key",
        str(tmp_path / "server-key.pem"),
        "--tls-ca",
        str(tmp_path / "ca.pem"),
    )

    def agent(name: str, certificate_of: str) -> tuple[subprocess.Popen[bytes], str]:
        metrics_port = free_port()
        process = lab.spawn(
            name,
            "agent",
            "--node",
            "n1",
            "--control",
            f"127.0.0.1:{grpc_port}",
            "--dataplane",
            "iptables",
            "--tls-cert",
            str(tmp_path / f"{certificate_of}.pem"),
            "--tls-key",
            str(tmp_path / f"{certificate_of}-key.pem"),
            "--tls-ca",
            str(tmp_path / "ca.pem"),
            "--metrics-listen",
            f"127.0.0.1:{metrics_port}",
        )
        return process, f"http://127.0.0.1:{metrics_port}"

    impostor, impostor_url = agent("agent-impostor", "n2")
    # wait for the refusal itself and a metrics server that answers: a fixed sleep was too short
    # for a loaded machine (status 0 = nothing listening yet)
    wait_for(lambda: "PERMISSION_DENIED" in lab.log_text("agent-impostor"), 30, "the impostor refused")
    wait_for(lambda: lab.fetch(f"{impostor_url}/readyz")[0] != 0, 30, "the impostor's metrics server")
    assert impostor.poll() is None
    assert lab.fetch(f"{impostor_url}/readyz")[0] == 503, "a node-n2 certificate must not get n1's policy"
    impostor.send_signal(signal.SIGTERM)
    assert impostor.wait(timeout=20) == 0
    assert "PERMISSION_DENIED" in lab.log_text("agent-impostor")

    genuine, genuine_url = agent("agent-n1", "n1")
    wait_for(lambda: lab.fetch(f"{genuine_url}/readyz")[0] == 200, 30, "n1's agent over mTLS")
    assert "podfence_managed_endpoints 1.0" in lab.fetch(f"{genuine_url}/metrics")[1]
    genuine.send_signal(signal.SIGTERM)
    assert genuine.wait(timeout=20) == 0
