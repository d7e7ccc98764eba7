"""Unit tests of the scale benchmarks' arithmetic (issue 25): the fan-out summary over simulated
agents' arrivals and the resolver's cluster sizes. The measurements themselves run under
`make bench`; nothing here is timed."""

from __future__ import annotations

import random
import threading

import pytest

from bench import _cluster, fanout, footprint, resolver


def test_a_change_reaches_all_acks_at_its_slowest_node_and_p99_takes_the_worst_changes() -> None:
    changes = [[0.1, 0.2, 0.3]] * 19 + [[0.1, 1.5, 0.2]]
    summary = fanout.summarise(changes, target_s=1.0)
    assert summary["all_acks_p50_ms"] == 300.0
    assert summary["all_acks_p99_ms"] == 1500.0  # nearest rank of 20 changes: the worst one
    assert summary["all_acks_max_ms"] == 1500.0
    assert summary["node_ack_p50_ms"] == 200.0  # pooled over every node of every change
    assert summary["target_met"] is False
    assert fanout.summarise([[0.1, 0.2, 0.3]] * 20, target_s=1.0)["target_met"] is True


def test_first_above_is_the_first_newer_version_in_arrival_order() -> None:
    history = [(3, 1.0), (4, 2.0), (6, 3.0)]
    assert fanout.first_above(history, 3) == 2.0
    assert fanout.first_above(history, 5) == 3.0
    assert fanout.first_above(history, 6) is None
    assert fanout.first_above([], 0) is None


def test_arrivals_wait_until_every_node_has_a_newer_version_and_tally_stream_errors() -> None:
    arrivals = fanout.Arrivals()
    arrivals.add([("a", 1, 10.0), ("b", 1, 10.5)])
    later = threading.Timer(0.05, arrivals.add, args=([("a", 2, 11.0), ("b", 2, 11.2)],))
    later.start()
    assert arrivals.wait_all_above(["a", "b"], 1, timeout=5) == {"a": 11.0, "b": 11.2}
    later.join()
    with pytest.raises(TimeoutError):
        arrivals.wait_all_above(["a", "b", "c"], 1, timeout=0.05)  # c never connected
    arrivals.add(("stream_errors", {"RESOURCE_EXHAUSTED": 2}))
    arrivals.add(("stream_errors", {"RESOURCE_EXHAUSTED": 1, "UNAVAILABLE": 1}))
    assert arrivals.stream_errors == {"RESOURCE_EXHAUSTED": 3, "UNAVAILABLE": 1}
    assert arrivals.finished_workers == 2


def test_fanout_streams_fit_the_control_services_default_caps() -> None:
    # The bench leaves the caps at their defaults and says so; 2,000 streams must fit them.
    assert fanout.SETTINGS.max_streams >= fanout.NODES
    assert fanout.SETTINGS.max_streams >= 2_000


@pytest.mark.parametrize("name", sorted(resolver.SIZES))
def test_resolver_sizes_divide_evenly_and_leave_room_for_added_pods(name: str) -> None:
    size = resolver.SIZES[name]
    assert size.pods % size.namespaces == 0 and size.policies % size.namespaces == 0
    assert size.pods // size.namespaces <= 90  # added pods take indexes 90..99 of a namespace


def test_resolver_large_size_is_issue_25s_cluster() -> None:
    large = resolver.SIZES["100k"]
    assert (large.pods, large.policies) == (100_000, 10_000)
    assert large.targets == {"full_resolution_s": 10.0, "incremental_median_ms": 5.0}


def test_resolver_cluster_has_the_sizes_counts_spread_over_its_nodes() -> None:
    size = resolver.Size(namespaces=10, pods=200, policies=40, nodes=7, targets={})
    namespaces, pods, policies = resolver.build_cluster(random.Random(1), size)
    assert (len(namespaces), len(pods), len(policies)) == (10, 200, 40)
    assert len({p.key for p in pods}) == 200 and len({(p.namespace, p.name) for p in policies}) == 40
    assert {p.node_name for p in pods} == {f"node-{n}" for n in range(7)}


def test_footprint_rules_give_every_endpoint_its_share_of_distinct_peers() -> None:
    policies = footprint.rules_policies(10_000, 250)
    by_app = {
        p["spec"]["podSelector"]["matchLabels"]["app"]: p["spec"]["ingress"][0]["from"] for p in policies
    }
    allows = sum(len(by_app[_cluster.pod_labels(index)["app"]]) for index in range(250))
    assert allows == 10_000  # 40 allows on each of the node's 250 endpoints
    cidrs = [peer["ipBlock"]["cidr"] for peers in by_app.values() for peer in peers]
    assert len(cidrs) == len(set(cidrs)) == 400  # 40 per app, no two apps share one


def test_resolver_teams_grow_with_the_cluster_and_leave_the_10k_cluster_as_published() -> None:
    assert resolver.SIZES["10k"].teams == 50  # the cluster of the published figures
    assert {size.namespaces // size.teams for size in resolver.SIZES.values()} == {10}
