"""The control service lifts a node's `podfence.io/not-ready:NoSchedule` taint once that node's agent
has acknowledged its first version: a real control service and agent over gRPC on loopback, and
the test double of the API server (tests/kube_api_double.py) holding the Node."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

from agent.control.taint import NOT_READY_TAINT, TaintRemover
from tests.kube_api_double import KubeApiDouble
from tests.unit.control_helpers import Control, RecordingAgent, small_cluster, start_control, wait_until
from tests.unit.test_k8s_watch import api_client

NOT_READY = {"key": NOT_READY_TAINT, "effect": "NoSchedule"}
DEDICATED = {"key": "dedicated", "value": "gpu", "effect": "NoSchedule"}


def node_doc(name: str, taints: list[dict[str, Any]]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}, "spec": {"taints": taints}}


def taints(api: KubeApiDouble, node: str) -> list[dict[str, Any]]:
    return list(api.objects["Node"][("", node)]["spec"].get("taints") or [])


@pytest.fixture
def setup() -> Iterator[tuple[KubeApiDouble, Control, TaintRemover]]:
    with KubeApiDouble() as api:
        control = start_control(small_cluster())
        remover = TaintRemover(api_client(api.url), control.hub.metrics, request_timeout_seconds=0.5,
                               backoff_initial=0.05, backoff_max=0.2)
        control.hub.on_node_applied = remover.node_applied
        stop = threading.Event()
        threading.Thread(target=remover.run, args=(stop,), daemon=True).start()
        try:
            yield api, control, remover
        finally:
            stop.set()
            control.stop()


def count(control: Control, result: str) -> float:
    value = control.hub.metrics.registry.get_sample_value(
        "podfence_control_taint_removals_total", {"result": result})
    return value or 0.0


def test_the_taint_goes_once_the_agent_applied_its_first_version_and_only_that_taint(setup: Any) -> None:
    api, control, _ = setup
    api.upsert("Node", node_doc("n1", [DEDICATED, NOT_READY]))
    api.upsert("Node", node_doc("n2", [NOT_READY]))
    agent = RecordingAgent("n1", control.target).start()
    try:
        agent.wait_for_state(lambda s: s.version > 0, "the first version")
        wait_until(lambda: taints(api, "n1") == [DEDICATED], timeout=30, what="n1's not-ready taint removed")
        assert taints(api, "n2") == [NOT_READY], "n2's agent has applied nothing: its taint stays"
        (node, patch), = api.patches
        assert node == "n1" and patch[0] == {"op": "test", "path": "/spec/taints/1", "value": NOT_READY}
        assert count(control, "removed") == 1
    finally:
        agent.close()
    # A reconnect (a new stream, a new first ack) reads the node again and finds nothing to remove.
    again = RecordingAgent("n1", control.target).start()
    try:
        again.wait_for_state(lambda s: s.version > 0)
        wait_until(lambda: len([r for r in api.requests if r["kind"] == "Node"]) >= 3, timeout=30,
                   what="a second read")
        assert len(api.patches) == 1 and count(control, "removed") == 1
    finally:
        again.close()


def test_an_unreachable_api_server_is_retried_until_the_taint_is_gone(setup: Any) -> None:
    api, control, _ = setup
    api.upsert("Node", node_doc("n1", [NOT_READY]))
    api.unreachable.set()
    agent = RecordingAgent("n1", control.target).start()
    try:
        agent.wait_for_state(lambda s: s.version > 0)
        wait_until(lambda: count(control, "failed") >= 2, timeout=30, what="failed attempts")
        assert taints(api, "n1") == [NOT_READY]
        api.unreachable.clear()
        wait_until(lambda: taints(api, "n1") == [], timeout=30, what="the taint removed once the API answers")
    finally:
        agent.close()


def test_a_taint_changed_between_read_and_patch_is_not_removed_blindly(setup: Any) -> None:
    """The patch tests the taint at the index read first: an edit in between fails it (and the
    next attempt reads again), so another owner's taint at that index is never removed."""
    api, _, remover = setup
    api.upsert("Node", node_doc("n1", [NOT_READY]))
    original = api._node

    def edited_first(handler: Any, method: str, name: str) -> None:
        if method == "PATCH" and not getattr(edited_first, "done", False):
            edited_first.done = True  # type: ignore[attr-defined]
            api.objects["Node"][("", name)]["spec"]["taints"] = [DEDICATED, NOT_READY]
        original(handler, method, name)

    api._node = edited_first  # type: ignore[method-assign]
    assert remover.remove("n1") is False, "the test op fails: the taints moved"
    assert taints(api, "n1") == [DEDICATED, NOT_READY]
    assert remover.remove("n1") is True
    assert taints(api, "n1") == [DEDICATED]


def test_a_node_that_is_gone_is_done(setup: Any) -> None:
    _, _, remover = setup
    assert remover.remove("no-such-node") is True
