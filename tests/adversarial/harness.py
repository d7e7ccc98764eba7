"""The attacker's lab: a hostile pod sends raw frames, a sniffer in another pod records what arrives.

One simulated node (tests/privileged/iptables_netns.py: a node netns, pods on veths, routed /32s
or ports of one bridge) with three pods: the attacker, the victim and a bystander whose addresses
are worth stealing. Either dataplane guards them: BpfDataplane in this process, or the iptables
dataplane in a worker forked into the node netns (as the privileged tiers run them).

Every case runs twice through the same kernel: `Lab.unguarded()` first (no tc program on any pod
interface, no netfilter link, no rule, no conntrack or fragment memory), where the frame must be
delivered or the case proves nothing; then `Lab.guard(state)`, where it must be dropped. Frames
leave the attacker's eth0 through an AF_PACKET socket opened inside its netns, so they skip its
whole stack (what a pod with CAP_NET_RAW can do); the sniffer is an AF_PACKET socket on the
receiver's eth0 and recognises a frame by a random marker the case put into it.

The node is the permissive kind: IPv4 source routing accepted, no reverse-path filter, no
conntrack until a dataplane needs it. The filters must hold there, since podfence cannot know
what else a node runs.
"""

from __future__ import annotations

import contextlib
import ipaddress
import secrets
import select
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from agent.dataplane.bpf.dataplane import BpfDataplane
from agent.dataplane.bpf.settings import BpfSettings
from agent.dataplane.iptables import IptablesDataplane
from agent.dataplane.netns import inside
from agent.dataplane.types import Allow, DirectionPolicy, Endpoint, IdentityPeer, IPAddress, NodeState
from agent.lab import wiring
from tests.privileged.iptables_netns import (
    BRIDGE,
    BRIDGE_GATEWAY,
    NODE_IP,
    NODE_IP6,
    DataplaneWorker,
    Node,
    Pod,
)

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
DELIVERY_WAIT_S = 1.5  # what must arrive arrives within milliseconds; this is the slow-CI bound
DROP_WAIT_S = 0.2  # after the last frame of a case, how long a dropped frame is waited for
BRIDGE_GATEWAY6 = "fd00:2::fe"
ATTACKER, VICTIM, BYSTANDER = 0, 1, 2  # index into Lab.pods; identity = index + 1
TOPOLOGIES = ("routed", "bridged")
DATAPLANES = ("bpf", "iptables")
COMBOS = tuple(f"{d}-{t}" for d in DATAPLANES for t in TOPOLOGIES)  # one lab each


def marker() -> bytes:
    """A payload no other frame in the lab carries."""
    return b"PFADV" + secrets.token_hex(8).encode()


@dataclass
class Member:
    """A pod of the lab as the attacker sees it: addresses, its eth0 MAC, and its neighbour's."""

    pod: Pod
    ip: str
    ip6: str
    mac: str  # the pod's own eth0
    gateway_mac: str  # where its routed frames go (the host veth; bridged: the bridge)

    @property
    def netns(self) -> str:
        return self.pod.netns


class Sniffer:
    """An AF_PACKET socket on a pod's eth0, receiving every frame that arrives there."""

    def __init__(self, netns: str) -> None:
        with inside(netns):
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            self.sock.bind(("eth0", 0))
        self.sock.setblocking(False)

    def drain(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while True:
                self.sock.recv(65535)

    def wait_for(self, match: Callable[[bytes], bool], timeout: float) -> bool:
        """Read arriving frames until one `match`es (True) or `timeout` passes (False); frames
        already queued are always read, even with no time left."""
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(BlockingIOError):
                while True:
                    frame, address = self.sock.recvfrom(65535)
                    if address[2] != PACKET_OUTGOING and match(frame):
                        return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            select.select([self.sock], [], [], left)

    def close(self) -> None:
        self.sock.close()


class Sender:
    """An AF_PACKET socket on a pod's eth0: frames leave exactly as built, past the pod's stack."""

    def __init__(self, netns: str) -> None:
        with inside(netns):
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
            self.sock.bind(("eth0", 0))

    def send(self, frame: bytes) -> None:
        self.sock.send(frame)

    def close(self) -> None:
        self.sock.close()


class Guard:
    """One dataplane, switched between guarding nothing and guarding a NodeState."""

    name = ""

    def unguard(self) -> None:
        raise NotImplementedError

    def guard(self, state: NodeState) -> None:
        raise NotImplementedError

    def drop_reasons(self) -> dict[str, int]:
        return {}

    @property
    def reassembles(self) -> bool:
        """Does the node reassemble IP datagrams while guarded (so that fragments of a datagram
        that never completes are held by the kernel and never reach a filter)?"""
        return False

    def close(self) -> None:
        raise NotImplementedError


class BpfGuard(Guard):
    name = "bpf"

    def __init__(self, node: Node) -> None:
        self.plane = BpfDataplane(
            BpfSettings(
                pin_dir=f"/sys/fs/bpf/{node.prefix}",
                netns=node.netns,
                state_file=f"/run/podfence-tests/{node.prefix}.json",
            )
        )
        self.plane.start()
        self.version = 0
        self.linked = True

    def _apply(self, state: NodeState) -> None:
        self.version += 1
        self.plane.apply(
            NodeState(self.version, state.endpoints, state.identities, state.node_ips, state.pod_interfaces)
        )

    def _forget_flows(self) -> None:
        for name in (b"pf_ct", b"pf_frag"):
            self.plane._module[name].clear()

    def unguard(self) -> None:
        self._apply(NodeState(0))  # no pod interface: every tc filter is detached
        if self.linked:
            self.plane.hook.links.remove()
            self.linked = False
        self._forget_flows()

    def guard(self, state: NodeState) -> None:
        self._forget_flows()
        if not self.linked:
            self.plane.hook.install(self.plane._module, self.plane._programs)
            self.linked = True
        self._apply(state)

    def drop_reasons(self) -> dict[str, int]:
        return self.plane.drop_reason_counts()

    @property
    def reassembles(self) -> bool:
        return self.plane.egress_hook_in_use == "netfilter" and self.plane.hook.links.defrag

    def close(self) -> None:
        self.plane.teardown()


class IptablesGuard(Guard):
    name = "iptables"

    def __init__(self, node: Node) -> None:
        self.worker = DataplaneWorker(node.netns, IptablesDataplane)
        self.started = False
        self.version = 0

    def unguard(self) -> None:
        # teardown removes every chain and set; with no rule left that uses conntrack, the
        # namespace's conntrack and defragmentation hooks go too
        self.worker.call("teardown")
        self.started = False

    def guard(self, state: NodeState) -> None:
        if not self.started:
            self.worker.call("start")
            self.started = True
        self.version += 1
        self.worker.call(
            "apply",
            NodeState(self.version, state.endpoints, state.identities, state.node_ips, state.pod_interfaces),
        )

    @property
    def reassembles(self) -> bool:
        return True  # its rules use conntrack, which reassembles

    def close(self) -> None:
        try:
            self.worker.call("teardown")
        finally:
            self.worker.stop()


@dataclass
class Lab:
    node: Node
    topology: str
    guard_impl: Guard
    members: list[Member]
    senders: dict[str, Sender] = field(default_factory=dict)
    sniffers: dict[str, Sniffer] = field(default_factory=dict)
    mode: str = ""  # "" (unknown), "unguarded" or the name of the policy guarding it

    @property
    def dataplane(self) -> str:
        return self.guard_impl.name

    @property
    def attacker(self) -> Member:
        return self.members[ATTACKER]

    @property
    def victim(self) -> Member:
        return self.members[VICTIM]

    @property
    def bystander(self) -> Member:
        return self.members[BYSTANDER]

    @property
    def node_ips(self) -> tuple[IPAddress, ...]:
        if self.topology == "bridged":
            return (ipaddress.ip_address(BRIDGE_GATEWAY), ipaddress.ip_address(BRIDGE_GATEWAY6))
        return (ipaddress.ip_address(NODE_IP), ipaddress.ip_address(NODE_IP6))

    def next_hop_mac(self, sender: Member, receiver: Member) -> str:
        """Destination MAC of a frame from `sender` meant for `receiver`'s IP."""
        return receiver.mac if self.topology == "bridged" else sender.gateway_mac

    # ---- policy ----------------------------------------------------------------------------

    def state(
        self,
        ingress: dict[int, DirectionPolicy] | None = None,
        egress: dict[int, DirectionPolicy] | None = None,
    ) -> NodeState:
        """Every pod an endpoint (pod i is identity i + 1), directions open unless given."""
        ingress, egress = ingress or {}, egress or {}
        endpoints = {}
        identities: dict[int, tuple[IPAddress, ...]] = {}
        for index, member in enumerate(self.members):
            addresses = (ipaddress.ip_address(member.ip), ipaddress.ip_address(member.ip6))
            identities[index + 1] = addresses
            key = f"adv/pod{index}"
            endpoints[key] = Endpoint(
                key,
                addresses,
                ingress.get(index, DirectionPolicy()),
                egress.get(index, DirectionPolicy()),
                member.pod.ifindex,
                member.mac,  # bound as the node layer binds it
            )
        return NodeState(
            0, endpoints, identities, self.node_ips, frozenset(m.pod.ifindex for m in self.members)
        )

    def unguarded(self) -> None:
        self.mode = ""
        self.guard_impl.unguard()
        self._forget_kernel_flows()
        self.mode = "unguarded"

    def guard(self, state: NodeState, name: str = "") -> None:
        self.mode = ""
        self._forget_kernel_flows()
        self.guard_impl.guard(state)
        self.mode = name

    def ensure_unguarded(self) -> None:
        if self.mode != "unguarded":
            self.unguarded()

    def ensure_guarded(self, name: str, policy: Callable[[Lab], NodeState]) -> None:
        """Guarded by the named policy; reprogrammed only when another one (or none) is in force."""
        if self.mode != name:
            self.guard(policy(self), name)

    def _forget_kernel_flows(self) -> None:
        """Between cases: no connection, and no MAC a case taught the bridge (a case that spoofs
        the victim's MAC would otherwise steal the next case's frames)."""
        self.node.in_node("conntrack", "-F", check=False)
        self.node.in_node("conntrack", "-F", "-f", "ipv6", check=False)
        if self.topology == "bridged":
            self.forget_macs()
        self.announce()

    def announce(self) -> None:
        """Every pod broadcasts an ARP request from its own address: the bridge learns its port
        and the node its MAC, so no case's frame is flooded or queued behind address resolution
        (unless the case wants it)."""
        from scapy.layers.l2 import ARP, Ether

        gateway = BRIDGE_GATEWAY if self.topology == "bridged" else NODE_IP
        for member in self.members:
            request = ARP(op=1, hwsrc=member.mac, psrc=member.ip, pdst=gateway)
            self.sender(member).send(bytes(Ether(src=member.mac, dst="ff:ff:ff:ff:ff:ff") / request))
        time.sleep(0.02)

    def forget_macs(self) -> None:
        """Empty the bridge's forwarding database: the next frames to a pod are flooded."""
        self.node.in_node("ip", "link", "set", BRIDGE, "type", "bridge", "fdb_flush")

    # ---- traffic ---------------------------------------------------------------------------

    def sender(self, member: Member) -> Sender:
        if member.netns not in self.senders:
            self.senders[member.netns] = Sender(member.netns)
        return self.senders[member.netns]

    def sniffer(self, member: Member) -> Sniffer:
        if member.netns not in self.sniffers:
            self.sniffers[member.netns] = Sniffer(member.netns)
        return self.sniffers[member.netns]

    def deliver(
        self,
        frames: list[bytes],
        receiver: Member,
        match: Callable[[bytes], bool],
        *,
        sender: Member | None = None,
        expect: bool,
    ) -> bool:
        """Send the frames from `sender` (the attacker); did one `match` reach `receiver`?
        Waits the delivery bound when the frame is expected, the drop bound otherwise."""
        sniffer = self.sniffer(receiver)
        sniffer.drain()
        out = self.sender(sender or self.attacker)
        for frame in frames:
            out.send(frame)
        return sniffer.wait_for(match, DELIVERY_WAIT_S if expect else DROP_WAIT_S)

    def close(self) -> None:
        for sender in self.senders.values():
            sender.close()
        for sniffer in self.sniffers.values():
            sniffer.close()
        try:
            self.guard_impl.close()
        finally:
            self.node.destroy()


def isolated(*allows: Allow) -> DirectionPolicy:
    return DirectionPolicy(isolated=True, allows=allows)


def allow_from(index: int, protocol: int = 0, first: int = 0, last: int = 65535) -> Allow:
    return Allow(IdentityPeer(index + 1), protocol, first, last)


def build(topology: str, dataplane: str) -> Lab:
    """Three pods on one node, guarded by `dataplane`, wired routed or bridged; unguarded."""
    node = Node()
    try:
        node.create(0)
        # the permissive node: source routes accepted (a pod may name the hops), no rp_filter
        wiring.sysctl(
            node.netns, {"net.ipv4.conf.all.accept_source_route": 1, "net.ipv4.conf.all.rp_filter": 0}
        )
        members = []
        for index in (1, 2, 3):
            if topology == "routed":
                pod = node.add_pod(index)
                assert pod.ip6 is not None
                members.append(
                    Member(
                        pod,
                        pod.ip,
                        pod.ip6,
                        wiring.mac(pod.netns, "eth0"),
                        wiring.mac(node.netns, pod.host_if),
                    )
                )
            else:
                pod = node.add_bridged_pod(index)
                if index == 1:
                    with wiring.ipr(node.netns) as ipr:
                        wiring.add_address(ipr, wiring.index(ipr, BRIDGE), f"{BRIDGE_GATEWAY6}/64")
                pod.ip6 = f"fd00:2::{index}"
                with wiring.ipr(pod.netns) as ipr:
                    eth0 = wiring.index(ipr, "eth0")
                    wiring.add_address(ipr, eth0, f"{pod.ip6}/64")
                    ipr.route("add", family=socket.AF_INET6, dst="::/0", gateway=BRIDGE_GATEWAY6, oif=eth0)
                members.append(
                    Member(
                        pod, pod.ip, pod.ip6, wiring.mac(pod.netns, "eth0"), wiring.mac(node.netns, BRIDGE)
                    )
                )
        guard: Guard = BpfGuard(node) if dataplane == "bpf" else IptablesGuard(node)
    except BaseException:
        node.destroy()
        raise
    lab = Lab(node, topology, guard, members)
    try:
        lab.unguarded()
    except BaseException:
        lab.close()
        raise
    return lab


@contextlib.contextmanager
def lab_of(topology: str, dataplane: str) -> Iterator[Lab]:
    lab = build(topology, dataplane)
    try:
        yield lab
    finally:
        lab.close()


def contains(mark: bytes) -> Callable[[bytes], bool]:
    return lambda frame: mark in frame
