"""`podfence suggest --flows FILE.jsonl --source DIR`: least-privilege policies from observed flows."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from agent.derive.flows import Options, observe, read_flows
from agent.derive.inputs import InputError
from agent.derive.output import (
    InForce,
    add_common_arguments,
    dns_target,
    finish,
    load_policies,
    namespaces,
    run_guarded,
)
from agent.model.load import load_file, load_folder
from agent.policy.state import ClusterState


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--flows",
        required=True,
        metavar="FILE.jsonl",
        help="flow records as `podfence observe -o jsonl` prints them; - for stdin",
    )
    parser.add_argument(
        "--source",
        required=True,
        metavar="DIR",
        help="the cluster's Namespaces, Pods (and current NetworkPolicies), as for `podfence control`",
    )
    parser.add_argument(
        "--label-keys",
        metavar="KEY[,KEY]",
        help="select workloads on these pod labels only (default: every label but "
        "per-revision ones such as pod-template-hash)",
    )
    parser.add_argument(
        "--min-count", type=int, default=1, metavar="N", help="leave out connections seen fewer times"
    )
    parser.add_argument(
        "--prefix-length",
        type=int,
        default=24,
        metavar="N",
        help="aggregate IPv4 peers outside the cluster to networks of this many bits",
    )
    parser.add_argument(
        "--prefix-length-v6", type=int, default=64, metavar="N", help="the same for IPv6 peers"
    )
    add_common_arguments(parser)


def _run(args: argparse.Namespace) -> int:
    if not 0 <= args.prefix_length <= 32 or not 0 <= args.prefix_length_v6 <= 128:
        raise InputError("--prefix-length must be 0-32 and --prefix-length-v6 0-128")
    if args.min_count < 1:
        raise InputError("--min-count must be at least 1")
    source = Path(args.source)
    if not source.exists():
        raise InputError(f"--source {args.source}: no such file or directory")
    loaded = load_folder(source) if source.is_dir() else load_file(source)
    warnings = [f"--source: ignored invalid object: {e}" for e in loaded.errors]
    state = ClusterState.from_objects(loaded.objects)
    if args.flows == "-":
        records = read_flows(sys.stdin, "<stdin>")
    else:
        try:
            with open(args.flows, encoding="utf-8") as stream:
                records = read_flows(stream, args.flows)
        except OSError as exc:
            raise InputError(f"--flows {args.flows}: {exc.strerror or exc}") from None
        except UnicodeDecodeError:
            raise InputError(f"--flows {args.flows}: not UTF-8 text") from None
    keys = frozenset(k.strip() for k in args.label_keys.split(",") if k.strip()) if args.label_keys else None
    options = Options(keys, namespaces(args), args.min_count, args.prefix_length, args.prefix_length_v6)
    observation = observe(records, state, options, dns_target(args))
    in_force = InForce.from_objects(loaded.objects, warnings)
    if args.diff:
        # The folder's policies replace the current ones; its ClusterNetworkPolicies too, if any.
        diff = load_policies(args.diff, "--diff")
        in_force.policies, in_force.warnings = diff.policies, warnings + diff.warnings
        in_force.cluster = diff.cluster or in_force.cluster
    extra = {
        "unit": "observed connections",
        "flow_records": observation.flows,
        "excluded": observation.excluded,
    }
    return finish(args, "suggest", observation.graph, in_force, mesh=False, extra=extra)


def run(args: argparse.Namespace) -> int:
    return run_guarded("suggest", lambda: _run(args))
