"""The iptables dataplane's reads of the kernel table at scale (issue 27): checking n endpoint
chains against the table costs about n, not n^2. With 10,000 single-rule policies the state
check scanned the whole table once per chain (~10 s of CPU, holding the dataplane's lock, so an
edit waited 20-60 s for its commit).

The guard is a ratio of CPU times at n and 10n in the same process, as in
test_bpf_compile_scale.py: quadratic reads ~100, linear ~10.
"""

from __future__ import annotations

import gc
import time

from agent.dataplane.iptables import verify
from agent.dataplane.iptables.kernel import FilterTable, Rule


def saved_text(chains: int) -> str:
    lines = ["*filter", ":FORWARD ACCEPT [0:0]"]
    lines += [f":PF-E{i} - [0:0]" for i in range(chains)]
    for i in range(chains):
        lines += [
            f"[1:60] -A PF-E{i} -s 10.0.{i // 256}.{i % 256}/32 -p tcp --dport 80 -j ACCEPT",
            f"[0:0] -A PF-E{i} -j DROP",
        ]
    return "\n".join([*lines, "COMMIT", ""])


def wanted(chains: int) -> dict[str, list[str]]:
    return {f"PF-E{i}": ["allow", "drop"] for i in range(chains)}


def test_chain_rules_are_the_rules_of_that_chain_in_order() -> None:
    table = FilterTable()
    table.read(saved_text(3), "filter")
    assert [r.spec for r in table.chain_rules("PF-E1")] == [
        "-s 10.0.0.1/32 -p tcp --dport 80 -j ACCEPT",
        "-j DROP",
    ]
    assert table.chain_rules("PF-NONE") == []
    # rules added after a first lookup are seen by the next one
    table.rules.append(Rule("PF-E1", "-j LOG", 0, 0))
    assert [r.spec for r in table.chain_rules("PF-E1")][-1] == "-j LOG"
    table.chain_rules("PF-E1").clear()  # a caller's list is its own
    assert len(table.chain_rules("PF-E1")) == 3


def test_drift_found_among_many_chains() -> None:
    table = FilterTable()
    table.read(saved_text(50), "filter")
    chains = wanted(50)
    chains["PF-E7"] = ["allow", "allow", "drop"]
    chains["PF-MISSING"] = ["drop"]
    assert verify.drifted_chains(table, chains) == ["PF-E7", "PF-MISSING"]


def best_times(runs: int, counts: tuple[int, ...]) -> list[float]:
    tables = []
    for count in counts:
        table = FilterTable()
        table.read(saved_text(count), "filter")
        tables.append((table, wanted(count)))
    best = [float("inf")] * len(counts)
    gc.disable()
    try:
        for _ in range(runs):
            for index, (table, chains) in enumerate(tables):
                table._indexed = -1  # a fresh read's index: built once per table read
                started = time.process_time()
                assert verify.drifted_chains(table, chains) == []
                best[index] = min(best[index], time.process_time() - started)
    finally:
        gc.enable()
    return best


def test_checking_ten_times_the_chains_costs_about_ten_times_as_much() -> None:
    small, large = 500, 5_000
    best_times(1, (small,))
    small_time, large_time = best_times(5, (small, large))
    ratio = large_time / small_time
    # linear: ~10; one scan of the table per chain was ~100
    assert ratio < 30, f"checking {large} chains took {ratio:.1f}x the time of {small}"
