"""What kube-proxy mode this node runs, as far as it changes where the egress verdict sees a Service.

In iptables and nftables mode kube-proxy DNATs at PREROUTING, so the egress verdict (FORWARD and
LOCAL_IN, after DNAT) judges the backend pod kube-proxy chose, as the NetworkPolicy spec demands.
In IPVS mode the ClusterIPs are local addresses (the dummy interface `kube-ipvs0`) and IPVS
rewrites the destination only after LOCAL_IN: the verdict sees the ClusterIP, never the backend.
An egress-isolated pod then reaches a Service only through an ipBlock that covers the ClusterIP,
and such an ipBlock admits every backend behind it. The agent cannot fix that from its hooks, so
it says so at start instead of enforcing something else than the user reads.
"""

from __future__ import annotations

import contextlib
import logging

from pyroute2 import IPRoute

log = logging.getLogger(__name__)

IPVS_INTERFACE = "kube-ipvs0"
IPVS_PROC = "/proc/net/ip_vs"


def ipvs_signs(proc_path: str = IPVS_PROC) -> list[str]:
    """The signs of kube-proxy's IPVS mode in this network namespace (empty: none)."""
    signs = []
    with IPRoute() as ipr:
        if ipr.link_lookup(ifname=IPVS_INTERFACE):
            signs.append(f"interface {IPVS_INTERFACE}")
    with contextlib.suppress(OSError), open(proc_path) as table:
        # header lines, then one "TCP/UDP/SCTP  address:port scheduler" line per virtual service
        services = [line for line in table if line.split()[:1] in (["TCP"], ["UDP"], ["SCTP"], ["FWM"])]
        if services:
            signs.append(f"{len(services)} IPVS virtual services in {proc_path}")
    return signs


def warn_if_ipvs(proc_path: str = IPVS_PROC) -> list[str]:
    """Log a warning when kube-proxy runs in IPVS mode here; returns the signs found."""
    signs = ipvs_signs(proc_path)
    if signs:
        log.warning(
            "kube-proxy appears to run in IPVS mode (%s): egress to a Service is judged against its "
            "ClusterIP, not the backend pod (IPVS rewrites after the egress hook); use kube-proxy's "
            "iptables or nftables mode for egress policies on pod selectors",
            ", ".join(signs),
            extra={"kube_proxy_ipvs": True},
        )
    return signs
