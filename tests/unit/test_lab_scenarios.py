"""Scenario files for `podfence lab up --pods` (parsing only, no root needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.cli import main
from agent.lab.machine import LabError
from agent.lab.scenarios import pods_from_file
from agent.lab.topology import Protocol, ServerPort


def test_pods_file_gives_nodes_labels_and_ports(tmp_path: Path) -> None:
    scenario = tmp_path / "pods.yaml"
    scenario.write_text(
        "pods:\n"
        "- {namespace: shop, name: web, node: node2, labels: {app: web}, ports: [80/TCP, 53/udp, 9/SCTP]}\n"
        "- {namespace: shop, name: db, labels: {app: db}, ports: ['5432']}\n"
    )
    web, db = pods_from_file(scenario, node_count=2)
    assert (web.key, web.node, web.labels) == ("shop/web", "node2", {"app": "web"})
    assert web.ports == (ServerPort(80), ServerPort(53, Protocol.UDP), ServerPort(9, Protocol.SCTP))
    assert db.node == "node2"  # unplaced pods alternate over the nodes by position
    assert db.ports == (ServerPort(5432, Protocol.TCP),)
    assert web.ports[0].name == "serve-80-tcp"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("pods:\n- {namespace: a, name: b, ports: [80/ICMP]}\n", "bad port '80/ICMP'"),
        ("pods:\n- {name: b}\n", "pods[0]: missing or bad field 'namespace'"),
        ("pods: [\n", "cannot read"),
    ],
)
def test_bad_scenarios_are_rejected_with_the_field(tmp_path: Path, text: str, message: str) -> None:
    scenario = tmp_path / "pods.yaml"
    scenario.write_text(text)
    with pytest.raises(LabError, match=message.replace("[", r"\[").replace("]", r"\]")):
        pods_from_file(scenario, node_count=2)


def test_lab_up_with_a_bad_scenario_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    scenario = tmp_path / "pods.yaml"
    scenario.write_text("pods:\n- {name: b}\n")
    assert main(["lab", "up", "--pods", str(scenario)]) == 2
    assert "namespace" in capsys.readouterr().err
