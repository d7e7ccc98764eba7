"""`podfence lab`: build, inspect, probe and tear down the node lab from a shell.

    podfence lab up [--nodes 2] [--mode routed|bridged] [--pods FILE] [--podfence bpf|iptables]
    podfence lab probe [--port 80] [--protocol TCP] [--to service|pod]
    podfence lab down

`up` leaves the lab running (pod servers in the background) and records it under /run/podfence-lab;
`down` removes every lab namespace, root-netns link and route, pin directory and lab process,
also after a crash.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from agent.lab.cluster import DATAPLANES, PodfenceOnLab
from agent.lab.machine import DEFAULT_LOCK_WAIT_S, RUN_DIR, LabError, teardown
from agent.lab.prober import PROTOCOLS, Endpoint, probe_table
from agent.lab.scenarios import pods_from_file, upstream_pods
from agent.lab.topology import CniMode, Lab, LabPod

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--lock-wait",
        type=float,
        default=DEFAULT_LOCK_WAIT_S,
        help="seconds to wait while another process uses the lab (default %(default)s)",
    )
    actions = parser.add_subparsers(dest="lab_action", required=True)
    up = actions.add_parser("up", help="build simulated nodes and pods")
    up.add_argument("--nodes", type=int, default=2, help="number of nodes (default %(default)s)")
    up.add_argument("--mode", choices=[m.value for m in CniMode], default=CniMode.ROUTED.value)
    up.add_argument("--ipv6", action="store_true", help="dual-stack: IPv6 addresses and Services too")
    up.add_argument("--pods", type=Path, help="scenario YAML (default: the 9 upstream e2e pods)")
    up.add_argument(
        "--podfence",
        choices=DATAPLANES,
        help="also start the control service and an agent per node with this dataplane",
    )
    up.add_argument(
        "--source",
        type=Path,
        default=RUN_DIR / "source",
        help="with --podfence: the folder source to watch (default %(default)s); drop policies in it",
    )
    probe = actions.add_parser("probe", help="print the reachability matrix of the running lab")
    probe.add_argument("--port", type=int, default=80)
    probe.add_argument("--protocol", choices=PROTOCOLS, default="TCP")
    probe.add_argument(
        "--to", choices=["service", "pod"], default="service", help="probe ClusterIPs or pod IPs"
    )
    probe.add_argument("--timeout", type=float, default=1.0)
    probe.add_argument("--family", choices=["4", "6"], default="4", help="IPv4 or (dual-stack labs) IPv6")
    actions.add_parser("down", help="remove everything any lab created")


def lab_address(pod: LabPod, to: str, family: str) -> str:
    """The address a probe aims at: the pod's Service ClusterIP or its own IP, in one family."""
    if family == "6":
        address = pod.service_ip6 if to == "service" else pod.ip6
        if address is None:
            raise LabError(f"pod {pod.key} has no IPv6 address")
        return address
    return pod.service_ip if to == "service" else pod.ip


def run(args: argparse.Namespace) -> int:
    try:
        if args.lab_action == "up":
            if args.nodes < 1 or args.nodes > 200:
                print("podfence lab up: --nodes must be between 1 and 200", file=sys.stderr)
                return EXIT_USAGE
            try:
                pods = pods_from_file(args.pods, args.nodes) if args.pods else upstream_pods(args.nodes)
            except LabError as err:
                print(f"podfence lab up: {err}", file=sys.stderr)
                return EXIT_USAGE  # a bad scenario file is bad input, not a runtime failure
            lab = Lab(node_count=args.nodes, mode=CniMode(args.mode), ipv6=args.ipv6)
            lab.build(pods, lock_wait_seconds=args.lock_wait)
            for pod in lab.pods.values():
                ports = " ".join(f"{p.port}/{p.protocol.value}" for p in pod.spec.ports)
                v6 = f" pod6 {pod.ip6} service6 {pod.service_ip6}" if pod.ip6 else ""
                print(
                    f"{pod.key:20} {pod.spec.node:8} pod {pod.ip:14} service {pod.service_ip:14} {ports}{v6}"
                )
            print(
                f"lab up: {len(lab.nodes)} nodes ({lab.mode.value}), {len(lab.pods)} pods; "
                f"control service address {lab.control_address}"
            )
            if args.podfence:
                podfence = PodfenceOnLab(lab, args.podfence, source_dir=args.source)
                try:
                    podfence.start()
                except LabError:
                    teardown(args.lock_wait)
                    raise
                print(
                    f"podfence: {args.podfence} agents on every node, folder source {args.source}; "
                    f"try: podfence status --control {podfence.control_address} --json"
                )
            return EXIT_OK
        if args.lab_action == "probe":
            lab = Lab.load()
            if args.family == "6" and not lab.ipv6:
                print("podfence lab probe: this lab has no IPv6 (build it with --ipv6)", file=sys.stderr)
                return EXIT_USAGE
            endpoints = [
                Endpoint(p.key, p.netns, lab_address(p, args.to, args.family)) for p in lab.pods.values()
            ]
            table = probe_table(endpoints, endpoints, args.port, args.protocol, args.timeout)
            print(table.render(f"{args.protocol}/{args.port} to {args.to} (. allowed, X blocked):"))
            return EXIT_OK
        removed = teardown(args.lock_wait)
        print(f"lab down: removed {len(removed)} objects")
        return EXIT_OK
    except LabError as err:
        print(f"podfence lab {args.lab_action}: {err}", file=sys.stderr)
        return EXIT_FAILURE
