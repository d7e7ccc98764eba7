"""The `podfence` command line: control, agent, status, observe, explain, inspect, derive, lab, ...

Every flag can also be set through a PODFENCE_<FLAG> environment variable (dashes become
underscores), so manifests configure podfence with env vars. Exit codes: 0 success,
1 runtime failure, 2 bad usage or bad input.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
ENV_PREFIX = "PODFENCE_"


class _EnvDefaultsParser(argparse.ArgumentParser):
    """argparse that takes each option's default from PODFENCE_<OPTION> when set."""

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:  # type: ignore[override]
        action = super().add_argument(*args, **kwargs)
        if action.option_strings and action.dest != "help":
            env_name = ENV_PREFIX + action.dest.upper()
            raw = os.environ.get(env_name)
            if raw is not None:
                if isinstance(action, argparse._StoreTrueAction):
                    action.default = raw.strip().lower() in ("1", "true", "yes", "on")
                else:
                    action.default = action.type(raw) if callable(action.type) else raw
                action.required = False
        return action


def env_name(flag: str) -> str:
    """The environment variable that sets `flag` (e.g. --node -> PODFENCE_NODE)."""
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


# Each subcommand: (help, module that defines `add_arguments(parser)` and `run(args) -> int`).
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "control": ("run the control service (policy source -> per-node gRPC streams)", "agent.control.main"),
    "agent": ("run the node agent (gRPC stream -> kernel filters)", "agent.node.main"),
    "status": ("print the control service's view of every node", "agent.control.status"),
    "observe": ("print every node's flows with their verdict and deciding rule", "agent.control.observe"),
    "explain": ("evaluate one connection with the reference evaluator", "agent.policy.explain"),
    "inspect": ("a pod's allow lists and counters as this node's kernel holds them", "agent.node.inspect"),
    "derive": ("NetworkPolicies from an Istio configuration's routes", "agent.derive.derive_main"),
    "suggest": ("least-privilege NetworkPolicies from observed flow records", "agent.derive.suggest_main"),
    "lab": ("build or tear down simulated nodes on this machine", "agent.lab.cli"),
    "demo": ("run the bookinfo demo on the node lab", "agent.lab.demo"),
    "teardown": ("remove podfence's kernel state from this node (agent stopped)", "agent.node.teardown"),
}


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Callable[[argparse.Namespace], int]]]:
    parser = _EnvDefaultsParser(prog="podfence", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--log-format", default="text", choices=["text", "json"])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_EnvDefaultsParser)
    runners: dict[str, Callable[[argparse.Namespace], int]] = {}
    for name, (help_text, module_name) in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(sub_parser)
        runners[name] = module.run
    return parser, runners


def main(argv: Sequence[str] | None = None) -> int:
    parser, runners = build_parser()
    args = parser.parse_args(argv)
    from agent.logs import setup_logging

    setup_logging(args.log_level, args.log_format)
    try:
        return runners[args.command](args)
    except KeyboardInterrupt:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
