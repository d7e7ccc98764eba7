"""br_netfilter for bridged pods, the same for both dataplanes.

A pod on a Linux bridge talks to its neighbours without routing: its IP packets reach FORWARD
(the egress verdict of both dataplanes, after DNAT) only when br_netfilter hands bridged
frames to iptables and ip6tables (kube-proxy needs the same). VLAN-tagged frames skip those
hooks unless bridge-nf-filter-vlan-tagged is on: a pod could tag its traffic (VLAN 0 included,
which the receiving pod's kernel takes as untagged) and so pass its own egress verdict. With it
on, a tagged IP frame is judged like any other. The switches are per network namespace.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from agent.dataplane.base import PermanentDataplaneError
from agent.dataplane.netns import inside

SYSCTLS = ("bridge-nf-call-iptables", "bridge-nf-call-ip6tables", "bridge-nf-filter-vlan-tagged")
_SYSCTL_DIR = Path("/proc/sys/net/bridge")


def enable(netns: str | None = None) -> None:
    """Turn the switches on in `netns` (None: the agent's own namespace); raise
    PermanentDataplaneError if one cannot be: bridged pods would pass unjudged."""
    # A module of a kernel that builds br_netfilter in, or one already loaded: nothing to do.
    subprocess.run(["modprobe", "br_netfilter"], capture_output=True, check=False)
    with inside(netns):
        for name in SYSCTLS:
            path = _SYSCTL_DIR / name
            try:
                if path.read_text().strip() != "1":
                    path.write_text("1\n")
            except OSError as exc:
                raise PermanentDataplaneError(f"bridged pod interfaces need br_netfilter ({path})") from exc
