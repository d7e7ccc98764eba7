"""Network namespaces, veths and pod wiring by netlink: the one topology builder under the node
lab (agent/lab/topology.py), the benchmarks (bench/_netlab.py) and the privileged tests.

Links, addresses and routes go through pyroute2, sysctls through /proc/sys from a thread moved
into the namespace, so building a pod starts no process. Commands that must run in a namespace
are started under `nsenter --net` (`argv_in`), never `ip netns exec`: the latter remounts /sys,
which hides the bpffs pins at /sys/fs/bpf from the command.

Pods are wired the ways CNI plugins wire them: routed (`wire_routed`: a /32 and /128 per pod on
a veth, default route via a link-local gateway, as Calico and ptp do) or bridged (`wire_bridged`:
the host veth a port of a node bridge, the pod on the bridge's subnet, as bridge and flannel do).
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from pyroute2 import IPRoute, netns
from pyroute2.netlink.exceptions import NetlinkError

from agent.dataplane.netns import inside

NETNS_DIR = Path("/run/netns")
GATEWAY = "169.254.1.1"  # the routed pods' IPv4 gateway, link-local like Calico's
GATEWAY6 = "fe80::1"
SCOPE_LINK = 253
IFA_F_NODAD = 0x02  # the address is usable at once: no duplicate address detection


class WiringError(RuntimeError):
    """A namespace, link or command step failed; the message names the step."""


def path(name: str) -> str:
    return str(NETNS_DIR / name)


def create(name: str, *, loopback_up: bool = True) -> None:
    netns.create(name)
    if loopback_up:
        with ipr(name) as handle:
            handle.link("set", index=index(handle, "lo"), state="up")


def remove(name: str) -> None:
    """Delete a namespace (its veths go with it); one that is gone already is fine."""
    with contextlib.suppress(OSError, NetlinkError):
        netns.remove(name)


def remove_prefixed(prefix: str) -> list[str]:
    removed = [name for name in netns.listnetns() if name.startswith(prefix)]
    for name in removed:
        remove(name)
    return removed


def argv_in(name: str, argv: Sequence[str]) -> list[str]:
    """`argv` in namespace `name` (network only: mounts, /sys and bpffs stay the caller's)."""
    return ["nsenter", f"--net={path(name)}", "--", *argv]


def run_in(
    name: str,
    argv: Sequence[str],
    *,
    stdin: str | None = None,
    check: bool = True,
    timeout: float = 60.0,
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        argv_in(name, argv), input=stdin, capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and done.returncode != 0:
        raise WiringError(f"{' '.join(argv)} in {name} failed: {done.stderr.strip()}")
    return done


def sysctl(name: str, settings: Mapping[str, str | int]) -> None:
    """Write sysctls (dotted names) of namespace `name`: /proc/sys/net answers for the namespace
    of the thread that opens it."""
    with inside(name):
        for key, value in settings.items():
            try:
                Path("/proc/sys", *key.split(".")).write_text(f"{value}\n")
            except OSError as err:
                raise WiringError(f"sysctl {key}={value} in {name} failed: {err}") from err


@contextlib.contextmanager
def ipr(name: str | None = None) -> Iterator[IPRoute]:
    """A netlink socket in namespace `name` (None: the caller's)."""
    handle = IPRoute(netns=name) if name else IPRoute()
    try:
        yield handle
    finally:
        handle.close()


def index(handle: IPRoute, ifname: str) -> int:
    found = handle.link_lookup(ifname=ifname)
    if not found:
        raise WiringError(f"interface {ifname} not found")
    return int(found[0])


def mac(name: str, ifname: str) -> str:
    with ipr(name) as handle:
        (link,) = handle.get_links(index(handle, ifname))
        return str(link.get_attr("IFLA_ADDRESS"))


def add_veth(
    host_ns: str | None, host_ifname: str, peer_ns: str | None, peer_ifname: str = "eth0", *, up: bool = True
) -> int:
    """A veth pair, `host_ifname` in `host_ns` (None: the caller's namespace) and `peer_ifname` in
    `peer_ns` (None: beside the host end), both up unless `up` is False; returns the host end's
    ifindex."""
    beside = peer_ns is None or peer_ns == host_ns
    with ipr(host_ns) as host:
        peer: dict[str, str] = {"ifname": peer_ifname}
        if not beside:
            peer["net_ns_fd"] = str(peer_ns)
        host.link("add", ifname=host_ifname, kind="veth", peer=peer)
        host_index = index(host, host_ifname)
        if up:
            host.link("set", index=host_index, state="up")
            if beside:
                host.link("set", index=index(host, peer_ifname), state="up")
    if up and not beside:
        with ipr(peer_ns) as other:
            other.link("set", index=index(other, peer_ifname), state="up")
    return host_index


def add_bridge(name: str, ifname: str, *addresses: str) -> int:
    """A bridge in namespace `name` holding `addresses` ("ip/prefixlen", IPv6 without DAD); up."""
    with ipr(name) as handle:
        handle.link("add", ifname=ifname, kind="bridge")
        bridge = index(handle, ifname)
        for address in addresses:
            add_address(handle, bridge, address)
        handle.link("set", index=bridge, state="up")
        return bridge


def add_address(handle: IPRoute, ifindex: int, address: str, **extra: int) -> None:
    """`address` as "ip/prefixlen"; an IPv6 one is usable at once (no duplicate detection)."""
    ip, prefixlen = address.split("/")
    if ":" in ip:
        handle.addr("add", index=ifindex, address=ip, prefixlen=int(prefixlen), flags=IFA_F_NODAD, **extra)
    else:
        handle.addr("add", index=ifindex, address=ip, prefixlen=int(prefixlen), **extra)


def wire_routed(
    node_ns: str,
    pod_ns: str,
    host_ifname: str,
    ip: str,
    ip6: str | None = None,
    *,
    proxy_arp: bool = False,
    src: str | None = None,
    src6: str | None = None,
) -> int:
    """A routed pod (Calico/ptp style) in the existing `pod_ns`; returns the host veth's ifindex.

    The pod owns `ip`/32 (and `ip6`/128) on eth0 with default routes via GATEWAY and GATEWAY6.
    The node routes the pod's addresses to the host veth, with `src`/`src6` as preferred source.
    Who answers ARP for GATEWAY: the host veth holding it (default, one config per pod), or,
    with `proxy_arp`, the veth answering for every address the node routes, as Calico does
    (the node must then hold GATEWAY itself, on lo for instance).
    """
    host_index = add_veth(node_ns, host_ifname, pod_ns, up=False)
    if proxy_arp:
        # Proxy ARP answers after a random delay of up to 0.8 s by default: longer than a probe.
        sysctl(
            node_ns,
            {f"net.ipv4.conf.{host_ifname}.proxy_arp": 1, f"net.ipv4.neigh.{host_ifname}.proxy_delay": 0},
        )
    with ipr(node_ns) as node:
        if not proxy_arp:
            node.addr("add", index=host_index, address=GATEWAY, prefixlen=32, scope=SCOPE_LINK)
        node.link("set", index=host_index, state="up")
        node.route(
            "add", dst=f"{ip}/32", oif=host_index, scope=SCOPE_LINK, **({"prefsrc": src} if src else {})
        )
        if ip6:
            add_address(node, host_index, f"{GATEWAY6}/64")
            node.route(
                "add",
                family=socket.AF_INET6,
                dst=f"{ip6}/128",
                oif=host_index,
                **({"prefsrc": src6} if src6 else {}),
            )
    with ipr(pod_ns) as pod:
        eth0 = index(pod, "eth0")
        pod.addr("add", index=eth0, address=ip, prefixlen=32)
        pod.link("set", index=eth0, state="up")
        pod.route("add", dst=f"{GATEWAY}/32", oif=eth0, scope=SCOPE_LINK)
        pod.route("add", dst="0.0.0.0/0", gateway=GATEWAY, oif=eth0)
        if ip6:
            add_address(pod, eth0, f"{ip6}/128")
            pod.route("add", family=socket.AF_INET6, dst="::/0", gateway=GATEWAY6, oif=eth0)
    return host_index


def wire_bridged(
    node_ns: str,
    pod_ns: str,
    host_ifname: str,
    bridge: str,
    address: str,
    address6: str | None = None,
    *,
    gateway: str | None = None,
    gateway6: str | None = None,
    hairpin: bool = False,
) -> int:
    """A bridged pod (bridge/flannel style) in the existing `pod_ns`: the host veth a port of
    `bridge`, eth0 holding `address` (and `address6`) as "ip/prefixlen" on the bridge's subnet,
    default routes via the gateways if given. `hairpin` lets a pod reach itself through its
    own Service, as the bridge plugin does. Returns the host veth's ifindex."""
    host_index = add_veth(node_ns, host_ifname, pod_ns, up=False)
    with ipr(node_ns) as node:
        node.link("set", index=host_index, master=index(node, bridge), state="up")
        if hairpin:
            node.brport("set", index=host_index, hairpin_mode=1)
    with ipr(pod_ns) as pod:
        eth0 = index(pod, "eth0")
        add_address(pod, eth0, address)
        if address6:
            add_address(pod, eth0, address6)
        pod.link("set", index=eth0, state="up")
        if gateway:
            pod.route("add", dst="0.0.0.0/0", gateway=gateway, oif=eth0)
        if gateway6:
            pod.route("add", family=socket.AF_INET6, dst="::/0", gateway=gateway6, oif=eth0)
    return host_index
