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

Everything made here is recorded under /run/podfence-lab and removed by `machine.teardown()`,
which also works from a fresh process after a crash because it finds leftovers by the `pflab-`
prefix.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import os
import socket
import subprocess
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from enum import StrEnum

from pyroute2 import IPRoute, netns

from agent.lab import servers, wiring
from agent.lab.machine import (
    BPF_FS,
    DEFAULT_LOCK_WAIT_S,
    LAB_PREFIX,
    LAB_ROUTE_PROTO,
    RUN_DIR,
    LabError,
    acquire_lab_lock,
    lab_lock_held,
    release_lab_lock,
    teardown,
)
from agent.lab.prober import send_hello_from

log = logging.getLogger(__name__)

FABRIC_NETNS = LAB_PREFIX + "fabric"


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
        held_before = lab_lock_held()
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
            servers.start(pods)
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


def announce_pods(pods: Iterable[LabPod]) -> None:
    """Make each pod send a frame, as CNI plugins do with gratuitous ARP after configuring it.

    Bridged nodes learn the pod's MAC into the bridge FDB only from its traffic; agents that find
    a pod's bridge port through the FDB need that entry before the pod's first connection.
    """
    send_hello_from([p.netns for p in pods])


