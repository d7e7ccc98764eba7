"""The deployment manifests, image recipe and certificate script, checked without a cluster.

- Every manifest document validates against the Kubernetes OpenAPI schemas (kubernetes-validate,
  strict: unknown fields are errors) for two Kubernetes versions.
- Every PODFENCE_* variable a container sets is read by a flag of the subcommand it runs (built
  from the real `agent.cli.build_parser()`), and its value parses and is an allowed choice.
- The pieces agree with each other: Service ports and selectors, probe ports, mounted TLS paths,
  the agent's control address, RBAC limited to list/watch (and TokenReview for token identity).
- deploy/issue-node-cert.sh makes a CA, a server and a node certificate that complete a real
  mutual-TLS handshake in which the server reads the node name from the client's CN.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import kubernetes_validate
import pytest
import yaml

from agent.cli import ENV_PREFIX, build_parser, env_name

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
MANIFESTS = ("control.yaml", "daemonset.yaml")
KUBERNETES_VERSIONS = ("1.29.0", "1.33.0")  # an older supported release and a recent one


def load_manifest(name: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((DEPLOY / name).read_text()) if doc is not None]


ALL_DOCUMENTS = [(name, doc) for name in MANIFESTS for doc in load_manifest(name)]


def find(kind: str, name: str) -> dict[str, Any]:
    matches = [doc for _, doc in ALL_DOCUMENTS if doc["kind"] == kind and doc["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name}"
    return matches[0]


def containers() -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(manifest, workload, container) for every container of every workload."""
    for manifest, doc in ALL_DOCUMENTS:
        spec = doc.get("spec", {}).get("template", {}).get("spec")
        if spec:
            for container in spec.get("initContainers", []) + spec["containers"]:
                yield manifest, doc, container


# --- schema ------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize(
    "doc",
    [pytest.param(doc, id=f"{name}:{doc['kind']}/{doc['metadata']['name']}") for name, doc in ALL_DOCUMENTS],
)
def test_manifest_document_validates_strictly(doc: dict[str, Any], version: str) -> None:
    kubernetes_validate.validate(doc, version, strict=True)


def test_the_validator_rejects_what_it_should() -> None:
    """Guards the test above against a validator that accepts everything."""
    daemonset = find("DaemonSet", "podfence-agent")
    broken = yaml.safe_load(yaml.safe_dump(daemonset))
    broken["spec"]["template"]["spec"]["containers"][0]["volumeMount"] = []  # typo of volumeMounts
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[-1], strict=True)


def test_manifests_hold_the_expected_objects() -> None:
    kinds = sorted((doc["kind"], doc["metadata"]["name"]) for _, doc in ALL_DOCUMENTS)
    assert kinds == sorted(
        [
            ("Namespace", "podfence-system"),
            ("ServiceAccount", "podfence-control"),
            ("ClusterRole", "podfence-control"),
            ("ClusterRoleBinding", "podfence-control"),
            ("Service", "podfence-control"),
            ("Deployment", "podfence-control"),
            ("PodDisruptionBudget", "podfence-control"),
            ("ServiceAccount", "podfence-agent"),
            ("DaemonSet", "podfence-agent"),
        ]
    )
    namespaced = [
        doc
        for _, doc in ALL_DOCUMENTS
        if doc["kind"] not in ("Namespace", "ClusterRole", "ClusterRoleBinding")
    ]
    assert {doc["metadata"].get("namespace") for doc in namespaced} == {"podfence-system"}


# --- settings against the CLI ------------------------------------------------------------------


def subcommand_parsers() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser, _ = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return parser, dict(subparsers.choices)


def flag_env_names(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """PODFENCE_* name -> the option it sets, for every option of `parser`."""
    names: dict[str, argparse.Action] = {}
    for action in parser._actions:
        if action.dest == "help" or isinstance(action, argparse._SubParsersAction):
            continue
        for flag in action.option_strings:
            if flag.startswith("--"):
                names[env_name(flag)] = action
    return names


def unread_env_vars(subcommand: str, env: dict[str, Any]) -> list[str]:
    """The PODFENCE_* variables in `env` that no flag of `podfence <subcommand>` reads."""
    top, subcommands = subcommand_parsers()
    readable = flag_env_names(top) | flag_env_names(subcommands[subcommand])
    return sorted(name for name in env if name.startswith(ENV_PREFIX) and name not in readable)


def container_env(container: dict[str, Any]) -> dict[str, Any]:
    return {item["name"]: item.get("value", item.get("valueFrom")) for item in container.get("env", [])}


def test_every_container_runs_a_podfence_subcommand() -> None:
    _, subcommands = subcommand_parsers()
    ran = {container["args"][0] for _, _, container in containers()}
    assert ran == {"agent", "control"}
    assert ran <= set(subcommands)


@pytest.mark.parametrize("container", [pytest.param(c, id=f"{m}:{c['name']}") for m, _, c in containers()])
def test_every_env_var_is_read_by_a_flag_of_its_subcommand(container: dict[str, Any]) -> None:
    env = container_env(container)
    assert any(name.startswith(ENV_PREFIX) for name in env)
    assert unread_env_vars(container["args"][0], env) == []


def test_the_check_catches_an_env_var_no_flag_reads() -> None:
    assert unread_env_vars("agent", {"PODFENCE_NODE": "n", "PODFENCE_NOT_A_FLAG": "1"}) == [
        "PODFENCE_NOT_A_FLAG"
    ]
    # A control-only flag set on the agent is just as wrong.
    assert unread_env_vars("agent", {"PODFENCE_SOURCE": "kubernetes"}) == ["PODFENCE_SOURCE"]


@pytest.mark.parametrize("container", [pytest.param(c, id=f"{m}:{c['name']}") for m, _, c in containers()])
def test_env_values_parse_as_the_cli_would(
    container: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With only the manifest's env, `podfence <subcommand>` parses: required flags are satisfied,
    values convert, and values of choice flags are allowed choices."""
    env = container_env(container)
    for name, value in env.items():
        # fieldRef values are filled in by the kubelet; a plausible node name stands in here.
        monkeypatch.setenv(name, value if isinstance(value, str) else "worker-1")
    subcommand = container["args"][0]
    parser, _ = build_parser()  # reads the environment while adding its options
    args = parser.parse_args(container["args"])
    _, subcommands = subcommand_parsers()
    options = flag_env_names(parser) | flag_env_names(subcommands[subcommand])
    for name in env:
        action = options[name]
        value = getattr(args, action.dest)
        assert value is not None, name
        if action.choices is not None:
            assert value in action.choices, f"{name}={value!r} is not one of {list(action.choices)}"
    assert args.command == subcommand
    assert args.log_format == "json"


# --- the pieces agree ---------------------------------------------------------------------------


def host_port(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host, int(port)


def test_control_service_selects_the_deployment_and_exposes_its_ports() -> None:
    service = find("Service", "podfence-control")
    deployment = find("Deployment", "podfence-control")
    template = deployment["spec"]["template"]
    assert deployment["spec"]["replicas"] == 2
    # Host network: no NetworkPolicy can cut agents off from it; replicas never share a node's ports.
    assert template["spec"]["hostNetwork"] is True
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxUnavailable": 1, "maxSurge": 0}
    assert deployment["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
    assert service["spec"]["selector"].items() <= template["metadata"]["labels"].items()
    container = template["spec"]["containers"][0]
    named_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for port in service["spec"]["ports"]:
        assert port["targetPort"] in named_ports
    env = container_env(container)
    assert host_port(env["PODFENCE_LISTEN"])[1] == named_ports["grpc"]
    assert host_port(env["PODFENCE_METRICS_LISTEN"])[1] == named_ports["metrics"] == 9300
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] == "metrics"
        assert container[probe]["httpGet"]["path"] == "/healthz"


def test_agent_reaches_the_control_service_by_its_service_name() -> None:
    service = find("Service", "podfence-control")
    agent = find("DaemonSet", "podfence-agent")["spec"]["template"]["spec"]
    env = container_env(agent["containers"][0])
    host, port = host_port(env["PODFENCE_CONTROL"])
    assert host == f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc"
    assert port in {p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc"}
    assert agent["dnsPolicy"] == "ClusterFirstWithHostNet"  # host network, cluster DNS


def test_agent_daemonset_has_what_a_kernel_enforcer_needs() -> None:
    daemonset = find("DaemonSet", "podfence-agent")
    spec = daemonset["spec"]["template"]["spec"]
    container = spec["containers"][0]
    assert spec["hostNetwork"] is True
    assert spec.get("hostPID") is not True
    assert spec["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists"} in spec["tolerations"]
    assert container["securityContext"]["privileged"] is True
    # Kernel state survives an agent's restart: a rollout may take a share of the nodes at once.
    assert daemonset["spec"]["updateStrategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": "10%", "maxSurge": 0},
    }
    assert set(container["resources"]) == {"requests", "limits"}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert mounts["/sys/fs/bpf"]["mountPropagation"] == "Bidirectional"
    for path in ("/lib/modules", "/usr/src"):
        assert mounts[path]["readOnly"] is True
        assert volumes[mounts[path]["name"]]["hostPath"]["path"] == path
    assert volumes[mounts["/run/xtables.lock"]["name"]]["hostPath"]["type"] == "FileOrCreate"
    # The agent's record of its kernel state outlives the pod, so its successor adopts that state.
    assert volumes[mounts["/run/podfence"]["name"]]["hostPath"] == {
        "path": "/run/podfence", "type": "DirectoryOrCreate"}
    env = container_env(container)
    assert env["PODFENCE_NODE"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert env["PODFENCE_PIN_DIR"].startswith("/sys/fs/bpf/")  # pins land in the host's bpffs
    metrics_port = host_port(env["PODFENCE_METRICS_LISTEN"])[1]
    assert metrics_port == 9301
    assert (
        container["livenessProbe"]["httpGet"]["path"],
        container["readinessProbe"]["httpGet"]["path"],
    ) == ("/healthz", "/readyz")
    assert (
        container["livenessProbe"]["httpGet"]["port"]
        == container["readinessProbe"]["httpGet"]["port"]
        == 9301
    )


@pytest.mark.parametrize("kind_name", [("Deployment", "podfence-control"), ("DaemonSet", "podfence-agent")])
def test_tls_files_live_on_mounted_volumes(kind_name: tuple[str, str]) -> None:
    spec = find(*kind_name)["spec"]["template"]["spec"]
    container = spec["containers"][0]
    env = container_env(container)
    mount_paths = [m["mountPath"] for m in container["volumeMounts"]]
    for name in ("PODFENCE_TLS_CERT", "PODFENCE_TLS_KEY", "PODFENCE_TLS_CA"):
        assert any(env[name].startswith(path + "/") for path in mount_paths), name
    assert "PODFENCE_INSECURE" not in env


WATCHED_RESOURCES = {  # what agent.control.source_kubernetes lists and watches, by kind
    "Namespace": ("", "namespaces"),
    "Pod": ("", "pods"),
    "NetworkPolicy": ("networking.k8s.io", "networkpolicies"),
    "ClusterNetworkPolicy": ("policy.networking.k8s.io", "clusternetworkpolicies"),
}


def test_the_namespace_admits_the_privileged_agent() -> None:
    labels = find("Namespace", "podfence-system")["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "privileged"


def test_the_control_service_runs_on_nodes_it_has_not_untainted_yet() -> None:
    from agent.control.taint import NOT_READY_TAINT

    spec = find("Deployment", "podfence-control")["spec"]["template"]["spec"]
    assert {"key": NOT_READY_TAINT, "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]


def test_control_rbac_is_list_and_watch_of_the_watched_resources_and_tokenreviews() -> None:
    from agent.control.source_kubernetes import API_VERSIONS

    assert set(API_VERSIONS) == set(WATCHED_RESOURCES)
    role = find("ClusterRole", "podfence-control")
    granted = {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    # and the writes: TokenReviews, and the not-ready taint of a node whose agent enforces
    # (agent.control.taint)
    assert granted == {
        (group, resource, verb)
        for group, resource in WATCHED_RESOURCES.values()
        for verb in ("list", "watch")
    } | {("authentication.k8s.io", "tokenreviews", "create")} | {  # agent/control/identity.py
        ("", "nodes", "get"), ("", "nodes", "patch")}
    binding = find("ClusterRoleBinding", "podfence-control")
    deployment = find("Deployment", "podfence-control")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "podfence-control", "namespace": "podfence-system"}
    ]
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == "podfence-control"


def test_dockerfile_copies_existing_paths_and_runs_the_console_script() -> None:
    lines = [line.strip() for line in (DEPLOY / "Dockerfile").read_text().splitlines()]
    copies = [line.split()[1:-1] for line in lines if line.startswith("COPY ")]
    sources = [source for sources in copies for source in sources]
    assert "agent" in sources and "bpf" in sources and "proto" in sources
    for source in sources:
        assert (ROOT / source).exists(), source
    assert 'ENTRYPOINT ["podfence"]' in lines
    assert any(line.startswith("FROM debian:bookworm") for line in lines)
    assert "podfence = " in (ROOT / "pyproject.toml").read_text()
    assert "python3-bpfcc" in (DEPLOY / "Dockerfile").read_text()


# --- certificates -------------------------------------------------------------------------------

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
SCRIPT = DEPLOY / "issue-node-cert.sh"


def issue(pki: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), "-d", str(pki), *args], capture_output=True, text=True, timeout=60
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    directory = tmp_path_factory.mktemp("pki")
    for args in (["ca"], ["server"], ["node", "worker-1", "worker-2.example"]):
        done = issue(directory, *args)
        assert done.returncode == 0, done.stderr
    return directory


def handshake(pki: Path, client_dir: Path, server_name: str) -> str:
    """Mutual TLS over a socket pair; returns the client certificate's CN as the server sees it."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(pki / "server.crt", pki / "server.key")
    server_ctx.load_verify_locations(pki / "ca.crt")
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.load_verify_locations(client_dir / "ca.crt")
    client_ctx.load_cert_chain(client_dir / "node.crt", client_dir / "node.key")
    left, right = socket.socketpair()
    seen: dict[str, Any] = {}

    def serve() -> None:
        try:
            with server_ctx.wrap_socket(left, server_side=True) as tls:
                cert = tls.getpeercert()
                assert cert is not None, "CERT_REQUIRED: the handshake fails without a client certificate"
                # typeshed types every certificate field as one union; "subject" is the RDN tuple.
                rdns = cast("tuple[tuple[tuple[str, str], ...], ...]", cert["subject"])
                subject = dict(rdn[0] for rdn in rdns)
                seen["cn"] = subject["commonName"]
                tls.sendall(b"ok")
        except (ssl.SSLError, OSError) as exc:
            seen["error"] = exc

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with client_ctx.wrap_socket(right, server_hostname=server_name) as tls:
            assert tls.recv(2) == b"ok"
    finally:
        thread.join(timeout=10)
    assert "error" not in seen, seen.get("error")
    return str(seen["cn"])


@needs_openssl
@pytest.mark.parametrize("node", ["worker-1", "worker-2.example"])
def test_node_certificate_names_the_node_in_a_mutual_tls_handshake(pki: Path, node: str) -> None:
    assert handshake(pki, pki / "nodes" / node, "podfence-control.podfence-system.svc") == node


@needs_openssl
def test_server_certificate_does_not_verify_for_another_name(pki: Path) -> None:
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(pki, pki / "nodes" / "worker-1", "attacker.example")


@needs_openssl
def test_a_node_certificate_from_another_ca_is_refused(pki: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    assert issue(other, "ca").returncode == 0
    assert issue(other, "node", "worker-1").returncode == 0
    client_dir = tmp_path / "mixed"
    client_dir.mkdir()
    for name in ("node.crt", "node.key"):
        shutil.copy(other / "nodes" / "worker-1" / name, client_dir / name)
    shutil.copy(pki / "ca.crt", client_dir / "ca.crt")  # trusts the real server
    with pytest.raises((ssl.SSLError, OSError, AssertionError)):
        handshake(pki, client_dir, "podfence-control.podfence-system.svc")


@needs_openssl
def test_node_keys_are_private_and_bad_names_refused(pki: Path) -> None:
    assert (pki / "nodes" / "worker-1" / "node.key").stat().st_mode & 0o077 == 0
    assert (pki / "ca.key").stat().st_mode & 0o077 == 0
    refused = issue(pki, "node", "Worker_1")
    assert refused.returncode == 2
    assert not (pki / "nodes" / "Worker_1").exists()


def test_the_agent_mounts_a_projected_token_for_the_control_service_only() -> None:
    from agent.control.identity import TOKEN_AUDIENCE

    spec = find("DaemonSet", "podfence-agent")["spec"]["template"]["spec"]
    volume = next(v for v in spec["volumes"] if v["name"] == "podfence-token")
    (source,) = volume["projected"]["sources"]
    assert source["serviceAccountToken"]["audience"] == TOKEN_AUDIENCE
    assert source["serviceAccountToken"]["expirationSeconds"] <= 3600
    mount = next(m for m in spec["containers"][0]["volumeMounts"] if m["name"] == "podfence-token")
    assert mount["readOnly"] is True
    assert spec["automountServiceAccountToken"] is False  # no token for the API server itself


def test_the_control_services_replica_count_matches_its_deployment() -> None:
    deployment = find("Deployment", "podfence-control")
    env = container_env(deployment["spec"]["template"]["spec"]["containers"][0])
    assert int(env["PODFENCE_REPLICAS"]) == deployment["spec"]["replicas"]
