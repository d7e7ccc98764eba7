"""Shared pieces of the control-service tests: a small cluster, a running control service on
loopback, a recording agent (SyncClient whose `apply` records states instead of programming a
kernel: the kernel is tested in the dataplane tiers), and a throwaway CA for mTLS."""

from __future__ import annotations

import datetime
import ipaddress
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.control.admission import StreamAdmission
from agent.control.hub import PolicyHub
from agent.control.metrics import ControlMetrics
from agent.control.observe_service import ObserveSettings
from agent.control.server import (
    ControlServer,
    ServerSettings,
    ServerTls,
    TlsFiles,
    create_server,
    stop_server,
    stream_admission,
)
from agent.dataplane.types import NodeState
from agent.model.objects import (
    ContainerPort,
    LabelSelector,
    Namespace,
    NetworkPolicy,
    Peer,
    Pod,
    PolicyType,
    PortSpec,
    Protocol,
    Rule,
    labels_from_dict,
)
from agent.node.sync import SyncClient
from agent.policy.resolver import Resolver
from tests.unit import model_builders

WAIT = 10.0


def wait_until(predicate: Callable[[], bool], timeout: float = WAIT, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def control_healthy(metrics_port: int) -> bool:
    """Whether a control process's /healthz on loopback answers 200 (its source has been read)."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/healthz", timeout=1) as reply:
            return bool(reply.status == 200)
    except OSError:
        return False


# --- a small cluster ----------------------------------------------------------------------------------


def pod(name: str, node: str, ip: str, app: str, namespace: str = "shop") -> Pod:
    """A pod serving "http" on TCP 8080, labelled app=`app`."""
    return model_builders.pod(
        namespace, name, ip, node=node, ports=(ContainerPort(8080, Protocol.TCP, "http"),), app=app
    )


def allow_from(name: str, target_app: str, from_app: str, port: int, namespace: str = "shop"
               ) -> NetworkPolicy:
    """Ingress to `target_app` pods from `from_app` pods on TCP `port`."""
    return NetworkPolicy(
        namespace=namespace,
        name=name,
        pod_selector=LabelSelector(labels_from_dict({"app": target_app})),
        policy_types=frozenset({PolicyType.INGRESS}),
        ingress=(
            Rule(
                peers=(Peer(pod_selector=LabelSelector(labels_from_dict({"app": from_app}))),),
                ports=(PortSpec(Protocol.TCP, port),),
            ),
        ),
    )


def small_cluster() -> list:
    """web pods on n1 and n2, db on n3, a client on n1; web is isolated to client:8080."""
    return [
        Namespace("shop", {"team": "shop"}),
        pod("web-1", "n1", "10.0.1.10", "web"),
        pod("client-1", "n1", "10.0.1.11", "client"),
        pod("web-2", "n2", "10.0.2.10", "web"),
        pod("db-1", "n3", "10.0.3.10", "db"),
        allow_from("web-from-client", "web", "client", 8080),
    ]


# --- the same cluster as kubectl writes it ------------------------------------------------------------


def ns_doc(name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": {"team": name}}}


def pod_doc(name: str, node: str, ip: str, app: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"namespace": "shop", "name": name, "labels": {"app": app}},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "x",
                                                   "ports": [{"containerPort": 8080, "name": "http"}]}]},
        "status": {"podIP": ip, "podIPs": [{"ip": ip}]},
    }


def policy_doc(name: str, target_app: str, port: int, cidr: str = "10.0.0.0/8") -> dict[str, Any]:
    return {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"namespace": "shop", "name": name},
        "spec": {"podSelector": {"matchLabels": {"app": target_app}}, "policyTypes": ["Ingress"],
                 "ingress": [{"from": [{"ipBlock": {"cidr": cidr}}], "ports": [{"port": port}]}]},
    }


PODS = [
    pod_doc("web-1", "n1", "10.0.1.10", "web"),
    pod_doc("web-2", "n2", "10.0.2.10", "web"),
    pod_doc("db-1", "n3", "10.0.3.10", "db"),
]


# --- a running control service ------------------------------------------------------------------------


@dataclass
class Control:
    hub: PolicyHub
    server: ControlServer
    port: int
    health: object
    metrics: ControlMetrics
    admission: StreamAdmission

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        stop_server(self.server, self.hub, self.health, grace=0.5)  # type: ignore[arg-type]

    def server_sync_streams(self) -> int:
        """Sync streams the server holds now (admitted, with or without Hello)."""
        return self.admission.open_streams


def start_control(
    objects: list,
    addr: str = "127.0.0.1:0",
    tls: ServerTls | None = None,
    settings: ServerSettings | None = None,
    initial_version: int = 100,
    max_pending: int = 32,
    authenticator: Any = None,
    observe: ObserveSettings | None = None,
) -> Control:
    metrics = ControlMetrics()
    hub = PolicyHub(Resolver(), metrics, max_pending=max_pending, initial_version=initial_version)
    with hub.change() as resolver:
        resolver.replace_all(objects)
    admission = stream_admission(settings or ServerSettings(), metrics)
    server, port, health = create_server(addr, hub, tls, settings, admission=admission,
                                         authenticator=authenticator(hub) if authenticator else None,
                                         observe=observe)
    server.start()
    return Control(hub, server, port, health, metrics, admission)


@contextmanager
def change_held_open(hub: PolicyHub, *objects: Any) -> Iterator[None]:
    """A source resolving a long change: `hub.change()` (upserting `objects`) held open in a thread
    while the block runs; the change is published when the block ends."""
    inside, release = threading.Event(), threading.Event()

    def slow_change() -> None:
        with hub.change() as resolver:
            for obj in objects:
                resolver.upsert(obj)
            inside.set()
            release.wait(20)

    source = threading.Thread(target=slow_change, name="slow-change", daemon=True)
    source.start()
    try:
        assert inside.wait(5), "the change did not start"
        yield
    finally:
        release.set()
        source.join(5)


# --- a recording agent --------------------------------------------------------------------------------


@dataclass
class RecordingAgent:
    """A SyncClient in a thread; every state handed to `apply` is recorded."""

    node: str
    target: str
    credentials: grpc.ChannelCredentials | None = None
    fail_with: Exception | None = None  # make apply raise this (a refusing dataplane)
    hold: threading.Event | None = None  # while set here and not yet set, apply blocks (a stuck kernel)
    states: list[NodeState] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    client: SyncClient | None = None
    thread: threading.Thread | None = None
    options: tuple = ()
    first_message_timeout: float = 20.0
    token: Callable[[], str] | None = None  # token identity: the service-account token to present

    def apply(self, state: NodeState) -> None:
        if self.hold is not None:
            self.hold.wait(WAIT)
        if self.fail_with is not None:
            raise self.fail_with
        self.states.append(state)

    def start(self) -> RecordingAgent:
        self.client = SyncClient(
            self.node, self.target, self.apply, credentials=self.credentials,
            backoff_initial=0.05, backoff_max=0.3, channel_options=self.options,
            first_message_timeout=self.first_message_timeout, token=self.token,
        )
        self.thread = threading.Thread(target=self.client.run, args=(self.stop,), daemon=True)
        self.thread.start()
        return self

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=5)
            assert not self.thread.is_alive(), "SyncClient.run did not return after stop"

    @property
    def last(self) -> NodeState:
        assert self.states, f"{self.node} applied nothing"
        return self.states[-1]

    def wait_for_state(self, predicate: Callable[[NodeState], bool], what: str = "a state") -> NodeState:
        wait_until(lambda: bool(self.states) and predicate(self.states[-1]), what=f"{self.node}: {what}")
        return self.states[-1]


# --- a throwaway certificate authority ----------------------------------------------------------------


@dataclass(frozen=True)
class Pem:
    cert: bytes
    key: bytes


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


class TestCA:
    """Issues certificates signed by one fresh EC key; servers get SANs for localhost/127.0.0.1."""

    __test__ = False  # not a pytest class

    def __init__(self) -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(_name("podfence test CA"))
            .issuer_name(_name("podfence test CA"))
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self._key, hashes.SHA256())
        )
        self.pem = self._cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, common_name: str, server: bool = False) -> Pem:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
        cert = builder.sign(self._key, hashes.SHA256())
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return Pem(cert.public_bytes(serialization.Encoding.PEM), key_pem)

    def server_tls(self) -> TlsFiles:
        issued = self.issue("podfence-control", server=True)
        return TlsFiles(issued.cert, issued.key, self.pem)

    def client_credentials(self, node: str) -> grpc.ChannelCredentials:
        issued = self.issue(node)
        return grpc.ssl_channel_credentials(self.pem, issued.key, issued.cert)


def status_output(target: str, as_json: bool = True) -> str:
    """What `podfence status` prints for the control service at `target` (plaintext)."""
    import argparse
    import io
    from contextlib import redirect_stdout

    from agent.control import status as status_cmd

    out = io.StringIO()
    args = argparse.Namespace(control=target, json=as_json, insecure=False, tls_cert=None, tls_key=None,
                              tls_ca=None, timeout=5.0)
    with redirect_stdout(out):
        assert status_cmd.run(args) == 0
    return out.getvalue()
