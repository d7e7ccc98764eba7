"""Token identity: agents prove their node with their pod's service-account token, checked by a
TokenReview against an HTTPS API-server test double (apiserver_double.py), over real gRPC with
TLS on loopback. And the server certificate rotated on disk without a restart."""

from __future__ import annotations

import argparse
import io
import ipaddress
import json
import os
import threading
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import grpc
import pytest

from agent.api import podfence_pb2 as pb
from agent.api import podfence_pb2_grpc as pb_grpc
from agent.control import status as status_cmd
from agent.control.identity import TokenAuthenticator, TokenReviewer
from agent.control.tls_files import ReloadingTlsFiles, TlsFiles
from agent.model.objects import Pod
from tests.unit.apiserver_double import TokenReviewApiDouble
from tests.unit.control_helpers import WAIT, RecordingAgent, TestCA, small_cluster, start_control, wait_until

AGENT_NS, AGENT_SA = "podfence-system", "podfence-agent"


def agent_pod(name: str, node: str, uid: str, ip: str) -> Pod:
    return Pod(namespace=AGENT_NS, name=name, node_name=node, labels={"app": "podfence-agent"},
               ips=(ipaddress.ip_address(ip),), host_network=True, uid=uid)


@pytest.fixture
def apiserver(tmp_path):
    double = TokenReviewApiDouble(TestCA(), tmp_path).start()
    double.issue_pod_token("tok-n1", AGENT_NS, AGENT_SA, "podfence-agent-a", "uid-a")
    double.issue_pod_token("tok-n2", AGENT_NS, AGENT_SA, "podfence-agent-b", "uid-b")
    double.issue_pod_token("tok-expired", AGENT_NS, AGENT_SA, "podfence-agent-a", "uid-a", expired=True)
    double.issue_pod_token("tok-other-audience", AGENT_NS, AGENT_SA, "podfence-agent-a", "uid-a",
                           audiences=("https://kubernetes.default.svc",))
    double.issue_pod_token("tok-web", "shop", "default", "web-1", "uid-web")  # not an agent pod
    double.issue_pod_token("tok-old-pod", AGENT_NS, AGENT_SA, "podfence-agent-a", "uid-gone")
    double.issue_user_token("tok-admin", "alice@example.com")
    yield double
    double.stop()


@pytest.fixture
def control(apiserver):
    """A token-identity control service (server TLS only) fed the small cluster plus two agent pods."""
    ca = TestCA()
    objects = [*small_cluster(), agent_pod("podfence-agent-a", "n1", "uid-a", "192.168.0.1"),
               agent_pod("podfence-agent-b", "n2", "uid-b", "192.168.0.2")]
    issued = ca.issue("podfence-control", server=True)
    reviewer = TokenReviewer(apiserver.api_client(), timeout_s=2.0)
    ctl = start_control(
        objects, addr="localhost:0", tls=TlsFiles(issued.cert, issued.key, None),
        authenticator=lambda hub: TokenAuthenticator(reviewer, hub.find_pod, f"{AGENT_NS}/{AGENT_SA}",
                                                     admin_users=["alice@example.com"]),
    )
    ctl.ca = ca  # type: ignore[attr-defined]
    yield ctl
    ctl.stop()


def first_answer(control, node: str, token: str | None) -> pb.ControlMessage:
    """Opens a Sync stream as `node` presenting `token`; the first message (or the RpcError)."""
    credentials = grpc.ssl_channel_credentials(control.ca.pem)
    with grpc.secure_channel(f"localhost:{control.port}", credentials) as channel:
        metadata = [("authorization", f"Bearer {token}")] if token else None
        hello = pb.AgentMessage(hello=pb.Hello(node_name=node))
        call = pb_grpc.NodeSyncStub(channel).Sync(iter([hello]), timeout=WAIT, metadata=metadata)
        try:
            return next(call)
        finally:
            call.cancel()


def refusal(control, node: str, token: str | None) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as refused:
        first_answer(control, node, token)
    return refused.value


def test_an_agent_with_its_pods_token_gets_its_nodes_policy(control, apiserver):
    agent = RecordingAgent("n1", f"localhost:{control.port}", credentials=grpc.ssl_channel_credentials(
        control.ca.pem), token=lambda: "tok-n1\n").start()
    try:
        state = agent.wait_for_state(lambda s: bool(s.endpoints), "n1 by token")
        assert set(state.endpoints) == {"shop/web-1", "shop/client-1"}
    finally:
        agent.close()
    review = apiserver.reviews[-1]
    assert review["spec"] == {"token": "tok-n1", "audiences": ["podfence"]}
    assert review["kind"] == "TokenReview"


def test_a_stolen_agent_token_subscribes_only_as_the_node_its_pod_runs_on(control):
    # n2's agent token asking for n1's policy: refused, and n1 never shows as connected.
    denied = refusal(control, "n1", "tok-n2")
    assert denied.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "on node 'n2' may not subscribe as node 'n1'" in denied.details()
    assert "n1" not in control.hub.status().nodes
    # The same token as its own node works.
    assert first_answer(control, "n2", "tok-n2").WhichOneof("body") == "snapshot"


@pytest.mark.parametrize(
    ("token", "code", "says"),
    [
        ("tok-expired", grpc.StatusCode.UNAUTHENTICATED, "has expired"),
        ("no-such-token", grpc.StatusCode.UNAUTHENTICATED, "invalid bearer token"),
        ("tok-other-audience", grpc.StatusCode.UNAUTHENTICATED, "audiences"),
        (None, grpc.StatusCode.UNAUTHENTICATED, "no service-account token"),
        ("tok-web", grpc.StatusCode.PERMISSION_DENIED, "is not the podfence agents' service account"),
        ("tok-old-pod", grpc.StatusCode.PERMISSION_DENIED, "earlier pod named"),
        ("tok-admin", grpc.StatusCode.PERMISSION_DENIED, "is not the podfence agents' service account"),
    ],
)
def test_tokens_that_name_no_agent_pod_are_refused(control, token, code, says):
    refused = refusal(control, "n1", token)
    assert refused.code() == code
    assert says in refused.details()
    assert "n1" not in control.hub.status().nodes
    assert control.metrics.streams_refused_total.labels("identity")._value.get() == 1


def test_an_agent_pod_missing_from_the_pod_cache_is_refused(control, apiserver):
    apiserver.issue_pod_token("tok-new", AGENT_NS, AGENT_SA, "podfence-agent-new", "uid-new")
    refused = refusal(control, "n3", "tok-new")
    assert refused.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "not in this control service's pod cache" in refused.details()
    with control.hub.change() as resolver:  # the source sees the pod: now it is bound to n3
        resolver.upsert(agent_pod("podfence-agent-new", "n3", "uid-new", "192.168.0.3"))
    assert first_answer(control, "n3", "tok-new").WhichOneof("body") == "snapshot"


def test_tokenreview_down_fails_closed_with_a_clear_error(control, apiserver):
    apiserver.stop()
    refused = refusal(control, "n1", "tok-n1")
    assert refused.code() == grpc.StatusCode.UNAVAILABLE
    assert "cannot check the token: TokenReview at https://127.0.0.1:" in refused.details()
    assert "n1" not in control.hub.status().nodes


def test_the_control_services_own_credential_refused_is_reported(tmp_path, apiserver):
    reviewer = TokenReviewer(apiserver.api_client(caller_token="wrong"), timeout_s=2.0)
    with pytest.raises(Exception) as failure:
        TokenAuthenticator(reviewer, lambda ns, name: None).agent_node("tok-n1")
    assert "HTTP 401" in str(failure.value) and "tokenreviews" in str(failure.value)


def _status(control, tmp_path: Path, token: str | None) -> tuple[int, Any]:
    (tmp_path / "ca.pem").write_bytes(control.ca.pem)
    token_file = None
    if token:
        token_file = tmp_path / "token"
        token_file.write_text(token)
    args = argparse.Namespace(control=f"localhost:{control.port}", json=True, insecure=False, tls_cert=None,
                              tls_key=None, tls_ca=str(tmp_path / "ca.pem"),
                              token_file=str(token_file) if token_file else None, timeout=5.0)
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = status_cmd.run(args)
    return code, json.loads(out.getvalue()) if code == 0 else err.getvalue()


def test_status_in_token_mode_shows_an_agent_its_node_and_an_admin_user_everything(control, tmp_path):
    first_answer(control, "n1", "tok-n1")
    first_answer(control, "n2", "tok-n2")
    code, own = _status(control, tmp_path, "tok-n1")
    assert code == 0 and set(own["nodes"]) == {"n1"}
    code, admin = _status(control, tmp_path, "tok-admin")
    assert code == 0 and set(admin["nodes"]) == {"n1", "n2"}
    code, web = _status(control, tmp_path, "tok-web")
    assert code == 0 and web["nodes"] == {}
    code, message = _status(control, tmp_path, "no-such-token")
    assert code == 1 and "invalid bearer token" in message


# --- certificate rotation -----------------------------------------------------------------------


def _write_atomically(path: Path, data: bytes) -> None:
    """As the kubelet updates a Secret volume: the new content appears at once under the name."""
    fresh = path.with_suffix(".new")
    fresh.write_bytes(data)
    os.replace(fresh, path)


def test_a_rotated_server_certificate_is_used_by_new_connections_without_restart(tmp_path):
    old_ca, new_ca = TestCA(), TestCA()
    cert, key, ca = tmp_path / "tls.crt", tmp_path / "tls.key", tmp_path / "ca.crt"
    issued = old_ca.issue("podfence-control", server=True)
    cert.write_bytes(issued.cert)
    key.write_bytes(issued.key)
    ca.write_bytes(old_ca.pem)  # agents' client certificates: signed by the old CA for now
    files = ReloadingTlsFiles(str(cert), str(key), str(ca))
    ctl = start_control(small_cluster(), addr="localhost:0", tls=files)
    target = f"localhost:{ctl.port}"
    try:
        def sync_as_n1(server_ca: TestCA, client_ca: TestCA) -> pb.ControlMessage:
            issued_client = client_ca.issue("n1")
            credentials = grpc.ssl_channel_credentials(server_ca.pem, issued_client.key, issued_client.cert)
            with grpc.secure_channel(target, credentials) as channel:
                hello = pb.AgentMessage(hello=pb.Hello(node_name="n1"))
                call = pb_grpc.NodeSyncStub(channel).Sync(iter([hello]), timeout=WAIT)
                try:
                    return next(call)
                finally:
                    call.cancel()

        assert sync_as_n1(old_ca, old_ca).WhichOneof("body") == "snapshot"

        # Rotate: a certificate from a new CA, and the new CA for clients; key first, then the
        # rest (a mismatched pair in between is not taken).
        rotated = new_ca.issue("podfence-control", server=True)
        _write_atomically(key, rotated.key)
        with pytest.raises(grpc.RpcError):  # still the old certificate: a new-CA client refuses it
            sync_as_n1(new_ca, new_ca)
        _write_atomically(cert, rotated.cert)
        _write_atomically(ca, new_ca.pem)

        assert sync_as_n1(new_ca, new_ca).WhichOneof("body") == "snapshot"
        assert files.reloads == 1
        with pytest.raises(grpc.RpcError) as stale:  # the old CA no longer verifies the server
            sync_as_n1(old_ca, old_ca)
        assert stale.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        ctl.stop()


# --- usage ------------------------------------------------------------------------------------------


def test_token_identity_never_runs_or_sends_tokens_in_plaintext(tmp_path):
    from agent.cli import build_parser
    from agent.control import main as control_main
    from agent.node import main as agent_main

    parser, _ = build_parser()
    args = parser.parse_args(["control", "--source", str(tmp_path), "--identity", "token", "--insecure"])
    err = io.StringIO()
    with redirect_stderr(err):
        assert control_main.run(args) == 2
    assert "--identity token sends service-account tokens: it needs TLS" in err.getvalue()

    token = tmp_path / "token"
    token.write_text("tok")
    args = parser.parse_args(["agent", "--node", "n1", "--control", "c:1", "--token-file", str(token),
                              "--insecure"])
    with pytest.raises(agent_main.UsageError, match="not --insecure"):
        agent_main.channel_credentials(args)
    ca = tmp_path / "ca.pem"
    ca.write_bytes(TestCA().pem)
    args = parser.parse_args(["agent", "--node", "n1", "--control", "c:1", "--token-file", str(token),
                              "--tls-ca", str(ca)])
    assert agent_main.channel_credentials(args) is not None  # no client certificate needed


def test_an_agent_reads_rotated_tls_files_for_its_next_connection(tmp_path):
    """Server and agent both rotate to a new CA: the agent's next stream verifies the new server
    certificate with the new CA file and presents its new client certificate."""
    from agent.node.main import channel_credentials, reloading_credentials
    from agent.node.sync import SyncClient

    old_ca, new_ca = TestCA(), TestCA()
    server_dir, agent_dir = tmp_path / "server", tmp_path / "agent"
    server_dir.mkdir()
    agent_dir.mkdir()

    def install(ca: TestCA) -> None:
        served, client = ca.issue("podfence-control", server=True), ca.issue("n1")
        for directory, issued in ((server_dir, served), (agent_dir, client)):
            _write_atomically(directory / "tls.key", issued.key)
            _write_atomically(directory / "tls.crt", issued.cert)
            _write_atomically(directory / "ca.crt", ca.pem)

    install(old_ca)
    files = ReloadingTlsFiles(*(str(server_dir / name) for name in ("tls.crt", "tls.key", "ca.crt")))
    ctl = start_control(small_cluster(), addr="localhost:0", tls=files)
    args = argparse.Namespace(tls_cert=str(agent_dir / "tls.crt"), tls_key=str(agent_dir / "tls.key"),
                              tls_ca=str(agent_dir / "ca.crt"), insecure=False, token_file=None)
    initial = channel_credentials(args)
    states: list = []
    client = SyncClient("n1", f"localhost:{ctl.port}", states.append, credentials=initial,
                        credentials_factory=reloading_credentials(args, initial), backoff_initial=0.05,
                        backoff_max=0.2)
    stop = threading.Event()
    thread = threading.Thread(target=client.run, args=(stop,), daemon=True)
    thread.start()
    try:
        wait_until(lambda: len(states) == 1, what="the first snapshot")
        (first,) = ctl.hub.open_streams()
        install(new_ca)
        first.close("superseded by a test")  # the agent reconnects
        wait_until(lambda: len(states) >= 2, what="a snapshot over the rotated certificates")
        assert files.reloads == 1
    finally:
        stop.set()
        thread.join(5)
        ctl.stop()


# --- the whole process --------------------------------------------------------------------------------


def test_control_process_in_token_mode_binds_agents_through_its_kubeconfig(tmp_path, apiserver):
    """`podfence control --identity token` as a process: TokenReview through --kubeconfig (the
    double's CA and the control's own token), agent pods (with uids) from the folder source."""
    import subprocess
    import sys

    import yaml

    from tests.unit.control_helpers import PODS, control_healthy, ns_doc, policy_doc
    from tests.unit.test_control_cli import free_port

    source = tmp_path / "source"
    source.mkdir()
    agent_doc = {"apiVersion": "v1", "kind": "Pod",
                 "metadata": {"namespace": AGENT_NS, "name": "podfence-agent-a", "uid": "uid-a"},
                 "spec": {"nodeName": "n1", "hostNetwork": True, "containers": [{"name": "a", "image": "x"}]}}
    (source / "cluster.yaml").write_text(yaml.safe_dump_all([ns_doc("shop"), *PODS, agent_doc,
                                                             policy_doc("web-in", "web", 8080)]))
    (tmp_path / "apiserver-ca.crt").write_bytes(apiserver.ca.pem)
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "double",
        "clusters": [{"name": "double", "cluster": {
            "server": f"https://127.0.0.1:{apiserver.port}",
            "certificate-authority": str(tmp_path / "apiserver-ca.crt"),
        }}],
        "users": [{"name": "control", "user": {"token": apiserver.caller_token}}],
        "contexts": [{"name": "double", "context": {"cluster": "double", "user": "control"}}],
    }))
    ca = TestCA()
    issued = ca.issue("podfence-control", server=True)
    (tmp_path / "tls.crt").write_bytes(issued.cert)
    (tmp_path / "tls.key").write_bytes(issued.key)
    grpc_port, metrics_port = free_port(), free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "control", "--source", str(source), "--identity", "token",
         "--kubeconfig", str(kubeconfig), "--tls-cert", str(tmp_path / "tls.crt"),
         "--tls-key", str(tmp_path / "tls.key"), "--listen", f"127.0.0.1:{grpc_port}",
         "--metrics-listen", f"127.0.0.1:{metrics_port}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )

    agent = RecordingAgent("n1", f"localhost:{grpc_port}", credentials=grpc.ssl_channel_credentials(ca.pem),
                           token=lambda: "tok-n1")
    try:
        wait_until(lambda: control_healthy(metrics_port), timeout=30, what="control /healthz")
        agent.start()
        state = agent.wait_for_state(lambda s: "shop/web-1" in s.endpoints, "n1 by token")
        assert set(state.endpoints) == {"shop/web-1"}
        assert apiserver.reviews and apiserver.reviews[-1]["spec"]["token"] == "tok-n1"
    finally:
        agent.close()
        process.kill()
        _, stderr = process.communicate(timeout=10)
    assert "node identity by service-account token" in stderr
