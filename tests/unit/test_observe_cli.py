"""`podfence observe` against a real control service on loopback, fed by a real Sync stream."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from agent.cli import build_parser
from agent.control import observe as observe_cmd
from agent.control.observe_service import ObserveSettings
from agent.dataplane.flows import FlowVerdict
from tests.unit.control_helpers import TestCA, small_cluster, start_control, wait_until
from tests.unit.test_flow_observe import OPEN, Node, flow, stored

REPO = Path(__file__).resolve().parents[2]
# The contract of docs/design.md: these keys, with these meanings, never change.
CONTRACT_KEYS = {"time", "node", "protocol", "source", "destination", "direction", "verdict", "policy",
                 "reason"}
SIDE_KEYS = {"namespace", "pod", "ip", "port"}


def run_cli(*argv: str) -> tuple[int, str, str]:
    parser, runners = build_parser()
    args = parser.parse_args(["observe", *argv])
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = runners["observe"](args)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def fed():
    """A control service holding four records of node n1."""
    ctl = start_control(small_cluster(), observe=OPEN)
    node = Node("n1", ctl.target)
    node.buffer.sink(flow(port=8080))
    node.buffer.sink(flow(port=9090, verdict=FlowVerdict.DENIED))
    node.buffer.sink(flow(port=53, protocol=17, verdict=FlowVerdict.AUDIT_DENIED, destination="198.51.100.1",
                          endpoint="shop/client-1", policy="shop/dns-staged"))
    node.buffer.sink(flow(port=0, protocol=1, source="192.0.2.9"))
    stored(ctl, 4)
    yield ctl
    node.close()
    ctl.stop()


def test_jsonl_prints_one_contract_object_per_flow(fed):
    code, out, err = run_cli("--control", fed.target, "-o", "jsonl")
    assert code == 0, err
    flows = [json.loads(line) for line in out.splitlines()]
    assert [f["destination"]["port"] for f in flows] == [8080, 9090, 53, None]  # ICMP: no port
    for f in flows:
        assert f.keys() >= CONTRACT_KEYS and SIDE_KEYS == f["source"].keys() == f["destination"].keys()
        assert f["node"] == "n1" and f["time"].endswith("Z")
    allowed, denied, audit, icmp = flows
    assert allowed["source"] == {"namespace": "shop", "pod": "client-1", "ip": "10.0.1.11", "port": 40000}
    assert allowed["destination"] == {"namespace": "shop", "pod": "web-1", "ip": "10.0.1.10", "port": 8080}
    assert (allowed["protocol"], allowed["verdict"], allowed["policy"], allowed["reason"]) == (
        "TCP", "allowed", "shop/web-from-client", None)
    assert (denied["verdict"], denied["reason"]) == ("denied", "policy")
    assert denied["rule"] == "isolated, no rule matched"
    assert (audit["protocol"], audit["verdict"]) == ("UDP", "audit-denied")
    assert audit["policy"] == "shop/dns-staged"
    assert audit["destination"] == {"namespace": None, "pod": None, "ip": "198.51.100.1", "port": 53}
    assert icmp["protocol"] == "ICMP" and icmp["icmp"] == {"type": 40000, "code": 0}


def test_json_prints_one_array_and_filters_apply(fed):
    code, out, _ = run_cli("--control", fed.target, "-o", "json", "--verdict", "denied,audit-denied",
                           "--from", "shop/client-1")
    assert code == 0
    assert [f["destination"]["port"] for f in json.loads(out)] == [9090, 53]
    code, out, _ = run_cli("--control", fed.target, "-o", "json", "--protocol", "udp", "--port", "53")
    assert [f["verdict"] for f in json.loads(out)] == ["audit-denied"]
    code, out, _ = run_cli("--control", fed.target, "-o", "json", "--last", "1")
    assert [f["protocol"] for f in json.loads(out)] == ["ICMP"]
    code, out, _ = run_cli("--control", fed.target, "-o", "json", "--policy", "shop/web-from-client",
                           "--to", "shop/web-1", "--node", "n1", "--namespace", "shop", "--pod", "shop/web-1")
    assert [f["protocol"] for f in json.loads(out)] == ["TCP", "TCP", "ICMP"]


def test_the_table_shows_time_node_peers_protocol_verdict_and_deciding_rule(fed):
    code, out, _ = run_cli("--control", fed.target)
    assert code == 0
    header, *rows = out.splitlines()
    assert header.split() == ["TIME", "NODE", "SOURCE", "DESTINATION", "PROTO", "VERDICT", "DECIDED", "BY"]
    assert len(rows) == 4
    assert rows[0].split()[1:] == ["n1", "shop/client-1:40000", "->", "shop/web-1:8080", "TCP", "allowed",
                                   "networkpolicy/shop/web-from-client/ingress[0]"]
    assert "198.51.100.1:53" in rows[2] and "audit-denied" in rows[2]
    assert rows[3].split()[2:5] == ["192.0.2.9", "->", "shop/web-1"]  # ICMP: no ports


@pytest.mark.parametrize("argv", [
    ["--since", "five minutes"], ["--verdict", "maybe"], ["--protocol", "gre2"], ["--port", "70000"],
    ["--pod", "web-1"], ["--follow", "-o", "json"], ["--last", "-1"], ["--tls-ca", "x.pem", "--insecure"],
])
def test_bad_usage_exits_2(fed, argv):
    code, _, err = run_cli("--control", fed.target, *argv)
    assert code == 2 and "podfence observe:" in err


def test_a_filter_the_service_refuses_exits_2(fed):
    code, _, err = run_cli("--control", fed.target, "--from", "not an address")
    assert code == 2 and "INVALID_ARGUMENT" in err


def test_an_unreachable_or_refusing_control_service_exits_1():
    code, _, err = run_cli("--control", "127.0.0.1:1", "--timeout", "0.5")
    assert code == 1 and "unreachable" in err
    ctl = start_control(small_cluster())  # plaintext, observe not opened to anyone
    try:
        code, _, err = run_cli("--control", ctl.target)
        assert code == 1 and "UNAUTHENTICATED" in err
    finally:
        ctl.stop()


def test_with_mutual_tls_an_allowed_certificate_observes(tmp_path):
    ca = TestCA()
    ctl = start_control(small_cluster(), addr="localhost:0", tls=ca.server_tls(),
                        observe=ObserveSettings(allowed=("flow-reader",)))
    issued = ca.issue("flow-reader")
    for name, data in (("ca.pem", ca.pem), ("cert.pem", issued.cert), ("key.pem", issued.key)):
        (tmp_path / name).write_bytes(data)
    try:
        code, out, err = run_cli("--control", f"localhost:{ctl.port}", "--tls-ca", str(tmp_path / "ca.pem"),
                                 "--tls-cert", str(tmp_path / "cert.pem"),
                                 "--tls-key", str(tmp_path / "key.pem"), "-o", "json")
        assert (code, json.loads(out)) == (0, []), err
    finally:
        ctl.stop()


@pytest.mark.parametrize(("text", "seconds"), [("30s", 30), ("5m", 300), ("2h", 7200), ("1d", 86400),
                                               ("90", 90), ("1.5m", 90), ("250ms", 0.25)])
def test_durations(text, seconds):
    assert observe_cmd.parse_duration(text) == pytest.approx(seconds)


def test_follow_prints_new_flows_until_interrupted(fed):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "observe", "--control", fed.target, "--follow", "-o", "jsonl",
         "--verdict", "denied", "--since", "1h"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO,
    )
    try:
        assert process.stdout is not None
        first = json.loads(process.stdout.readline())  # the stored denied flow
        assert first["destination"]["port"] == 9090
        wait_until(lambda: fed.metrics.registry.get_sample_value("podfence_control_flow_readers") == 1,
                   what="the CLI's reader")
        node = Node("n2", fed.target)
        try:
            node.buffer.sink(flow(port=7070, verdict=FlowVerdict.DENIED, destination="10.0.2.10",
                                  endpoint="shop/web-2"))
            node.buffer.sink(flow(port=7071))  # allowed: filtered out
            live = json.loads(process.stdout.readline())
        finally:
            node.close()
        assert live["node"] == "n2"
        assert (live["destination"]["pod"], live["destination"]["port"]) == ("web-2", 7070)
        process.send_signal(signal.SIGINT)
        assert process.wait(10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _control_usage(tmp_path: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent.cli", "control", "--source", str(tmp_path), *flags],
                          capture_output=True, text=True, timeout=60, cwd=REPO)


@pytest.mark.parametrize(("flags", "says"), [
    (["--insecure", "--flow-ring", "0"], "--flow-ring must be at least 1"),
    (["--insecure", "--observe-allow", "monitoring/flow-ui/extra"], "NAMESPACE/NAME"),
])
def test_control_refuses_bad_observe_settings(tmp_path, flags, says):
    done = _control_usage(tmp_path, *flags)
    assert done.returncode == 2 and says in done.stderr


def test_control_refuses_observe_without_identity_with_tls(tmp_path):
    ca = TestCA()
    issued = ca.issue("podfence-control", server=True)
    files = {"cert.pem": issued.cert, "key.pem": issued.key, "ca.pem": ca.pem}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    source = tmp_path / "objects"
    source.mkdir()
    tls = ["--tls-cert", str(tmp_path / "cert.pem"), "--tls-key", str(tmp_path / "key.pem"),
           "--tls-ca", str(tmp_path / "ca.pem")]
    done = _control_usage(source, *tls, "--observe-without-identity")
    assert done.returncode == 2 and "--observe-without-identity is for --insecure only" in done.stderr


def test_the_agent_refuses_an_empty_flow_buffer():
    argv = ["agent", "--node", "n1", "--control", "127.0.0.1:1", "--insecure", "--flow-buffer", "0"]
    done = subprocess.run([sys.executable, "-m", "agent.cli", *argv], capture_output=True, text=True,
                          timeout=60, cwd=REPO)
    assert done.returncode == 2 and "--flow-buffer must be at least 1" in done.stderr
