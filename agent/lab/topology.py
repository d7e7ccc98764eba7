"""The node lab: simulated Kubernetes nodes and pods built from network namespaces on one machine.

Each node is a netns (`pflab-<node>`) joined to the other nodes through a fabric bridge (its own
netns, `pflab-fabric`) and to the root netns through a management veth on a lab-only /30, which is
how agents inside a node reach the control service. Each pod is a netns with a veth to its node,
wired the way a CNI plugin would wire it:

* routed (ptp/Calico style): the pod owns a /32 and a default route via the link-local gateway
  169.254.1.1, which the host side of every pod veth answers for; the node routes each pod /32 to
  its veth.
* bridged (bridge/flannel style): host veths are ports of a per-node bridge `cni0` that holds the
  gateway address of the node's pod /24, with br_netfilter on so bridged replies see conntrack.

A dual-stack lab (`ipv6=True`) gives every pod, Service and node link an IPv6 address as well,
routed the same way (fe80::1 as the routed gateway, the bridge's address in bridged mode).

ClusterIP Services are DNAT rules in nat PREROUTING and OUTPUT of every node, as kube-proxy's
iptables mode writes them. Lab ranges are blackholed in the root netns and in every node (less
specific than the real routes), so a missing route drops lab traffic instead of sending it out.

Everything made here is recorded under /run/podfence-lab and removed by `teardown()`, which also
works from a fresh process after a crash because it finds leftovers by the `pflab-` prefix.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import ipaddress
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path

from pyroute2 import IPRoute, netns
from pyroute2.netlink.exceptions import NetlinkError

from agent.lab import wiring
from agent.lab.dns import service_name
from agent.lab.prober import forget_namespaces, send_hello_from

log = logging.getLogger(__name__)

LAB_PREFIX = "pflab-"
RUN_DIR = Path("/run/podfence-lab")
BPF_FS = Path("/sys/fs/bpf")
FABRIC_NETNS = LAB_PREFIX + "fabric"
LOCK_PATH = Path("/run/podfence-lab.lock")  # outside RUN_DIR, which teardown empties
DEFAULT_LOCK_WAIT_S = 10.0

# Lab-only address plan. 10.240.<node>.0/24 pods, 10.241.0.0/16 Services, 10.250.0.0/24 the
# node fabric, 10.251.<node>.0/30 the management links from the root netns.
POD_SUPERNET = ipaddress.IPv4Network("10.240.0.0/16")
SERVICE_SUPERNET = ipaddress.IPv4Network("10.241.0.0/16")
FABRIC_NET = ipaddress.IPv4Network("10.250.0.0/24")
MGMT_SUPERNET = ipaddress.IPv4Network("10.251.0.0/16")
# IPv6 (dual-stack labs): the same plan under fd00:10:240::/48 (pods, /64 per node),
# fd00:10:241::/48 (Services) and fd00:10:250::/64 (fabric); management stays IPv4.
POD6_SUPERNET = ipaddress.IPv6Network("fd00:10:240::/48")
SERVICE6_SUPERNET = ipaddress.IPv6Network("fd00:10:241::/48")
FABRIC6_NET = ipaddress.IPv6Network("fd00:10:250::/64")
BLACKHOLED_IN_ROOT = (POD_SUPERNET, SERVICE_SUPERNET, FABRIC_NET, MGMT_SUPERNET)
BLACKHOLED6_IN_ROOT = (POD6_SUPERNET, SERVICE6_SUPERNET, ipaddress.IPv6Network("fd00:10:250::/48"))
BLACKHOLED_IN_NODES = (POD_SUPERNET, SERVICE_SUPERNET)
BLACKHOLED6_IN_NODES = (POD6_SUPERNET, SERVICE6_SUPERNET)
# Blackholes lose to any real route of the same prefix length; the metric documents that intent.
BLACKHOLE_METRIC = 4000
# Routes the lab adds to the root netns carry this protocol number, so teardown finds exactly them.
LAB_ROUTE_PROTO = 0x9F
POD_HOST_OFFSET = 10  # first pod address in a node's /24 (.1 is the bridged gateway)
MAX_POD_HOST = 249  # .250 and up stay free: the demo's compromised pod moves to .250
POD_PORT_NAME = "serve-{port}-{proto}"  # container port names, as the upstream e2e pods have them


class CniMode(StrEnum):
    ROUTED = "routed"
    BRIDGED = "bridged"


class Protocol(StrEnum):
    TCP = "TCP"
    UDP = "UDP"
    SCTP = "SCTP"


class LabError(RuntimeError):
    """The lab could not be built or torn down; the message says which step failed."""


@dataclass(frozen=True)
class ServerPort:
    port: int
    protocol: Protocol = Protocol.TCP

    @property
    def name(self) -> str:
        return POD_PORT_NAME.format(port=self.port, proto=self.protocol.value.lower())


@dataclass(frozen=True)
class PodSpec:
    """What a scenario asks for: a pod, the node it runs on, its labels and the ports it serves."""

    namespace: str
    name: str
    node: str
    labels: dict[str, str] = field(default_factory=dict, hash=False)
    ports: tuple[ServerPort, ...] = ()
    # hostNetwork: no netns or veth of its own; it serves in its node's netns on the node's IP
    # (so no podfence endpoint: traffic to it is judged as traffic to the node)
    host_network: bool = False

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class LabPod:
    """A pod as built: its spec plus the addresses and names the lab chose for it."""

    spec: PodSpec
    ip: str
    service_ip: str
    netns: str
    host_ifname: str
    ip6: str | None = None  # set in dual-stack labs
    service_ip6: str | None = None

    @property
    def key(self) -> str:
        return self.spec.key


@dataclass(frozen=True)
class LabNode:
    name: str
    index: int
    netns: str
    pod_cidr: str
    fabric_ip: str
    mgmt_ip: str  # the node's end of its management /30
    mgmt_gateway: str  # the root netns end
    pin_dir: str
    pod_cidr6: str | None = None
    fabric_ip6: str | None = None


# New namespaces would run duplicate address detection on every address for about a second; the lab
# assigns unique addresses itself, so DAD only delays pods.
IPV6_SETTINGS = {
    "net.ipv6.conf.all.accept_dad": "0",
    "net.ipv6.conf.default.accept_dad": "0",
}


def node_name(index: int) -> str:
    return f"node{index}"


def _short_hash(text: str, length: int = 10) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:length]


def host_ifname(pod: PodSpec) -> str:
    """Host-side veth name: hashed like Calico's cali<hash>, because IFNAMSIZ allows 15 bytes."""
    return "pfv" + _short_hash(pod.key)


def pod_netns_name(pod: PodSpec) -> str:
    return f"{LAB_PREFIX}{pod.node}-{pod.namespace}-{pod.name}"


def run_in_netns(
    netns_name: str, argv: list[str], stdin: str | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run a command inside a lab netns (network namespace only, mounts stay shared)."""
    try:
        return wiring.run_in(netns_name, argv, stdin=stdin, check=check)
    except wiring.WiringError as err:
        raise LabError(str(err)) from err


@dataclass
class Lab:
    """A set of simulated nodes and pods. `build()` makes it, `teardown()` removes every trace."""

    node_count: int = 2
    mode: CniMode = CniMode.ROUTED
    ipv6: bool = False  # dual-stack: every pod and Service also gets an IPv6 address
    pods: dict[str, LabPod] = field(default_factory=dict)
    nodes: dict[str, LabNode] = field(default_factory=dict)

    # --- addressing -------------------------------------------------------------------------

    @property
    def control_address(self) -> str:
        """Where a control service in the root netns listens so that every node can reach it."""
        return self.nodes[node_name(1)].mgmt_gateway

    def _plan_nodes(self) -> None:
        for index in range(1, self.node_count + 1):
            name = node_name(index)
            mgmt = list(ipaddress.IPv4Network(f"10.251.{index}.0/30").hosts())
            self.nodes[name] = LabNode(
                name=name,
                index=index,
                netns=LAB_PREFIX + name,
                pod_cidr=f"10.240.{index}.0/24",
                fabric_ip=str(FABRIC_NET.network_address + index),
                mgmt_gateway=str(mgmt[0]),
                mgmt_ip=str(mgmt[1]),
                pin_dir=str(BPF_FS / (LAB_PREFIX + name)),
                pod_cidr6=str(ipaddress.IPv6Network(f"fd00:10:240:{index:x}::/64")) if self.ipv6 else None,
                fabric_ip6=str(FABRIC6_NET.network_address + index) if self.ipv6 else None,
            )

    def _plan_pods(self, specs: Iterable[PodSpec]) -> list[LabPod]:
        per_node: dict[str, int] = {}
        planned = []
        for service_index, spec in enumerate(specs):
            if spec.node not in self.nodes:
                raise LabError(f"pod {spec.key} is on unknown node {spec.node!r}")
            if spec.key in self.pods:
                raise LabError(f"pod {spec.key} defined twice")
            offset = per_node.get(spec.node, 0)
            per_node[spec.node] = offset + (not spec.host_network)
            if POD_HOST_OFFSET + offset > MAX_POD_HOST:
                raise LabError(
                    f"node {spec.node} cannot hold more than {MAX_POD_HOST - POD_HOST_OFFSET + 1} pods"
                )
            node = self.nodes[spec.node]
            if spec.host_network:
                self.pods[spec.key] = LabPod(
                    spec=spec, ip=node.fabric_ip, ip6=node.fabric_ip6, netns=node.netns, host_ifname="",
                    service_ip=str(SERVICE_SUPERNET.network_address + POD_HOST_OFFSET + service_index),
                )
                planned.append(self.pods[spec.key])
                continue
            node_net = ipaddress.IPv4Network(node.pod_cidr)
            ip6 = service_ip6 = None
            if node.pod_cidr6:
                ip6 = str(ipaddress.IPv6Network(node.pod_cidr6).network_address + POD_HOST_OFFSET + offset)
                service_ip6 = str(SERVICE6_SUPERNET.network_address + POD_HOST_OFFSET + service_index)
            pod = LabPod(
                spec=spec,
                ip=str(node_net.network_address + POD_HOST_OFFSET + offset),
                service_ip=str(SERVICE_SUPERNET.network_address + POD_HOST_OFFSET + service_index),
                netns=pod_netns_name(spec),
                host_ifname=host_ifname(spec),
                ip6=ip6,
                service_ip6=service_ip6,
            )
            self.pods[spec.key] = pod
            planned.append(pod)
        return planned

    # --- building ---------------------------------------------------------------------------

    def build(self, pod_specs: Iterable[PodSpec], lock_wait_seconds: float = DEFAULT_LOCK_WAIT_S) -> None:
        """Create nodes, pods, services and servers. On failure, everything is torn down again.

        The calling process holds the lab lock from here until `teardown()` (or until it exits).
        """
        held_before = _held_lock is not None
        acquire_lab_lock(lock_wait_seconds)
        if any(n.startswith(LAB_PREFIX) for n in netns.listnetns()):
            if not held_before:
                release_lab_lock()
            raise LabError("a lab is already up (run `podfence lab down` first)")
        self._plan_nodes()
        pods = self._plan_pods(pod_specs)
        RUN_DIR.mkdir(parents=True, exist_ok=True)
        builder_pid = os.getpid()
        try:
            self._save_state()
            self._build_root_blackholes()
            self._build_fabric()
            for node in self.nodes.values():
                self._build_node(node)
            for pod in pods:
                if not pod.spec.host_network:
                    self._build_pod(pod)
            self._program_services()
            start_servers(pods)
            announce_pods(p for p in pods if not p.spec.host_network)
        except BaseException as err:
            if os.getpid() != builder_pid:
                # A helper pyroute2 forked to create a namespace, interrupted (Ctrl-C reaches the
                # whole process group) before it could exit: it must not tear down the lab.
                os._exit(1)
            teardown()
            if isinstance(err, wiring.WiringError):
                raise LabError(str(err)) from err
            raise

    def _build_root_blackholes(self) -> None:
        with wiring.ipr() as ipr:
            _blackhole(
                ipr, BLACKHOLED_IN_ROOT + (BLACKHOLED6_IN_ROOT if self.ipv6 else ()), proto=LAB_ROUTE_PROTO
            )

    def _build_fabric(self) -> None:
        wiring.create(FABRIC_NETNS)
        wiring.add_bridge(FABRIC_NETNS, "fabric0")

    def _build_node(self, node: LabNode) -> None:
        wiring.create(node.netns)
        settings = {
            "net.ipv4.ip_forward": "1",
            "net.ipv4.conf.all.rp_filter": "0",
            "net.ipv4.conf.default.rp_filter": "0",
        }
        if self.ipv6:
            settings.update(IPV6_SETTINGS)
            settings["net.ipv6.conf.all.forwarding"] = "1"
        if self.mode is CniMode.BRIDGED:
            settings["net.bridge.bridge-nf-call-iptables"] = "1"
            settings["net.bridge.bridge-nf-call-ip6tables"] = "1"
        wiring.sysctl(node.netns, settings)
        port_index = wiring.add_veth(FABRIC_NETNS, f"{LAB_PREFIX}f{node.index}", node.netns)
        with wiring.ipr(FABRIC_NETNS) as fabric:
            fabric.link("set", index=port_index, master=wiring.index(fabric, "fabric0"))
        mgmt_index = wiring.add_veth(None, f"{LAB_PREFIX}m{node.index}", node.netns, "mgmt0")
        with wiring.ipr() as root:
            root.addr("add", index=mgmt_index, address=node.mgmt_gateway, prefixlen=30)
        with wiring.ipr(node.netns) as ipr:
            eth0 = wiring.index(ipr, "eth0")
            ipr.addr("add", index=eth0, address=node.fabric_ip, prefixlen=FABRIC_NET.prefixlen)
            if node.fabric_ip6:
                ipr.addr("add", index=eth0, address=node.fabric_ip6, prefixlen=FABRIC6_NET.prefixlen)
            mgmt0 = wiring.index(ipr, "mgmt0")
            ipr.addr("add", index=mgmt0, address=node.mgmt_ip, prefixlen=30)
            ipr.route("add", dst=str(MGMT_SUPERNET), gateway=node.mgmt_gateway, oif=mgmt0)
            _blackhole(ipr, BLACKHOLED_IN_NODES + (BLACKHOLED6_IN_NODES if self.ipv6 else ()))
            for other in self.nodes.values():
                if other.name == node.name:
                    continue
                ipr.route("add", dst=other.pod_cidr, gateway=other.fabric_ip, oif=eth0)
                if other.pod_cidr6:
                    ipr.route(
                        "add", family=socket.AF_INET6, dst=other.pod_cidr6, gateway=other.fabric_ip6, oif=eth0
                    )
        if self.mode is CniMode.BRIDGED:
            wiring.add_bridge(node.netns, "cni0", *_bridge_gateways(node))

    def _build_pod(self, pod: LabPod) -> None:
        node = self.nodes[pod.spec.node]
        wiring.create(pod.netns)
        if self.ipv6:
            wiring.sysctl(pod.netns, IPV6_SETTINGS)
        if self.mode is CniMode.ROUTED:
            wiring.wire_routed(
                node.netns,
                pod.netns,
                pod.host_ifname,
                pod.ip,
                pod.ip6,
                src=node.fabric_ip,
                src6=node.fabric_ip6,
            )
            return
        gateway, *gateway6 = (address.split("/")[0] for address in _bridge_gateways(node))
        wiring.wire_bridged(
            node.netns,
            pod.netns,
            pod.host_ifname,
            "cni0",
            f"{pod.ip}/24",
            f"{pod.ip6}/64" if pod.ip6 else None,
            gateway=gateway,
            gateway6=gateway6[0] if pod.ip6 and gateway6 else None,
            hairpin=True,
        )

    def _program_services(self) -> None:
        rules = [
            "*nat",
            ":KUBE-SERVICES - [0:0]",
            "-A PREROUTING -j KUBE-SERVICES",
            "-A OUTPUT -j KUBE-SERVICES",
        ]
        for pod in self.pods.values():
            # One backend per Service; no port in the DNAT target keeps the probed port as it is.
            rules.append(
                f"-A KUBE-SERVICES -d {pod.service_ip}/32 -m comment --comment {pod.key} "
                f"-j DNAT --to-destination {pod.ip}"
            )
        rules.append("COMMIT")
        rules6 = [*rules[:4]]
        rules6 += [
            f"-A KUBE-SERVICES -d {pod.service_ip6}/128 -m comment --comment {pod.key} "
            f"-j DNAT --to-destination {pod.ip6}"
            for pod in self.pods.values()
            if pod.ip6
        ]
        rules6.append("COMMIT")
        for node in self.nodes.values():
            run_in_netns(node.netns, ["iptables-restore", "--noflush"], stdin="\n".join(rules) + "\n")
            if self.ipv6:
                run_in_netns(node.netns, ["ip6tables-restore", "--noflush"], stdin="\n".join(rules6) + "\n")

    # --- state ------------------------------------------------------------------------------

    def _save_state(self) -> None:
        state = {
            "node_count": self.node_count,
            "mode": self.mode.value,
            "ipv6": self.ipv6,
            "nodes": [asdict(n) for n in self.nodes.values()],
            "pods": [
                {
                    "spec": {
                        **asdict(p.spec),
                        "ports": [[sp.port, sp.protocol.value] for sp in p.spec.ports],
                    },
                    "ip": p.ip,
                    "service_ip": p.service_ip,
                    "netns": p.netns,
                    "host_ifname": p.host_ifname,
                    "ip6": p.ip6,
                    "service_ip6": p.service_ip6,
                }
                for p in self.pods.values()
            ],
        }
        (RUN_DIR / "state.json").write_text(json.dumps(state, indent=1))

    @classmethod
    def load(cls) -> Lab:
        """The lab that is up right now, as recorded by `build()`."""
        try:
            state = json.loads((RUN_DIR / "state.json").read_text())
        except FileNotFoundError as err:
            raise LabError("no lab is up") from err
        lab = cls(node_count=state["node_count"], mode=CniMode(state["mode"]), ipv6=state.get("ipv6", False))
        for node in state["nodes"]:
            lab.nodes[node["name"]] = LabNode(**node)
        for raw in state["pods"]:
            spec = raw["spec"]
            pod_spec = PodSpec(
                namespace=spec["namespace"],
                name=spec["name"],
                node=spec["node"],
                labels=spec["labels"],
                ports=tuple(ServerPort(port, Protocol(proto)) for port, proto in spec["ports"]),
                host_network=spec.get("host_network", False),
            )
            lab.pods[pod_spec.key] = LabPod(
                spec=pod_spec,
                ip=raw["ip"],
                service_ip=raw["service_ip"],
                netns=raw["netns"],
                host_ifname=raw["host_ifname"],
                ip6=raw.get("ip6"),
                service_ip6=raw.get("service_ip6"),
            )
        return lab


def _blackhole(
    ipr: IPRoute, nets: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network], **extra: int
) -> None:
    """Lab ranges go nowhere unless a more specific route claims them: never out of the machine."""
    for net in nets:
        family = socket.AF_INET6 if net.version == 6 else socket.AF_INET
        ipr.route(
            "replace", family=family, dst=str(net), type="blackhole", priority=BLACKHOLE_METRIC, **extra
        )


def _bridge_gateways(node: LabNode) -> list[str]:
    """The bridged gateway addresses of a node ("ip/prefixlen"): .1 of its pod /24 and /64."""
    gateways = [f"{ipaddress.IPv4Network(node.pod_cidr).network_address + 1}/24"]
    if node.pod_cidr6:
        gateways.append(f"{ipaddress.IPv6Network(node.pod_cidr6).network_address + 1}/64")
    return gateways


def child_environment() -> dict[str, str]:
    """Environment for lab child processes, so they import this checkout's `agent` package."""
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


# --- pod servers ----------------------------------------------------------------------------

SERVERS_PID = "servers.pid"


def start_servers(pods: Iterable[LabPod]) -> None:
    """Start the one process that serves every pod's ports, and wait until all are bound.

    A pod serving UDP 53 is the cluster DNS: it resolves every pod's Service name (agent.lab.dns).
    """
    pods = list(pods)
    records = {
        service_name(p.spec.namespace, p.spec.name): [a for a in (p.service_ip, p.service_ip6) if a]
        for p in pods
    }
    config = {
        "pods": [
            {
                "netns": p.netns,
                "name": p.spec.name,
                "ports": [[sp.port, sp.protocol.value] for sp in p.spec.ports],
            }
            for p in pods
        ],
        "dns_records": records,
    }
    config_path = RUN_DIR / "servers.json"
    ready_path = RUN_DIR / "servers.ready"
    config_path.write_text(json.dumps(config))
    ready_path.unlink(missing_ok=True)
    log_file = (RUN_DIR / "servers.log").open("ab")
    process = subprocess.Popen(
        [sys.executable, "-m", "agent.lab.servers", str(config_path), str(ready_path)],
        stdout=log_file,
        stderr=log_file,
        env=child_environment(),
        start_new_session=True,  # a Ctrl-C in the terminal reaches the lab's cleanup, not the servers
    )
    (RUN_DIR / SERVERS_PID).write_text(str(process.pid))
    deadline = time.monotonic() + 15
    while not ready_path.exists():
        if process.poll() is not None:
            raise LabError(f"pod servers exited with {process.returncode}; see {RUN_DIR / 'servers.log'}")
        if time.monotonic() > deadline:
            raise LabError("pod servers did not become ready within 15 s")
        time.sleep(0.05)


def announce_pods(pods: Iterable[LabPod]) -> None:
    """Make each pod send a frame, as CNI plugins do with gratuitous ARP after configuring it.

    Bridged nodes learn the pod's MAC into the bridge FDB only from its traffic; agents that find
    a pod's bridge port through the FDB need that entry before the pod's first connection.
    """
    send_hello_from([p.netns for p in pods])


# --- teardown -------------------------------------------------------------------------------


def stop_pid_file(pid_file: Path, grace_seconds: float = 3.0) -> None:
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        pid_file.unlink(missing_ok=True)
        return
    # The pid file may outlive its process; only signal a process that still runs our code.
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        cmdline = b""
    if b"agent." in cmdline or b"podfence" in cmdline:
        with contextlib.suppress(ProcessLookupError):
            if os.getpgid(pid) == pid:
                os.killpg(pid, signal.SIGTERM)  # a session leader we started: its helpers go too
            else:
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_seconds
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            time.sleep(0.05)
        if Path(f"/proc/{pid}").exists():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    pid_file.unlink(missing_ok=True)


# --- one lab per machine ----------------------------------------------------------------------
#
# The lab's names are fixed (pflab-node1, ...), so two processes building labs at once would tear
# down each other's. A process holds this flock from build() until its teardown(); others wait
# for it. The kernel drops the lock when the holder dies, so a crash never leaves it held.

_held_lock: int | None = None


def _lock_holder() -> str:
    with contextlib.suppress(OSError, ValueError):
        return f"pid {int(LOCK_PATH.read_text().strip())}"
    return "another process"


def acquire_lab_lock(wait_seconds: float = DEFAULT_LOCK_WAIT_S) -> None:
    """Hold the machine-wide lab lock (idempotent within a process); LabError if busy too long."""
    global _held_lock
    if _held_lock is not None:
        return
    fd = os.open(LOCK_PATH, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                holder = _lock_holder()
                os.close(fd)
                raise LabError(
                    f"the lab is in use by {holder} (a test run or demo?); try again later"
                ) from None
            time.sleep(0.2)
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    _held_lock = fd


def release_lab_lock() -> None:
    global _held_lock
    if _held_lock is not None:
        os.close(_held_lock)  # closing the only fd of the open file drops the flock
        _held_lock = None


def _lab_netns_inodes() -> set[int]:
    inodes = set()
    for name in netns.listnetns():
        if name.startswith(LAB_PREFIX):
            with contextlib.suppress(OSError):
                inodes.add(os.stat(wiring.path(name)).st_ino)
    return inodes


def stop_processes_in_lab_namespaces(grace_seconds: float = 3.0) -> list[int]:
    """SIGTERM (then SIGKILL) every process living in a lab netns, pid file or not.

    Catches what pid files miss after a crash: agents started by hand inside a node, servers whose
    pid file was deleted. Only the main thread's netns is visible in /proc/<pid>/ns/net, so a
    process that merely has a thread in a lab netns (like the prober's caller) is left alone.
    """
    inodes = _lab_netns_inodes()
    if not inodes:
        return []
    victims = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            link = os.readlink(proc / "ns" / "net")  # "net:[<inode>]"
        except OSError:
            continue
        if int(link[5:-1]) in inodes:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(proc.name), signal.SIGTERM)
                victims.append(int(proc.name))
    deadline = time.monotonic() + grace_seconds
    while victims and time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in victims):
        for pid in victims:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
        time.sleep(0.05)
    for pid in victims:
        with contextlib.suppress(OSError):  # gone already: nothing to do
            if int(os.readlink(f"/proc/{pid}/ns/net")[5:-1]) in inodes:
                os.kill(pid, signal.SIGKILL)
    return victims


def teardown(lock_wait_seconds: float = DEFAULT_LOCK_WAIT_S) -> list[str]:
    """Remove everything any lab made on this machine; returns what was removed. Idempotent.

    Waits up to `lock_wait_seconds` for a process that is using the lab right now to finish.
    """
    acquire_lab_lock(lock_wait_seconds)
    try:
        return _remove_everything()
    finally:
        release_lab_lock()


def _remove_everything() -> list[str]:
    forget_namespaces()  # this process's cached fds would keep deleted namespaces alive
    removed: list[str] = []
    if RUN_DIR.exists():
        for pid_file in sorted(RUN_DIR.glob("*.pid")):
            stop_pid_file(pid_file)
            removed.append(f"process {pid_file.stem}")
    removed += [f"stray process {pid}" for pid in stop_processes_in_lab_namespaces()]
    removed += [f"netns {name}" for name in wiring.remove_prefixed(LAB_PREFIX)]
    with wiring.ipr() as root:
        for link in root.get_links():
            ifname = link.get_attr("IFLA_IFNAME")
            if ifname and ifname.startswith(LAB_PREFIX):
                with contextlib.suppress(NetlinkError):
                    root.link("del", index=link["index"])
                    removed.append(f"root link {ifname}")
        for family in (socket.AF_INET, socket.AF_INET6):
            for route in root.get_routes(family=family, table=254):
                if route["proto"] == LAB_ROUTE_PROTO:
                    dst = f"{route.get_attr('RTA_DST')}/{route['dst_len']}"
                    with contextlib.suppress(NetlinkError):
                        root.route(
                            "del",
                            family=family,
                            dst=dst,
                            type=route["type"],
                            priority=route.get_attr("RTA_PRIORITY"),
                        )
                        removed.append(f"root route {dst}")
    for pin_dir in BPF_FS.glob(LAB_PREFIX + "*"):
        shutil.rmtree(pin_dir, ignore_errors=True)
        removed.append(f"pins {pin_dir}")
    if RUN_DIR.exists():
        for leftover in RUN_DIR.glob("*"):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
    return removed


def leftovers() -> list[str]:
    """What of a lab still exists (empty after a clean teardown); tests assert on this."""
    found = [f"netns {n}" for n in netns.listnetns() if n.startswith(LAB_PREFIX)]
    with wiring.ipr() as root:
        found += [
            f"root link {link.get_attr('IFLA_IFNAME')}"
            for link in root.get_links()
            if (link.get_attr("IFLA_IFNAME") or "").startswith(LAB_PREFIX)
        ]
        found += [
            f"root route {r.get_attr('RTA_DST')}/{r['dst_len']}"
            for family in (socket.AF_INET, socket.AF_INET6)
            for r in root.get_routes(family=family, table=254)
            if r["proto"] == LAB_ROUTE_PROTO
        ]
    found += [f"pins {p}" for p in BPF_FS.glob(LAB_PREFIX + "*")]
    if RUN_DIR.exists():
        found += [f"pid file {p.name}" for p in RUN_DIR.glob("*.pid")]
    return found
