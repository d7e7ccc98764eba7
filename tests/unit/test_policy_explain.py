"""`podfence explain` through the real CLI entry point, on a folder of YAML."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.cli import main

OBJECTS = """
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: Pod
metadata: {namespace: shop, name: web, labels: {app: web}}
spec:
  nodeName: node-1
  containers: [{name: c, ports: [{containerPort: 8080, name: http}]}]
status: {podIP: 10.0.0.1}
---
apiVersion: v1
kind: Pod
metadata: {namespace: shop, name: client, labels: {app: client}}
spec: {nodeName: node-1, containers: [{name: c}]}
status: {podIP: 10.0.0.2}
---
apiVersion: v1
kind: Pod
metadata: {namespace: shop, name: stranger, labels: {app: other}}
spec: {nodeName: node-2, containers: [{name: c}]}
status: {podIP: 10.0.0.3}
---
apiVersion: v1
kind: Pod
metadata: {namespace: shop, name: finished, labels: {app: client}}
spec: {nodeName: node-1, containers: [{name: c}]}
status: {phase: Succeeded, podIP: 10.0.0.1}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {namespace: shop, name: web-from-client}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: client}}}]
    ports: [{port: http}]
"""

INVALID = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {namespace: shop, name: broken}
spec:
  podSelector: {}
  ingress: [{ports: [{port: 70000}]}]
"""


@pytest.fixture
def source(tmp_path: Path) -> Path:
    (tmp_path / "objects.yaml").write_text(OBJECTS)
    (tmp_path / "broken.yaml").write_text(INVALID)
    return tmp_path


def explain(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["explain", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_allowed_json_names_the_rule_and_warns_about_invalid_objects(
    source: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = explain(
        capsys,
        "--source",
        str(source),
        "--from",
        "shop/client",
        "--to",
        "shop/web",
        "--port",
        "8080",
        "--json",
    )
    assert code == 0
    verdict = json.loads(out)
    assert verdict["allowed"] is True
    assert verdict["egress"] == {
        "isolated": False,
        "allowed": True,
        "policies": [],
        "allowed_by": [],
        "isolated_by": [],
        "tier": None,
        "rule": None,
        "passed": [],
    }
    assert verdict["ingress"]["isolated"] is True
    assert verdict["ingress"]["tier"] == "NetworkPolicy"
    assert verdict["ingress"]["allowed_by"] == [{"policy": "shop/web-from-client", "rule": 0}]
    assert "broken" in err and "spec.ingress[0].ports[0].port" in err  # the invalid object is left out


def test_denied_human_output_says_which_policy_isolates(
    source: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = explain(
        capsys, "--source", str(source), "--from", "shop/stranger", "--to", "shop/web", "--port", "8080"
    )
    assert code == 0
    assert "DENIED" in out.splitlines()[0]
    assert "isolated by shop/web-from-client" in out


def test_pod_ips_stand_for_their_pod_and_other_ips_are_bare(
    source: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def allowed(src: str, dst: str, port: str) -> bool:
        code, out, _ = explain(
            capsys, "--source", str(source), "--from", src, "--to", dst, "--port", port, "--json"
        )
        assert code == 0
        return bool(json.loads(out)["allowed"])

    assert allowed("10.0.0.2", "10.0.0.1", "8080")  # shop/client -> shop/web on the named port
    assert not allowed("10.0.0.2", "shop/web", "9090")  # the named port opens only 8080
    assert not allowed("192.0.2.7", "shop/web", "8080")  # an outside address matches no pod selector
    code, out, _ = explain(
        capsys, "--source", str(source), "--from", "shop/web", "--to", "192.0.2.1", "--port", "443", "--json"
    )
    assert code == 0 and json.loads(out)["allowed"] is True


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--from", "shop/nobody", "--to", "shop/web", "--port", "80"], "unknown pod"),
        (["--from", "shop/finished", "--to", "shop/web", "--port", "80"], "has terminated"),
        (["--from", "10.0.0.300", "--to", "shop/web", "--port", "80"], "neither"),
        (["--from", "shop/client", "--to", "shop/web", "--port", "0"], "between 1 and 65535"),
        (["--from", "shop/client", "--to", "shop/web", "--port", "http"], "not a number"),
    ],
)
def test_bad_input_exits_2_with_a_message(
    source: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    code, out, err = explain(capsys, "--source", str(source), *args)
    assert code == 2
    assert out == ""
    assert message in err


def test_missing_source_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = explain(
        capsys, "--source", str(tmp_path / "nope"), "--from", "a/b", "--to", "a/c", "--port", "80"
    )
    assert code == 2 and "no such file" in err


def test_bad_protocol_is_a_usage_error(source: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "explain",
                "--source",
                str(source),
                "--from",
                "a/b",
                "--to",
                "a/c",
                "--port",
                "80",
                "--protocol",
                "ICMP",
            ]
        )
    assert exit_info.value.code == 2


# --- ClusterNetworkPolicy tiers ------------------------------------------------------------------

TIERS = """
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: mesh-guard}
spec:
  tier: Admin
  priority: 10
  subject: {namespaces: {}}
  ingress:
  - name: pass-http-to-owners
    action: Pass
    from: [{namespaces: {}}]
    protocols: [{tcp: {destinationPort: {number: 8080}}}]
  - name: no-proxy-admin
    action: Deny
    from: [{namespaces: {}}]
    protocols: [{tcp: {destinationPort: {number: 15000}}}]
---
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: default-deny}
spec:
  tier: Baseline
  priority: 100
  subject: {namespaces: {}}
  ingress:
  - {name: deny-all, action: Deny, from: [{namespaces: {}}]}
"""


@pytest.fixture
def tiered(tmp_path: Path) -> Path:
    (tmp_path / "objects.yaml").write_text(OBJECTS)
    (tmp_path / "tiers.yaml").write_text(TIERS)
    return tmp_path


def test_an_admin_deny_names_tier_policy_and_rule(tiered: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = explain(capsys, "--source", str(tiered), "--from", "shop/client", "--to", "shop/web",
                             "--port", "15000", "--json")
    assert code == 0
    verdict = json.loads(out)
    assert verdict["allowed"] is False
    ingress = verdict["ingress"]
    assert ingress["tier"] == "Admin" and ingress["policies"] == ["mesh-guard"]
    assert ingress["rule"] == {"kind": "ClusterNetworkPolicy", "policy": "mesh-guard", "tier": "Admin",
                               "priority": 10, "index": 1, "name": "no-proxy-admin", "action": "Deny"}
    assert err == "", "enforced by the dataplanes: no warning"
    code, out, _ = explain(capsys, "--source", str(tiered), "--from", "shop/client", "--to", "shop/web",
                           "--port", "15000")
    assert "DENIED" in out.splitlines()[0]
    assert "Admin tier: mesh-guard (priority 10) ingress[1] 'no-proxy-admin' -> Deny -> denied" in out


def test_a_pass_goes_to_network_policy_and_baseline_decides_unselected_pods(
    tiered: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = explain(capsys, "--source", str(tiered), "--from", "shop/client", "--to", "shop/web",
                           "--port", "8080", "--json")
    ingress = json.loads(out)["ingress"]
    assert ingress["tier"] == "NetworkPolicy" and ingress["allowed"] is True
    assert [p["name"] for p in ingress["passed"]] == ["pass-http-to-owners"]
    code, out, _ = explain(capsys, "--source", str(tiered), "--from", "shop/web", "--to", "shop/client",
                           "--port", "8080")
    assert code == 0 and "DENIED" in out.splitlines()[0]
    assert "Admin tier: mesh-guard (priority 10) ingress[0] 'pass-http-to-owners' -> Pass; " in out
    assert "Baseline tier: default-deny (priority 100) ingress[0] 'deny-all' -> Deny -> denied" in out


def test_no_warning_when_no_cluster_policy_takes_part(
    tiered: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = explain(capsys, "--source", str(tiered), "--from", "shop/web", "--to", "192.0.2.1",
                           "--port", "443")
    assert code == 0 and "ClusterNetworkPolicy" not in err
