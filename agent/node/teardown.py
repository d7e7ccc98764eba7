"""`podfence teardown`: remove what podfence put into this node's kernel.

Enforcement outlives the agent on purpose (pinned maps, tc filters, netfilter links, iptables
and ebtables-nft chains and ipsets stay when the agent exits or its DaemonSet is deleted), so a
node is never left open by a crash or an upgrade. This removes it, and only it: never another tool's filters,
rules or sets, never `clsact` itself. Stop the agent first: a running agent puts its hooks back.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from agent.dataplane import xtables
from agent.dataplane.base import DataplaneError
from agent.node import generation

EXIT_OK, EXIT_FAILURE = 0, 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dataplane",
        choices=["bpf", "iptables", "all"],
        default="all",
        help="whose state to remove (default: both dataplanes')",
    )
    parser.add_argument(
        "--pin-dir", default="/sys/fs/bpf/podfence", help="bpffs directory of the pinned state"
    )


def run(args: argparse.Namespace) -> int:
    failed = False
    if args.dataplane in ("bpf", "all"):
        from agent.dataplane.bpf import BpfDataplane
        from agent.dataplane.bpf.settings import BpfSettings

        try:
            settings = BpfSettings(pin_dir=args.pin_dir)
            BpfDataplane(settings).teardown()
            generation.beside_state_file(settings.state_path).unlink(missing_ok=True)
            print(f"podfence teardown: removed the bpf dataplane's filters, hooks and pins ({args.pin_dir})")
        except (DataplaneError, ImportError, OSError) as exc:
            print(f"podfence teardown: bpf dataplane: {exc}", file=sys.stderr)
            failed = True
    if args.dataplane in ("iptables", "all"):
        tools = (*xtables.IPTABLES.values(), "ipset")
        if args.dataplane == "all" and not all(shutil.which(tool) for tool in tools):
            return EXIT_FAILURE if failed else EXIT_OK  # the iptables dataplane never ran here
        from agent.dataplane.iptables import IptablesDataplane

        try:
            IptablesDataplane().teardown()
            for path in Path(generation.GENERATION_DIR).glob(generation.per_node("iptables", "*").name):
                path.unlink(missing_ok=True)
            print("podfence teardown: removed the iptables dataplane's chains (bridge family's too) and sets")
        except (DataplaneError, ImportError, OSError) as exc:
            print(f"podfence teardown: iptables dataplane: {exc}", file=sys.stderr)
            failed = True
    return EXIT_FAILURE if failed else EXIT_OK
