"""A policy a node cannot hold reaches `podfence status` through the node's ack (real gRPC over
loopback; the agent's dataplane is the RecordingAgent's apply, its rejections a list)."""

from __future__ import annotations

import argparse
import io
import json
import threading
from contextlib import redirect_stdout

from agent.control import status as status_cmd
from agent.node.sync import SyncClient
from tests.unit.control_helpers import allow_from, small_cluster, start_control, wait_until

MESSAGE = "tenant-a/huge: rejected, it needs about 192 entries of pf_policy, more than this node has room for"


def status(target: str, as_json: bool = True) -> str:
    out = io.StringIO()
    args = argparse.Namespace(control=target, json=as_json, insecure=False, tls_cert=None, tls_key=None,
                              tls_ca=None, timeout=5.0)
    with redirect_stdout(out):
        assert status_cmd.run(args) == 0
    return out.getvalue()


def test_rejected_policies_ride_the_ack_into_status_and_leave_with_the_next_clean_ack() -> None:
    control = start_control(small_cluster())
    rejected = [MESSAGE]
    applied: list[int] = []
    client = SyncClient("n1", control.target, lambda state: applied.append(state.version),
                        backoff_initial=0.05, backoff_max=0.3, rejections=lambda: list(rejected))
    stop = threading.Event()
    thread = threading.Thread(target=client.run, args=(stop,), daemon=True)
    thread.start()
    try:
        wait_until(lambda: json.loads(status(control.target))["nodes"].get("n1", {}).get(
            "rejected_policies") == [MESSAGE], what="the rejection in status")
        node = json.loads(status(control.target))["nodes"]["n1"]
        assert node["applied_version"] == control.hub.version and node["last_error"] is None
        assert f"n1: policy {MESSAGE}" in status(control.target, as_json=False)

        rejected.clear()  # the offender was fixed: the next version fits
        with control.hub.change() as resolver:
            resolver.upsert(allow_from("web-from-client", "web", "client", 9090))
        wait_until(lambda: "rejected_policies" not in json.loads(status(control.target))["nodes"]["n1"],
                   what="the rejection gone")
        assert "rejected" not in status(control.target, as_json=False)
    finally:
        stop.set()
        thread.join(timeout=5)
        control.stop()
