"""`podfence derive --istio DIR`: the NetworkPolicies an Istio configuration's routes imply."""

from __future__ import annotations

import argparse

from agent.derive.inputs import parse_selector, read_documents
from agent.derive.istio import derive_istio
from agent.derive.output import InForce, add_common_arguments, finish, load_policies, namespaces, run_guarded


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--istio",
        required=True,
        metavar="DIR",
        help="folder (or file) of Services, workloads and Istio configuration",
    )
    parser.add_argument(
        "--root-namespace",
        default="istio-system",
        help="Istio's root namespace, whose Sidecar/AuthorizationPolicy apply mesh-wide",
    )
    parser.add_argument(
        "--istiod",
        default="istio-system:app=istiod",
        metavar="NS:key=value",
        help="the istiod pods every proxy reaches on 15012; empty for none",
    )
    add_common_arguments(parser)


def _run(args: argparse.Namespace) -> int:
    documents = read_documents(args.istio)
    istiod = parse_selector(args.istiod, "--istiod") if args.istiod else None
    graph = derive_istio(documents, args.root_namespace, istiod, namespaces(args))
    in_force = load_policies(args.diff, "--diff") if args.diff else InForce()
    return finish(args, "derive", graph, in_force, mesh=True, extra={"unit": "declared connections"})


def run(args: argparse.Namespace) -> int:
    return run_guarded("derive", lambda: _run(args))
