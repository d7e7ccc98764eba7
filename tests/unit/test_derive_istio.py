"""`podfence derive --istio`: the policies of bookinfo and of the shop, checked with the evaluator.

Each test lists by hand the connections the mesh's routes declare, then judges every pair of
endpoints on every port with the reference evaluator: every declared connection is allowed,
and anything else allowed is either listed in the summary with its reason or between endpoints
no policy selects at all (istiod, the cluster DNS, the outside, which the output leaves alone).
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from agent.model.load import load_folder
from agent.model.objects import IPAddress, NetworkPolicy, Pod
from tests.unit.derive_helpers import (
    BOOKINFO_ISTIO,
    DATA,
    ENVOY_PORTS,
    OUTSIDE,
    Conn,
    allowed,
    beyond_listed,
    dns_to,
    extra_pod,
    isolated,
    pods_from_workloads,
    run_cli,
)

GW = "istio-system/istio-ingressgateway"
ISTIOD = "istio-system/istiod"
DNS = "kube-system/cluster-dns"


def _endpoints(folder: Path) -> dict[str, Pod | IPAddress]:
    endpoints: dict[str, Pod | IPAddress] = dict(pods_from_workloads(folder))
    endpoints[ISTIOD] = extra_pod("istio-system", "istiod", {"app": "istiod"}, "10.99.1.1")
    endpoints[DNS] = extra_pod("kube-system", "cluster-dns", {"k8s-app": "kube-dns"}, "10.99.1.2")
    endpoints["world"] = OUTSIDE
    return endpoints


def _check(
    policies: list[NetworkPolicy],
    summary: dict[str, object],
    endpoints: dict[str, Pod | IPAddress],
    ports: set[tuple[str, int]],
    expected: set[Conn],
) -> set[Conn]:
    got = allowed(policies, endpoints, ports)
    assert expected - got == set(), "declared connections denied"
    unexplained = {
        c
        for c in got - expected - beyond_listed(summary)  # type: ignore[arg-type]
        if isolated(policies, endpoints[c[0]]) or isolated(policies, endpoints[c[1]])
    }
    assert unexplained == set(), "allowed beyond the routes and not in the summary"
    return got


def _bookinfo_expected() -> set[Conn]:
    app = ["bookinfo/productpage-v1", "bookinfo/details-v1", "bookinfo/ratings-v1"]
    reviews = [f"bookinfo/reviews-{v}" for v in ("v1", "v2", "v3")]
    proxies = [GW, *app, *reviews]
    return {
        ("world", GW, "TCP", 80),
        ("world", GW, "TCP", 443),
        (GW, "bookinfo/productpage-v1", "TCP", 9080),
        ("bookinfo/productpage-v1", "bookinfo/details-v1", "TCP", 9080),
        *(("bookinfo/productpage-v1", r, "TCP", 9080) for r in reviews),
        *((r, "bookinfo/ratings-v1", "TCP", 9080) for r in reviews),
        *((p, ISTIOD, "TCP", 15012) for p in proxies),
        *dns_to(proxies, DNS),
    }


BOOKINFO_PORTS = {("TCP", 9080), ("TCP", 80), ("TCP", 443), ("UDP", 53), ("TCP", 53), ("TCP", 15012)} | {
    ("TCP", p) for p in ENVOY_PORTS
}


def test_bookinfo_routes_allowed_and_nothing_else(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    run = run_cli(capsys, tmp_path, "derive", "--istio", str(BOOKINFO_ISTIO))
    assert run.code == 0 and run.summary["ok"] is True
    endpoints = _endpoints(BOOKINFO_ISTIO)
    got = _check(run.policies, run.summary, endpoints, BOOKINFO_PORTS, _bookinfo_expected())
    app_pods = [k for k in endpoints if k.startswith("bookinfo/") or k == GW]
    assert not {c for c in got if c[1] in app_pods and c[3] in ENVOY_PORTS}, "an Envoy port is open"
    assert ("bookinfo/reviews-v1", "bookinfo/details-v1", "TCP", 9080) not in got
    assert ("bookinfo/details-v1", "bookinfo/ratings-v1", "TCP", 9080) not in got
    # The ingress gateway accepts 80/443 from any source: the summary says so, with the rule.
    listed = {(b["from"], b["to"], b["port"]): b["reason"] for b in run.summary["allowed_beyond"]}
    assert "(any source)" in listed[(DNS, GW, 80)]
    notes = {(n["name"], n["field"]) for n in run.summary["not_translated"]}
    assert ("bookinfo/ratings-viewer", "spec.rules[0].to") in notes  # methods: GET is L7


def test_bookinfo_matches_the_hand_written_policies(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """The derived set allows exactly what agent/lab/bookinfo's policies allow, but for istiod,
    which the lab has not (the hand-written policies isolate all of istio-system), and for the
    DNS pod's own ingress, which the lab fences and derive leaves to kube-system's owners."""
    hand_folder = BOOKINFO_ISTIO.parent
    hand = [o for o in load_folder(hand_folder).objects if isinstance(o, NetworkPolicy)]
    assert {p.name for p in hand} >= {"productpage", "reviews", "ratings", "details", "ingressgateway"}
    run = run_cli(capsys, tmp_path, "derive", "--istio", str(BOOKINFO_ISTIO))
    endpoints = _endpoints(BOOKINFO_ISTIO)
    derived = {c for c in allowed(run.policies, endpoints, BOOKINFO_PORTS) if ISTIOD not in c and c[1] != DNS}
    written = {c for c in allowed(hand, endpoints, BOOKINFO_PORTS) if ISTIOD not in c and c[1] != DNS}
    assert derived == written

    diff = run_cli(capsys, tmp_path, "derive", "--istio", str(BOOKINFO_ISTIO), "--diff", str(hand_folder))
    assert diff.code == 0
    changed = diff.summary["newly_denied"] + diff.summary["newly_allowed"]
    assert changed and all(ISTIOD in (d["from"], d["to"]) or d["to"] == DNS for d in changed)


def test_shop_subsets_canary_payments_and_envoy_admin(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    folder = DATA / "shop"
    run = run_cli(capsys, tmp_path, "derive", "--istio", str(folder))
    assert run.code == 0, run.stderr
    shop = {
        name: f"shop/{name}" for name in ("frontend", "frontend-canary", "cart", "redis-cart", "checkout")
    }
    cat1, cat2 = "shop/catalog-v1", "shop/catalog-v2"
    pay = ["payments/payment-v1", "payments/payment-v2"]
    fronts = [shop["frontend"], shop["frontend-canary"]]
    proxies = [GW, *shop.values(), cat1, cat2, *pay]
    expected = {
        ("world", GW, "TCP", 8080),  # the Gateway's port 80 is the Service port; the pod listens on 8080
        ("world", GW, "TCP", 8443),
        *((GW, f, "TCP", 8080) for f in fronts),
        (shop["frontend"], cat1, "TCP", 3550),
        (shop["frontend-canary"], cat2, "TCP", 3550),  # sourceLabels route: the canary sees v2 only
        (shop["checkout"], cat1, "TCP", 3550),
        *((f, shop["cart"], "TCP", 7070) for f in fronts),
        (shop["checkout"], shop["cart"], "TCP", 7070),
        *((f, shop["checkout"], "TCP", 5050) for f in fronts),
        (shop["cart"], shop["redis-cart"], "TCP", 6379),
        *((shop["checkout"], p, "TCP", 50051) for p in pay),  # 90/10 split: both versions
        *((p, ISTIOD, "TCP", 15012) for p in proxies),
        *dns_to(proxies, DNS),
        *((p, "198.51.100.0/28", "TCP", 443) for p in pay),
        # Every address outside reaches the gateway, as "world" does.
        *((o, GW, "TCP", n) for o in ("198.51.100.0/28", "198.51.100.99") for n in (8080, 8443)),
    }
    ports = {(p, n) for _, _, p, n in expected} | {("TCP", p) for p in ENVOY_PORTS}
    endpoints = _endpoints(folder)
    endpoints["198.51.100.0/28"] = ipaddress.ip_address("198.51.100.1")
    endpoints["198.51.100.99"] = ipaddress.ip_address("198.51.100.99")  # outside the entry's range
    got = _check(run.policies, run.summary, endpoints, ports, expected)
    assert (pay[0], "198.51.100.99", "TCP", 443) not in got
    assert (shop["checkout"], "198.51.100.0/28", "TCP", 443) not in got
    assert ("world", GW, "TCP", 15000) not in got
    assert (shop["frontend-canary"], cat1, "TCP", 3550) not in got
    assert (shop["cart"], pay[0], "TCP", 50051) not in got
    assert {p.key for p in run.policies} >= {"shop/default-deny", "payments/default-deny"}
    notes = {(n["kind"], n["name"], n["field"]) for n in run.summary["not_translated"]}
    assert ("Gateway", "shop/shop-gateway", "spec.servers[2].port") in notes  # port 15000 refused
    assert ("AuthorizationPolicy", "payments/no-plaintext", "spec.action") in notes  # DENY
    assert ("ServiceEntry", "payments/card-processor", "spec.resolution") in notes  # DNS: no address
    # The fraud check's fixed addresses: payments may reach them on 443, shop's workloads (whose
    # Sidecar lists only their own namespace and istio-system) may not.
    fraud = [e for e in run.summary["declared"] if e["to"] == "198.51.100.0/28"]
    assert {(e["from"], e["port"]) for e in fraud} == {(p, 443) for p in pay}


def test_without_sidecars_or_authorization_every_workload_may_call(tmp_path: Path) -> None:
    """Istio's default lets every workload call every Service; the derivation says so."""
    from agent.derive.inputs import read_documents
    from agent.derive.istio import derive_istio

    text = (DATA / "shop" / "workloads.yaml").read_text()
    (tmp_path / "w.yaml").write_text(text)
    graph = derive_istio(read_documents(tmp_path))
    callers = {e.source.key for e in graph.edges if e.destination.key == "payments/payment-v1"}
    assert callers == {
        GW,
        "shop/frontend",
        "shop/frontend-canary",
        "shop/cart",
        "shop/redis-cart",
        "shop/checkout",
        "shop/catalog-v1",
        "shop/catalog-v2",
        "payments/payment-v2",
    }
    assert any("no Sidecar or AuthorizationPolicy" in n.why for n in graph.notes)


def test_root_namespace_policy_with_selector_applies_in_every_namespace(tmp_path: Path) -> None:
    from agent.derive.inputs import read_documents
    from agent.derive.istio import derive_istio

    (tmp_path / "w.yaml").write_text((DATA / "shop" / "workloads.yaml").read_text())
    (tmp_path / "ap.yaml").write_text(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
        "metadata: {namespace: istio-system, name: payment-callers}\n"
        "spec:\n  selector: {matchLabels: {app: payment}}\n"
        "  rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/checkout]}}]}]\n"
    )
    graph = derive_istio(read_documents(tmp_path))
    callers = {e.source.key for e in graph.edges if e.destination.key == "payments/payment-v1"}
    assert callers == {"shop/checkout"}


def test_host_network_workloads_are_listed_not_selected(tmp_path: Path) -> None:
    from agent.derive.inputs import read_documents
    from agent.derive.istio import derive_istio

    (tmp_path / "w.yaml").write_text(
        "apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {namespace: monitoring, name: node-exporter}\n"
        "spec:\n  template:\n    metadata: {labels: {app: node-exporter}}\n"
        "    spec: {hostNetwork: true, containers: [{name: e, ports: [{containerPort: 9100}]}]}\n"
    )
    graph = derive_istio(read_documents(tmp_path))
    assert all(w.name != "node-exporter" for w in graph.workloads)
    assert [(n.name, n.field) for n in graph.notes] == [("monitoring/node-exporter", "spec.hostNetwork")]
