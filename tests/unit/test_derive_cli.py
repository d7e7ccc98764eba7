"""The contract of `podfence derive` and `podfence suggest` (docs/design.md): YAML of
NetworkPolicies alone on stdout, the summary on stderr or in --summary-json, exit 0 only when
the output allows everything declared or observed, 1 on failure, 2 on bad usage or input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

import agent.derive.output as output
from agent.cli import main
from tests.unit.derive_helpers import BOOKINFO_ISTIO, DATA, REPO

JOBS = DATA / "jobrunner"


def _call(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_stdout_is_only_policies_and_the_summary_goes_to_stderr() -> None:
    # A real process: nothing (logging included) may reach stdout but the YAML.
    done = subprocess.run(
        [sys.executable, "-m", "agent.cli", "derive", "--istio", str(BOOKINFO_ISTIO)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    docs = list(yaml.safe_load_all(done.stdout))
    assert docs and all(
        d["kind"] == "NetworkPolicy" and d["apiVersion"] == "networking.k8s.io/v1" for d in docs
    )
    assert done.stderr.startswith("podfence derive: ") and "every one allowed" in done.stderr


def test_summary_json_replaces_stderr(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    target = tmp_path / "s.json"
    code, out, err = _call(
        capsys,
        "suggest",
        "--flows",
        str(JOBS / "flows.jsonl"),
        "--source",
        str(JOBS),
        "--summary-json",
        str(target),
    )
    assert (code, err) == (0, "")
    summary = json.loads(target.read_text())
    assert summary["ok"] is True and summary["flow_records"] == len(
        (JOBS / "flows.jsonl").read_text().splitlines()
    )
    assert len(summary["policies"]) == len(list(yaml.safe_load_all(out)))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["derive", "--istio", "/nonexistent/podfence"], "no such file or directory"),
        (["derive", "--istio", str(BOOKINFO_ISTIO), "--dns", "kube-dns"], "--dns"),
        (
            ["suggest", "--flows", str(JOBS / "flows.jsonl"), "--source", str(JOBS), "--min-count", "0"],
            "--min-count",
        ),
        (
            ["suggest", "--flows", str(JOBS / "flows.jsonl"), "--source", str(JOBS), "--prefix-length", "33"],
            "--prefix-length",
        ),
        (["suggest", "--flows", "/nonexistent.jsonl", "--source", str(JOBS)], "--flows"),
    ],
)
def test_bad_usage_exits_2(capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    code, out, err = _call(capsys, *argv)
    assert (code, out) == (2, "")
    assert message in err


def test_bad_input_exits_2_with_where(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    flows = tmp_path / "flows.jsonl"
    lines = (JOBS / "flows.jsonl").read_text().splitlines()
    flows.write_text(lines[0] + "\n{not json\n")
    code, out, err = _call(capsys, "suggest", "--flows", str(flows), "--source", str(JOBS))
    assert (code, out) == (2, "") and f"{flows}:2:" in err
    flows.write_text(lines[0].replace('"10.244.', '"10.999.', 1) + "\n")
    code, out, err = _call(capsys, "suggest", "--flows", str(flows), "--source", str(JOBS))
    assert (code, out) == (2, "") and "is not an IP address" in err
    (tmp_path / "istio").mkdir()
    (tmp_path / "istio" / "bad.yaml").write_text(
        "kind: Service\nmetadata: {name: a}\nspec: {ports: [{port: 70000}]}\n"
    )
    code, out, err = _call(capsys, "derive", "--istio", str(tmp_path / "istio"))
    assert (code, out) == (2, "") and "70000" in err
    (tmp_path / "istio" / "bad.yaml").write_text("kind: [unclosed\n")
    code, out, err = _call(capsys, "derive", "--istio", str(tmp_path / "istio"))
    assert (code, out) == (2, "") and "invalid YAML" in err


def test_output_that_would_deny_a_route_is_not_printed(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    real = output.render

    def drop_rules(*args: Any, **kwargs: Any) -> list[dict[str, Any]]:
        documents = real(*args, **kwargs)
        for doc in documents:
            doc["spec"].pop("ingress", None)  # as if the renderer forgot every ingress rule
        return documents

    monkeypatch.setattr(output, "render", drop_rules)
    code, out, err = _call(capsys, "derive", "--istio", str(BOOKINFO_ISTIO))
    assert (code, out) == (1, "")
    assert "DENIED: nothing printed" in err
    assert "istio-system/istio-ingressgateway -> bookinfo/productpage-v1 TCP/9080" in err


def test_invalid_generated_object_is_a_failure_not_output(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    real = output.render

    def bad_port(*args: Any, **kwargs: Any) -> list[dict[str, Any]]:
        documents = real(*args, **kwargs)
        documents[-1]["spec"]["egress"][0]["ports"][0]["port"] = 0
        return documents

    monkeypatch.setattr(output, "render", bad_port)
    code, out, err = _call(capsys, "derive", "--istio", str(BOOKINFO_ISTIO))
    assert (code, out) == (1, "")
    assert "generated an invalid object" in err


def test_namespace_from_the_environment(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """PODFENCE_NAMESPACE is one comma-separated string, not a list of repeated flags."""
    monkeypatch.setenv("PODFENCE_NAMESPACE", "jobs,monitoring")
    code, out, _ = _call(capsys, "suggest", "--flows", str(JOBS / "flows.jsonl"), "--source", str(JOBS))
    assert code == 0
    assert {d["metadata"]["namespace"] for d in yaml.safe_load_all(out)} == {"jobs", "monitoring"}


def test_yaml_aliases_and_huge_lines_are_refused(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "istio").mkdir()
    laughs = "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\nkind: Service\n"
    (tmp_path / "istio" / "lol.yaml").write_text(laughs)
    code, out, err = _call(capsys, "derive", "--istio", str(tmp_path / "istio"))
    assert (code, out) == (2, "") and "aliases" in err
    flows = tmp_path / "flows.jsonl"
    flows.write_text('{"time": "' + "x" * 70_000 + '"}\n')
    code, out, err = _call(capsys, "suggest", "--flows", str(flows), "--source", str(JOBS))
    assert (code, out) == (2, "") and f"{flows}:1: longer than" in err


K8S_KINDS = {"Namespace", "Pod", "Service", "Deployment", "StatefulSet"}


@pytest.mark.parametrize(
    "argv",
    [
        ["derive", "--istio", str(BOOKINFO_ISTIO)],
        ["derive", "--istio", str(DATA / "shop")],
        ["suggest", "--flows", str(JOBS / "flows.jsonl"), "--source", str(JOBS), "--audit"],
    ],
    ids=["derive-bookinfo", "derive-shop", "suggest-jobrunner"],
)
def test_output_validates_against_the_kubernetes_schema(
    capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    code, out, _ = _call(capsys, *argv)
    assert code == 0
    for doc in yaml.safe_load_all(out):
        kubernetes_validate.validate(doc, "1.33.0", strict=True)


@pytest.mark.parametrize(
    "path",
    [
        BOOKINFO_ISTIO / "bookinfo.yaml",
        DATA / "shop" / "workloads.yaml",
        DATA / "shop" / "mesh.yaml",
        JOBS / "cluster.yaml",
        DATA / "bookinfo-flows" / "cluster.yaml",
    ],
    ids=lambda p: f"{p.parent.name}/{p.name}",
)
def test_test_data_is_valid_kubernetes(path: Path) -> None:
    """The apps' Kubernetes objects are what an API server would accept (Istio's kinds aside)."""
    docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    items = [item for doc in docs for item in (doc["items"] if doc["kind"] == "List" else [doc])]
    checked = [item for item in items if item["kind"] in K8S_KINDS]
    for item in checked:
        kubernetes_validate.validate(item, "1.33.0", strict=True)
    assert checked or path.name == "mesh.yaml"


def test_flows_from_stdin(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO((JOBS / "flows.jsonl").read_text()))
    code, out, err = _call(capsys, "suggest", "--flows", "-", "--source", str(JOBS))
    assert code == 0 and "observed connections, every one allowed" in err
    assert len(list(yaml.safe_load_all(out))) > 5
