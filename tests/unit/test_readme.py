"""The settings and metrics tables of docs/ against the code, so the operator's reference cannot drift.

Settings: every flag of every command is documented once, with the environment variable the
parser really reads, its default and its choices; no documented flag is missing from the code.
Metrics: each process's table equals what its collectors expose (names, types, label names).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator, Mapping

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from agent.cli import ENV_PREFIX, build_parser
from agent.control.freshness import Freshness
from agent.control.metrics import ControlMetrics
from agent.dataplane.base import EndpointCounters
from agent.dataplane.bpf.settings import BpfSettings
from agent.dataplane.types import IPAddress, NodeState, Reason
from agent.node.build import BPF_MAP_SIZE_FLAGS
from agent.node.interfaces import HostView, Link
from agent.node.metrics import register_agent_metrics
from agent.node.reconcile import Reconciler
from tests.readme_tables import (
    backticked,
    documented_metrics,
    exposed_families,
    exposition_problems,
    metrics_tables,
    settings_tables,
)

NO_DEFAULT = "—"
# Agent flags whose argparse default is None because the bpf dataplane owns the default.
DATAPLANE_KNOBS = {f"--map-size-{flag}": keyword for flag, keyword in BPF_MAP_SIZE_FLAGS.items()} | {
    "--event-rate": "event_rate"
}


@pytest.fixture
def parsers(monkeypatch: pytest.MonkeyPatch) -> dict[str, argparse.ArgumentParser]:
    """Command ("" for bare `podfence`, "agent", "lab up", ...) -> its parser, built with no
    PODFENCE_* variable set so the defaults are the code's own."""
    for name in [n for n in os.environ if n.startswith(ENV_PREFIX)]:
        monkeypatch.delenv(name)
    parser, _ = build_parser()
    return dict(_walk("", parser))


def _walk(command: str, parser: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield command, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _walk(f"{command} {name}".strip(), sub)


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {
        flag: action
        for action in parser._actions
        if action.option_strings and action.dest != "help"
        for flag in action.option_strings
        if flag.startswith("--")
    }


def _expected_default(command: str, flag: str, action: argparse.Action) -> str:
    if action.required:
        return "required"
    if isinstance(action, argparse._StoreTrueAction):
        return "off"
    if action.default is None or action.default == []:
        if command == "agent" and flag in DATAPLANE_KNOBS:
            return str(getattr(BpfSettings(), DATAPLANE_KNOBS[flag]))
        return NO_DEFAULT
    return str(action.default)


def _documented_default(cell: str) -> str:
    quoted = backticked(cell)
    return quoted[0] if quoted else cell.strip()


def test_every_command_with_options_has_a_settings_table(parsers):
    tables = settings_tables()
    with_options = {command for command, parser in parsers.items() if _options(parser)}
    assert {"", "control", "agent"} <= with_options
    assert set(tables) == with_options


def test_settings_tables_match_the_parsers(parsers):
    problems = []
    for command, rows in settings_tables().items():
        options = _options(parsers[command])
        documented = [backticked(row["flag"])[0].split()[0] for row in rows]
        label = f"podfence {command}".strip()
        if len(set(documented)) != len(documented):
            problems.append(f"{label}: a flag is documented twice: {sorted(documented)}")
        problems += [f"{label}: {flag} is not documented" for flag in sorted(set(options) - set(documented))]
        problems += [f"{label}: {flag} does not exist" for flag in sorted(set(documented) - set(options))]
        for flag, row in zip(documented, rows, strict=True):
            action = options.get(flag)
            if action is None:
                continue
            env = ENV_PREFIX + action.dest.upper()  # what _EnvDefaultsParser reads
            if backticked(row["environment"]) != [env]:
                problems.append(f"{label} {flag}: environment {row['environment']!r}, the code reads {env}")
            expected = _expected_default(command, flag, action)
            if _documented_default(row["default"]) != expected:
                problems.append(f"{label} {flag}: default {row['default']!r}, the code's is {expected!r}")
            missing = [c for c in action.choices or () if f"`{c}`" not in row["meaning"] + row["default"]]
            if missing:
                problems.append(f"{label} {flag}: choices {missing} not documented")
    assert not problems, "\n".join(problems)


def test_the_table_reader_sees_a_wrong_default():
    """The check above can fail: a settings page with a wrong default yields a different value."""
    text = (
        "# Settings\n\n## `podfence agent`\n\n"
        "| flag | environment | default | meaning |\n|---|---|---|---|\n"
        "| `--dataplane KIND` | `PODFENCE_DATAPLANE` | `iptables` | x |\n\nprose\n\n| a |\n|---|\n| b |\n"
    )
    rows = settings_tables(text)["agent"]
    assert len(rows) == 1 and _documented_default(rows[0]["default"]) == "iptables"


# --- metrics ---------------------------------------------------------------------------------------


class FullFeaturedDataplaneDouble:
    """Every optional feature the agent's collector reads (as the bpf dataplane has)."""

    name = "double"

    def start(self) -> None:
        pass

    def apply(self, state: NodeState) -> None:
        pass

    def counters(self) -> list[EndpointCounters]:
        return [EndpointCounters("ns/a", "ingress", 3, 300, 1, 60)]

    def drop_reason_counts(self) -> Mapping[str, int]:
        return {"policy": 1}

    def map_usage(self) -> Mapping[str, tuple[int, int]]:
        return {"policy": (3, 1024)}

    def events_lost(self) -> int:
        return 0

    def close(self) -> None:
        pass

    def teardown(self) -> None:
        pass


class NoInterfacesDouble:
    def scan(self) -> HostView:
        return HostView(links={}, node_ips=(), uplinks=frozenset(), pod_interfaces=frozenset())

    def scan_links(self) -> dict[int, Link]:
        return dict(self.scan().links)

    def resolve(self, ip: IPAddress, view: HostView) -> int | None:
        return None

    def mac_of(self, ifindex: int, view: HostView) -> str | None:
        return None


class Connected:
    connected = True


def test_agent_metrics_table_is_what_the_agent_exposes():
    registry = CollectorRegistry()
    dataplane = FullFeaturedDataplaneDouble()
    register_agent_metrics(registry, dataplane, Reconciler(dataplane, NoInterfacesDouble()), Connected())
    scrape = generate_latest(registry).decode()
    documented = documented_metrics()["agent"]
    assert exposition_problems(documented, scrape) == []
    exposed = exposed_families(scrape) | exposed_families(scrape, "process_")  # process_*: every process
    assert exposed == {metric.family for metric in documented}


def test_control_metrics_table_is_what_the_control_service_exposes():
    registry = CollectorRegistry()
    metrics = ControlMetrics(registry)
    metrics.watch_hub(lambda: (7, {"node-a": (6, True)}))
    metrics.watch_freshness(lambda: Freshness("kubernetes", 3.0, False, 270.0))  # --source kubernetes
    scrape = generate_latest(registry).decode()
    documented = documented_metrics()["control"]
    assert exposition_problems(documented, scrape) == []
    exposed = exposed_families(scrape) | exposed_families(scrape, "process_")  # process_*: every process
    assert exposed == {metric.family for metric in documented}


def test_documented_drop_reasons_are_the_datapath_list():
    rows = {row["metric"]: row for row in metrics_tables()["agent"]}
    reasons = backticked(rows["`podfence_drops_total`"]["meaning"])
    assert reasons == [reason.name.lower() for reason in Reason if reason is not Reason.ALLOWED]


def test_exposition_check_reports_wrong_type_and_labels():
    registry = CollectorRegistry()
    ControlMetrics(registry).watch_hub(lambda: (7, {"node-a": (6, True)}))
    scrape = generate_latest(registry).decode()
    wrong = documented_metrics(
        "# Metrics\n\n## `podfence control`\n\n| metric | type | labels | meaning |\n|---|---|---|---|\n"
        "| `podfence_control_invalid_objects` | counter | — | x |\n"
        "| `podfence_control_node_lag_versions` | gauge | `nodename` | x |\n"
        "| `podfence_control_nothing` | gauge | — | x |\n"
    )["control"]
    problems = exposition_problems(wrong, scrape)
    assert len(problems) == 3, problems
