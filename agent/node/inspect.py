"""`podfence inspect`: one pod's allow lists and counters as this node's kernel holds them.

Runs on the node (root, the host's network namespace and /sys/fs/bpf), beside the agent: it reads
the pinned maps (bpf) or the chains and ipsets (iptables) back, never the control service's view,
and says where the kernel differs from what the agent recorded it programmed (the bpf state file;
the iptables dataplane keeps no record but the kernel, see agent/dataplane/iptables/readback.py).
Read-only: nothing is written.

`podfence status` asks the control service and `podfence explain` the reference evaluator; the
import contracts keep both away from the kernel, hence a command of the node's own.

Exit codes: 0 the kernel holds what was recorded, 1 it differs or could not be read, 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from agent.dataplane.base import DataplaneError
from agent.dataplane.readback import EndpointReadback, format_readback

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
DEFAULT_PIN_DIR = "/sys/fs/bpf/podfence"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pod", required=True, metavar="NS/NAME", help="the pod (endpoint) to read back")
    parser.add_argument(
        "--dataplane",
        choices=["auto", "bpf", "iptables"],
        default="auto",
        help="whose kernel state to read (auto: bpf when its pinned maps exist, else iptables)",
    )
    parser.add_argument("--pin-dir", default=DEFAULT_PIN_DIR, help="bpffs directory of the pinned state")
    parser.add_argument(
        "--state-file",
        default=None,
        help="the bpf dataplane's state file (default: /run/podfence/<pin dir name>.bpf-state.json)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _dataplane(args: argparse.Namespace) -> str:
    if args.dataplane != "auto":
        return str(args.dataplane)
    return "bpf" if (Path(args.pin_dir) / "pf_endpoints").exists() else "iptables"


def read(args: argparse.Namespace) -> EndpointReadback:
    """The read-back of --pod from the chosen dataplane (raises DataplaneError, LookupError)."""
    if _dataplane(args) == "bpf":
        from agent.dataplane.bpf import readback as bpf_readback
        from agent.dataplane.bpf.settings import BpfSettings

        settings = BpfSettings(pin_dir=args.pin_dir, state_file=args.state_file)
        return bpf_readback.read_endpoint(args.pin_dir, settings.state_path, args.pod)
    from agent.dataplane.iptables import readback as iptables_readback

    return iptables_readback.read_endpoint(args.pod)


def run(args: argparse.Namespace) -> int:
    if args.pod.count("/") != 1 or not all(args.pod.split("/")):
        print(f"podfence inspect: --pod {args.pod!r}: expected NAMESPACE/NAME", file=sys.stderr)
        return EXIT_USAGE
    try:
        readback = read(args)
    except (DataplaneError, LookupError, OSError, ImportError) as error:
        print(f"podfence inspect: {error}", file=sys.stderr)
        return EXIT_FAILURE
    if args.json:
        print(json.dumps(readback.to_json(), indent=2))
    else:
        print(format_readback(readback))
    return EXIT_FAILURE if readback.differences else EXIT_OK
