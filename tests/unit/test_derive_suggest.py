"""`podfence suggest --flows`: least-privilege policies from recorded flows, checked with the evaluator.

Every recorded flow that counts (allowed or audit-denied, with a port, seen at least
--min-count times) must be allowed by the output; anything else allowed must be within a
workload the test maps by hand, or listed in the summary, or between endpoints no policy selects.
"""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import pytest
import yaml

from agent.model.load import load_folder
from agent.model.objects import IPAddress, NetworkPolicy, Pod
from tests.unit.derive_helpers import (
    DATA,
    OUTSIDE,
    Conn,
    allowed,
    beyond_listed,
    isolated,
    pods_from_source,
    run_cli,
)

JOBS = DATA / "jobrunner"
BOOKINFO = DATA / "bookinfo-flows"
DNS_POD = "kube-system/coredns-7db6d8ff4d-x2x9p"


def _workload_of(name: str) -> str:
    """The test's own grouping: a pod's name without its per-replica suffixes; a /24 for an IP."""
    if "/" not in name or name.count(".") == 3:
        return str(ipaddress.ip_network(f"{name}/24", strict=False)) if name != "world" else name
    namespace, pod = name.split("/")
    known = {
        "ingress-nginx-controller": "ingress-nginx",
        "coredns": "cluster-dns",
        "queue-0": "queue",
        "db-0": "db",
        "prometheus-0": "prometheus",
        "reporter-28934520-qwert": "reporter",
    }
    for prefix, workload in known.items():
        if pod.startswith(prefix):
            return f"{namespace}/{workload}"
    return f"{namespace}/{pod.rsplit('-', 2)[0]}"  # drop pod-template-hash and the random suffix


def _flows(path: Path, min_count: int) -> set[Conn]:
    """Counted flows at pod level (pods by ns/name, outside peers by IP)."""
    counts: dict[Conn, int] = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if r["verdict"] == "denied" or r["destination"]["port"] is None:
            continue
        ends = [
            f"{e['namespace']}/{e['pod']}" if e["pod"] else e["ip"] for e in (r["source"], r["destination"])
        ]
        key = (ends[0], ends[1], r["protocol"], r["destination"]["port"])
        counts[key] = counts.get(key, 0) + 1
    by_workload: dict[tuple[str, str, str, int], int] = {}
    for (s, d, p, n), c in counts.items():
        w = (_workload_of(s), _workload_of(d), p, n)
        by_workload[w] = by_workload.get(w, 0) + c
    return {
        c
        for c, n in counts.items()
        if by_workload[(_workload_of(c[0]), _workload_of(c[1]), c[2], c[3])] >= min_count
    }


def _endpoints(source: Path, flows: set[Conn], extra_outside: list[str]) -> dict[str, Pod | IPAddress]:
    endpoints: dict[str, Pod | IPAddress] = dict(pods_from_source(source))
    for name in {e for c in flows for e in c[:2] if "/" not in e} | set(extra_outside):
        endpoints[name] = ipaddress.ip_address(name)
    endpoints["world"] = OUTSIDE
    return endpoints


def _check(
    policies: list[NetworkPolicy], summary: dict, source: Path, min_count: int, extra: list[str]
) -> set[Conn]:  # type: ignore[type-arg]
    flows = _flows(source / "flows.jsonl", min_count)
    endpoints = _endpoints(source, flows, extra)
    ports = {(p, n) for _, _, p, n in flows}
    got = allowed(policies, endpoints, ports)
    assert flows - got == set(), "observed flows denied"
    seen = {(_workload_of(s), _workload_of(d), p, n) for s, d, p, n in flows}
    for c in got:
        w = (_workload_of(c[0]), _workload_of(c[1]), c[2], c[3])
        if w in seen or not (isolated(policies, endpoints[c[0]]) or isolated(policies, endpoints[c[1]])):
            continue
        assert w in beyond_listed(summary), f"{c} allowed, neither observed nor listed"
    return got


def test_job_runner(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    run = run_cli(
        capsys,
        tmp_path,
        "suggest",
        "--flows",
        str(JOBS / "flows.jsonl"),
        "--source",
        str(JOBS),
        "--min-count",
        "2",
    )
    assert run.code == 0 and run.summary["ok"], run.stderr
    got = _check(run.policies, run.summary, JOBS, 2, ["52.216.10.200", "52.216.99.1"])
    api, worker, db = "jobs/api-6b8f9c7d5-abcde", "jobs/worker-5d7f8c9b6-aaaaa", "jobs/db-0"
    assert ("jobs/scheduler-7c9d8b6f4-klmno", api, "TCP", 8000) not in got  # seen once, --min-count 2
    assert (worker, api, "TCP", 8000) not in got  # denied when observed
    assert (worker, "52.216.10.200", "TCP", 443) in got  # the same /24 as a seen peer
    assert (worker, "52.216.99.1", "TCP", 443) not in got
    assert ("world", "ingress-nginx/ingress-nginx-controller-5c8d66c76d-4kq2w", "TCP", 443) not in got
    assert (
        "jobs/worker-gpu-8f6d5c4b3-ddddd",
        db,
        "TCP",
        5432,
    ) not in got  # only the default pool uses the db
    left_out = {(e["from"], e["to"], e["port"]) for e in run.summary["excluded"]}
    assert left_out == {
        ("jobs/scheduler", "jobs/api", "TCP/8000"),
        ("jobs/worker", "jobs/api", "TCP/8000"),
        ("jobs/worker", "jobs/db", "ICMP"),
    }
    # Selectors use stable labels only, and each policy says what it was derived from.
    docs = {d["metadata"]["name"]: d for d in yaml.safe_load_all(run.stdout)}
    assert docs["reporter"]["spec"]["podSelector"] == {"matchLabels": {"app": "reporter"}}
    assert docs["queue"]["spec"]["podSelector"] == {"matchLabels": {"app": "queue"}}
    times = [
        json.loads(line)["time"]
        for line in (JOBS / "flows.jsonl").read_text().splitlines()
        if "prometheus" in line and "coredns" not in line
    ]
    notes = docs["prometheus"]["metadata"]["annotations"]
    assert notes["podfence.io/derived-from"] == f"{len(times)} flow records"
    assert (notes["podfence.io/first-seen"], notes["podfence.io/last-seen"]) == (min(times), max(times))


def test_job_runner_options(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    run = run_cli(
        capsys,
        tmp_path,
        "suggest",
        "--flows",
        str(JOBS / "flows.jsonl"),
        "--source",
        str(JOBS),
        "--label-keys",
        "app",
        "--namespace",
        "jobs",
        "--audit",
        "--prefix-length",
        "16",
    )
    assert run.code == 0, run.stderr
    docs = list(yaml.safe_load_all(run.stdout))
    assert {d["metadata"]["namespace"] for d in docs} == {"jobs"}
    assert all(d["metadata"]["annotations"]["podfence.io/mode"] == "audit" for d in docs)
    worker = next(d for d in docs if d["metadata"]["name"] == "worker")
    assert worker["spec"]["podSelector"] == {"matchLabels": {"app": "worker"}}  # both pools, one workload
    assert {"ipBlock": {"cidr": "52.216.0.0/16"}} in [
        t for r in worker["spec"]["egress"] for t in r.get("to", [])
    ]
    # ingress-nginx is outside --namespace: a peer by labels, with no policy of its own.
    api = next(d for d in docs if d["metadata"]["name"] == "api")
    assert {"app.kubernetes.io/component": "controller", "app.kubernetes.io/name": "ingress-nginx"} in [
        f["podSelector"]["matchLabels"] for r in api["spec"]["ingress"] for f in r.get("from", [])
    ]


def test_bookinfo_flows_match_the_hand_written_policies(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    run = run_cli(
        capsys, tmp_path, "suggest", "--flows", str(BOOKINFO / "flows.jsonl"), "--source", str(BOOKINFO)
    )
    assert run.code == 0, run.stderr
    got = _check(run.policies, run.summary, BOOKINFO, 1, [])
    hand_folder = Path(__file__).resolve().parents[2] / "agent" / "lab" / "bookinfo"
    hand = [o for o in load_folder(hand_folder).objects if isinstance(o, NetworkPolicy)]
    flows = _flows(BOOKINFO / "flows.jsonl", 1)
    written = allowed(hand, _endpoints(BOOKINFO, flows, []), {(p, n) for _, _, p, n in flows})

    # Among the application's pods the two agree; from anywhere else (outside, the DNS pod), suggest
    # allows only the client networks it saw, where the hand-written ingress accepts any source.
    def app(c: Conn) -> bool:
        return all(e.split("/")[0] in ("bookinfo", "istio-system") for e in c[:2])

    assert {c for c in got if app(c)} == {c for c in written if app(c)}
    assert (DNS_POD, "istio-system/istio-ingressgateway-6f8d9c7b5-gw001", "TCP", 80) in written - got
    assert ("world", "istio-system/istio-ingressgateway-6f8d9c7b5-gw001", "TCP", 80) in written - got


def test_wide_ip_blocks_that_take_in_pods_are_reported(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """An ipBlock matches pod addresses too: aggregated to /0, the clients' block admits every
    pod, and the summary must say so (the check uses the pods' real addresses)."""
    run = run_cli(
        capsys,
        tmp_path,
        "suggest",
        "--flows",
        str(JOBS / "flows.jsonl"),
        "--source",
        str(JOBS),
        "--prefix-length",
        "0",
    )
    assert run.code == 0
    beyond = {(b["from"], b["to"], b["port"]): b["reason"] for b in run.summary["allowed_beyond"]}
    assert "(an ipBlock)" in beyond[("jobs/worker", "ingress-nginx/ingress-nginx", 443)]


ADMIN_GUARD = """
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: db-guard}
spec:
  tier: Admin
  priority: 10
  subject: {pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: db}}}}
  ingress:
  - name: no-gpu-pool
    action: Deny
    from: [{pods: {namespaceSelector: {}, podSelector: {matchLabels: {pool: default}}}}]
"""


def test_cluster_network_policies_in_force_are_judged_too(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """An Admin-tier Deny in --source overrides any NetworkPolicy: a flow it denies is listed apart
    (it is the cluster admins' to change, not the output's), and the output still exits 0."""
    source = tmp_path / "source"
    source.mkdir()
    (source / "cluster.yaml").write_text((JOBS / "cluster.yaml").read_text())
    (source / "guard.yaml").write_text(ADMIN_GUARD)
    run = run_cli(capsys, tmp_path, "suggest", "--flows", str(JOBS / "flows.jsonl"), "--source", str(source))
    assert run.code == 0 and run.summary["denied_declared"] == []
    by_admin = {(d["from"], d["to"], d["port"]): d["by"] for d in run.summary["denied_by_cluster_policy"]}
    assert by_admin == {("jobs/worker", "jobs/db", 5432): "db-guard rule #0 (Admin tier)"}
