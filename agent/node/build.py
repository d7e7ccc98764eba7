"""The dataplane the agent's flags describe, and where its state lives: `build_dataplane` turns
the parsed flags of `podfence agent` (main.py) into a BpfDataplane or an IptablesDataplane,
`bpffs_mount_of` checks that a pin directory is on a bpf filesystem, `generation_file` names the
file that keeps the last applied policy version across restarts (generation.py).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from agent.dataplane.base import Dataplane
from agent.node import generation

# Flags `--map-size-<map>` -> BpfSettings field; the map names are those of the
# podfence_map_capacity{map=...} metric. Unset flags keep the dataplane's defaults.
BPF_MAP_SIZE_FLAGS: dict[str, str] = {
    "ct": "ct_max",
    "policy": "policy_max",
    "ipcache": "ipcache_max",
    "cidr": "cidr_max",
    "endpoints": "endpoints_max",
    "node-ips": "node_ips_max",
    "frag": "frag_max",
}


def _dest(map_flag: str) -> str:
    return "map_size_" + map_flag.replace("-", "_")


def bpffs_mount_of(path: str, mountinfo: str = "/proc/self/mountinfo") -> str | None:
    """The bpf filesystem mount point that `path` lives under, or None."""
    target = os.path.abspath(path)
    try:
        lines = Path(mountinfo).read_text().splitlines()
    except OSError:
        return None
    # Mounts in order; a mount hides every earlier one at or below its mount point (as
    # `ip netns exec` remounting /sys hides /sys/fs/bpf). The longest visible one containing
    # `path` is where it lives.
    visible: dict[str, str] = {}
    for line in lines:
        fields = line.split()
        # id parent major:minor root mount-point options [optional...] - fstype source options
        if "-" not in fields:
            continue
        mount_point = fields[4].replace("\\040", " ")
        for hidden in [m for m in visible if _under(m, mount_point)]:
            del visible[hidden]
        visible[mount_point] = fields[fields.index("-") + 1]
    covering = max((m for m in visible if _under(target, m)), key=len, default=None)
    return covering if covering is not None and visible[covering] == "bpf" else None


def _under(path: str, mount_point: str) -> bool:
    return path == mount_point or path.startswith(mount_point.rstrip("/") + "/")


def build_dataplane(args: argparse.Namespace) -> Dataplane:
    if args.dataplane == "iptables":
        from agent.dataplane.iptables import IptablesDataplane

        bound = {} if args.flows_per_pod is None else {"flows_per_pod": args.flows_per_pod}
        return IptablesDataplane(
            unknown_endpoints=args.unknown_endpoints,
            established_on_change=args.established_on_change,
            flow_group=args.nflog_group,
            **bound,
        )
    from agent.dataplane.bpf import BpfDataplane
    from agent.dataplane.bpf.settings import BpfSettings

    options = vars(args)
    sizes: dict[str, Any] = {
        keyword: options[_dest(flag)]
        for flag, keyword in BPF_MAP_SIZE_FLAGS.items()
        if options[_dest(flag)] is not None
    }
    if args.event_rate is not None:
        sizes["event_rate"] = args.event_rate
    settings = BpfSettings(
        pin_dir=args.pin_dir,
        unknown_endpoints=args.unknown_endpoints,
        established_on_change=args.established_on_change,
        egress_hook=args.egress_hook,
        flows_per_pod=args.flows_per_pod,
        **sizes,
    )
    dataplane: Dataplane = BpfDataplane(settings)
    return dataplane


def generation_file(args: argparse.Namespace, dataplane: Dataplane) -> Path:
    """--generation-file, else beside the dataplane's state file (bpf: named after the pin
    directory, so two agents with their own pins in one /run keep their own), else per node in
    /run/podfence."""
    if args.generation_file:
        return Path(args.generation_file)
    state_file = getattr(dataplane, "state_file", None)
    if isinstance(state_file, Path):
        return generation.beside_state_file(state_file)
    return generation.per_node(dataplane.name, args.node)
