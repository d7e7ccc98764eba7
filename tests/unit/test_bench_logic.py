"""Unit tests of the benchmarks' pure parts: the rule-heavy NodeState, the ratio summary, the
propagation prober's flip detection and the Markdown report. (The measurements themselves need
root and namespaces; they run under `make bench`.)"""

from __future__ import annotations

import dataclasses
import ipaddress
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from agent.dataplane.bpf import loader
from agent.dataplane.types import CidrPeer, IdentityPeer
from bench import _workload, datapath, hook_floor, propagation, report, resolver, side_by_side
from bench._netlab import BenchNode, BenchPod, Topology


def _topology() -> Topology:
    topology = Topology(tag="unit")
    for index in (1, 2):
        topology.nodes[f"n{index}"] = BenchNode(f"n{index}", index, f"ns-n{index}", f"10.78.0.{index}", "/x")
    for name, node, ip, ifindex in (("client", "n1", "10.77.1.10", 5), ("local", "n1", "10.77.1.11", 6),
                                    ("remote", "n2", "10.77.2.10", 7)):
        topology.pods[name] = BenchPod(name, node, ip, f"ns-{name}", f"pfb{name}", ifindex)
    return topology


def test_node_state_puts_the_allowing_rules_last_among_non_matching_ones() -> None:
    topology = _topology()
    state = datapath.node_state(topology, "n1", rules=1_000)
    server = state.endpoints["bench/local"]
    assert server.ingress.isolated
    assert len(server.ingress.allows) == 1_000 + 4
    allowing = server.ingress.allows[-4:]
    assert {a.peer for a in allowing} == {IdentityPeer(datapath.CLIENT_IDENTITY)}
    assert state.identities[datapath.CLIENT_IDENTITY] == (ipaddress.IPv4Address("10.77.1.10"),)
    client_ip = ipaddress.IPv4Address("10.77.1.10")
    for allow in server.ingress.allows[:-4]:
        if isinstance(allow.peer, CidrPeer):
            assert client_ip not in allow.peer.cidr
        else:
            assert client_ip not in state.identities[allow.peer.identity]
    # the client endpoint is present (so it is not an unknown, dropped interface) and not isolated
    assert not state.endpoints["bench/client"].ingress.isolated
    assert state.pod_interfaces == frozenset({5, 6})
    assert "bench/remote" not in state.endpoints


def test_summary_ratios_are_per_repetition_against_no_filter() -> None:
    samples = {"same_node": {"conn_per_s": {
        "none": [100.0, 200.0, 100.0],
        "bpf_10": [90.0, 180.0, 100.0],
        "bpf_10000": [81.0, 180.0, 95.0],
    }}}
    summary = datapath.summarise(samples)
    assert summary["same_node"]["bpf_10"]["conn_per_s_vs_none"] == 0.9
    assert summary["same_node"]["bpf_10000"]["conn_per_s_10000_vs_10"] == 0.95
    assert summary["same_node"]["none"]["conn_per_s"] == 100.0
    assert "conn_per_s_vs_none" not in summary["same_node"]["none"]
    # the spread: lowest and highest per-repetition ratio
    assert summary["same_node"]["bpf_10000"]["conn_per_s_vs_none_range"] == [0.81, 0.95]
    assert summary["same_node"]["bpf_10000"]["conn_per_s_10000_vs_10_range"] == [0.9, 1.0]
    checked = datapath.targets(summary)
    assert checked["conn_per_s_vs_none >= 0.90"] is True
    assert checked["median_lowest_highest"]["conn_per_s_vs_none"] == [0.9, 0.81, 0.95]
    assert "conn_per_s_vs_none 0.9 (0.81-0.95)" in "\n".join(
        report.render_datapath(
            {"results": summary, "targets": checked, "seconds": {"iperf": 1, "conn": 1, "udp": 1}}
        )
    )


def _probe(sent: float, allowed: bool) -> propagation.Probe:
    return propagation.Probe(sent, socket.socket(), allowed)


def test_flip_is_the_start_of_the_final_settled_run_of_the_new_verdict() -> None:
    probes = [_probe(0.000, True), _probe(0.002, False), _probe(0.004, True)]
    probes += [_probe(0.006 + 0.002 * i, False) for i in range(propagation.SETTLE_PROBES)]
    try:
        assert propagation._settled_flip(probes, new_verdict=False) == 0.006
        assert propagation._settled_flip(probes[:-1], new_verdict=False) is None  # not settled yet
    finally:
        for probe in probes:
            probe.sock.close()


def test_report_renders_known_and_unknown_benchmarks() -> None:
    results = {
        "date": "2026-11-22",
        "machine": "box x86_64 6.18",
        "propagation": {"pods": 100, "poll_interval_s": 0.02, "probe_interval_ms": 2.0,
                        "bpf": {"edits": 50, "missed": 0, "p50_ms": 31.5, "p99_ms": 80.0},
                        "iptables": {"error": "boom"}},
        "something_new": {"a": {"b": 1.5}},
        "broken": {"error": "RuntimeError('x')"},
    }
    text = report.render(results)
    assert "Date: 2026-11-22. Machine: box x86_64 6.18." in text
    assert "| bpf | 50 | 0 | 31.5 | 80.0 |" in text
    assert "`iptables` failed: `boom`" in text
    assert "| a.b | 1.5 |" in text
    assert "Failed: `RuntimeError('x')`" in text


def test_summary_leaves_out_failed_runs() -> None:
    nan = float("nan")
    samples = {"cross_node": {"tcp_gbps": {"none": [10.0, nan, 10.0], "bpf_10": [9.0, 9.0, nan]}}}
    summary = datapath.summarise(samples)
    assert summary["cross_node"]["none"]["tcp_gbps"] == 10.0
    assert summary["cross_node"]["bpf_10"]["tcp_gbps"] == 9.0
    assert summary["cross_node"]["bpf_10"]["tcp_gbps_vs_none"] == 0.9  # only repetition 1 pairs up


def test_time_slices_visit_every_variant_once_a_round_in_an_order_every_worker_shares() -> None:
    first, second = _workload.Slices(100.0, 0.02, 4), _workload.Slices(100.0, 0.02, 4)
    orders = []
    for round_ in range(40):
        moments = [100.0 + (round_ * 4 + k) * 0.02 + 0.005 for k in range(4)]
        order = [first.at(t)[1] for t in moments]
        assert sorted(order) == [0, 1, 2, 3]
        assert [second.at(t)[1] for t in moments] == order  # another worker, the same schedule
        assert all(first.at(t)[0] == round_ for t in moments)
        orders.append(tuple(order))
    assert len(set(orders)) > 4  # no variant always follows the same one


def test_time_sliced_figures_decide_the_targets_and_the_aa_control_is_reported() -> None:
    samples = {"same_node": {
        # per run: the neighbours' bursts make the A/A control read 0.7-1.3
        "conn_per_s": {"none": [100.0, 100.0], "none_again": [130.0, 70.0], "bpf_10": [70.0, 120.0],
                       "bpf_10000": [60.0, 110.0]},
        "conn_per_s_sliced": {"none": [100.0, 100.0], "none_again": [99.0, 101.0], "bpf_10": [95.0, 94.0],
                              "bpf_10000": [93.0, 92.0]},
    }}
    summary = datapath.summarise(samples)
    checked = datapath.targets(summary)
    assert checked["conn_per_s_vs_none >= 0.90"] is True
    assert checked["decided_by"]["conn_per_s_vs_none >= 0.90"] == "conn_per_s_sliced_vs_none"
    assert checked["conn_per_s_10000_vs_10 >= 0.97"] is True  # 93/95, 92/94
    assert checked["tcp_gbps_vs_none >= 0.95"] is None  # not measured
    assert checked["aa_control"]["conn_per_s_sliced_vs_none"] == 1.0
    assert summary["same_node"]["none_again"]["conn_per_s_vs_none_range"] == [0.7, 1.3]
    result = {"results": summary, "targets": checked, "seconds": {"iperf": 1, "conn": 1, "udp": 1},
              "sliced": {"repetitions": 2, "conn": {"slot_seconds": 0.02, "seconds_per_variant": 8.0},
                         "stream": {"slot_seconds": 0.25, "seconds_per_variant": 3.0}}}
    text = "\n".join(report.render_datapath(result))
    assert "| bpf_10000 | 92.5 | 0.925 (0.92-0.93) |" in text
    assert "A/A control (`none_again` vs `none`): conn_per_s_sliced_vs_none 1" in text


def test_hook_floor_builds_each_variant_with_its_knobs_and_the_agent_with_none() -> None:
    assert {name: set(defines) for name, (defines, _) in hook_floor.VARIANTS.items()} == {
        "tc_passes": {"PF_BENCH_TC_PASS"},
        "nf_passes": {"PF_BENCH_NF_PASS"},
        "no_flow_state": {"PF_BENCH_NO_FLOW_STATE"},
        "hooks_only": {"PF_BENCH_TC_PASS", "PF_BENCH_NF_PASS"},
    }
    assert [name for name, (_, drops) in hook_floor.VARIANTS.items() if drops] == ["nf_passes"]
    # every knob defaults to 0 in the C sources, and each cuts the programs somewhere
    common, program = (loader.BPF_SOURCE_DIR / "lib/common.h").read_text(), loader.program_text()
    for name in loader.BENCH_DEFINES:
        assert f"#ifndef {name}\n#define {name} 0\n#endif" in common
        assert f"if ({name})" in program or f"!{name} &&" in program
    knobs = loader.BuildKnobs("/sys/fs/bpf/t", False, 1, 1, 1, 1, 1, 1, 1, 1)
    assert not [flag for flag in knobs.cflags() if "PF_BENCH" in flag]  # the agent's build
    bench = dataclasses.replace(knobs, bench_defines=hook_floor.VARIANTS["hooks_only"][0])
    assert bench.cflags() == [*knobs.cflags(), "-DPF_BENCH_TC_PASS=1", "-DPF_BENCH_NF_PASS=1"]
    with pytest.raises(ValueError, match="PF_UNKNOWN_ALLOW"):  # no agent knob through this door
        dataclasses.replace(knobs, bench_defines=("PF_UNKNOWN_ALLOW",))
    assert not hasattr(hook_floor, "REWRITES")  # nothing rewrites the program text any more


def test_hook_floor_summary_splits_the_added_time_per_connection() -> None:
    # 1/rate: none 20 us, full 25 us, hooks only 21 us, nf passing 23 us, tc passing 24 us,
    # without flow state 22 us
    rates = {"none": 50_000.0, "bpf_10000": 40_000.0, "tc_passes": 1e6 / 24, "nf_passes": 1e6 / 23,
             "no_flow_state": 1e6 / 22, "hooks_only": 1e6 / 21}
    summary = hook_floor.summarise([rates, {name: rate * 0.5 for name, rate in rates.items()}])
    assert summary["none"] == {"conn_per_s": 37_500}
    assert summary["bpf_10000"]["vs_none"] == 0.8
    # the halved run adds twice the time: the median of 5 and 10 us
    assert summary["bpf_10000"]["added_us_per_conn"] == 7.5
    assert summary["split_us_per_conn"] == {"hooks": 1.5, "tc_work": 3.0, "nf_work": 4.5, "basics": 1.5,
                                            "flow_state_and_policy": 4.5}


def test_report_renders_the_hook_floor_table_and_split() -> None:
    rates = {"none": 50_000.0, "bpf_10000": 40_000.0, "tc_passes": 45_000.0, "nf_passes": 44_000.0,
             "no_flow_state": 46_000.0, "hooks_only": 48_000.0}
    result = {"same_node_conn_per_s": hook_floor.summarise([rates]), "runs": 1, "seconds_per_variant": 6.0}
    text = report.render({"date": "d", "machine": "m", "hook_floor": result})
    assert "| eBPF, 10,000 rules | 40,000 | 0.8 | 5 |" in text
    assert "Added per connection: the hooks 0.83 µs" in text


def test_resolver_peak_rss_is_its_own_process_images_not_its_parents() -> None:
    # `make bench` runs the resolver after modules that grow the process by hundreds of MB; the
    # resolver measures in a child, whose ru_maxrss would still carry this (parent's) peak
    ballast = bytearray(300 * 1024 * 1024)
    ballast[::4096] = b"x" * len(ballast[::4096])  # touched: resident, not just reserved
    child = subprocess.run(
        [sys.executable, "-c", "from bench.resolver import peak_rss_kib; print(peak_rss_kib())"],
        capture_output=True, text=True, check=True,
    )
    del ballast
    assert resolver.peak_rss_kib() > 300 * 1024
    assert int(child.stdout) < 150 * 1024


def test_side_by_side_compiles_the_sources_of_a_revision_with_their_own_includes(tmp_path: Path) -> None:
    sources = side_by_side.bpf_sources_of("HEAD", tmp_path)
    common = sources / "lib" / "common.h"
    common.write_text(common.read_text() + "\n/* from HEAD */\n")
    with side_by_side.programs_from(sources):
        text = loader.program_text()
    assert "/* from HEAD */" in text  # an include resolved in the revision's folder, not the tree's
    assert "/* from HEAD */" not in loader.program_text()  # and the working tree's again after
    assert sources != loader.BPF_SOURCE_DIR


def test_side_by_side_summary_compares_the_builds_round_by_round() -> None:
    runs = [{"none": 100.0, "old": 80.0, "new": 88.0}, {"none": 50.0, "old": 45.0, "new": 45.0},
            {"none": 90.0, "old": 81.0, "new": 83.7}]
    before = {("old", "tc_to_pod"): (1_000, 10), ("new", "tc_to_pod"): (0, 0)}
    after = {("old", "tc_to_pod"): (5_000, 30), ("new", "tc_to_pod"): (3_000, 20), ("new", "idle"): (7, 0)}
    summary = side_by_side.summarise(runs, before, after)
    assert summary["new_vs_old_per_run"] == [1.1, 1.0, 1.033]
    assert summary["new_vs_old"] == 1.033
    assert summary["vs_none"] == {"old": 0.9, "new": 0.9}
    assert summary["ns_per_program_run"] == {"old": {"tc_to_pod": 200.0}, "new": {"tc_to_pod": 150.0}}
