"""Where the eBPF dataplane's connection cost goes: the hooks themselves, the programs' basic
per-packet work, or their flow state and policy lookups.

The same-node connection rate (bench/datapath.py's time-sliced instrument) of six variants in
one run: no filter; the eBPF dataplane at 10,000 rules; and the same dataplane built with
benchmark-only build knobs (bpf/lib/common.h, -D flags, each 0 in the agent's builds):
  - tc_passes / nf_passes / hooks_only (PF_BENCH_TC_PASS, PF_BENCH_NF_PASS, both): the tc
    programs, the netfilter programs, or all of them return "pass" as their first statement.
    Every hook stays in place (clsact and its filters on each pod interface, the netfilter links
    at FORWARD and LOCAL_IN) but does no work, so what hooks_only adds per connection over no
    filter is what the kernel charges for running a BPF program at those hooks at all: the
    floor no program can go under.
  - no_flow_state (PF_BENCH_NO_FLOW_STATE): the programs parse, look up the endpoint and the
    anti-spoofing address and count, but neither touch the flow table nor look up policy.

Reported per variant: median connections/s, the median of the per-run ratios against no filter,
and what it adds per connection (1/rate - 1/rate of no filter, microseconds). The split:
hooks; tc_work = nf_passes - hooks_only and nf_work = tc_passes - hooks_only (each group's work
measured alone; together they cost less than the sum, because the first program to touch a
flow's entry pays its cache misses); basics = no_flow_state - hooks_only;
flow_state_and_policy = full - no_flow_state.

These variants exist in this benchmark alone: the agent never sets a PF_BENCH_* knob, and its
build compiles to the same instructions as before the knobs existed. Each variant is checked on a
port no rule allows: the server pod's ingress policy refuses it in tc_to_pod, so the full
dataplane and nf_passes must drop it, the others must let it through (the client is not
egress-isolated).

Run: `.venv/bin/python -m bench.hook_floor` (root). `BENCH_QUICK=1` for a smoke test,
`BENCH_FLOOR_RUNS=N` for the number of time-sliced runs (default 10).
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

from bench import _netlab, datapath

QUICK = os.environ.get("BENCH_QUICK") == "1"
RUNS = int(os.environ.get("BENCH_FLOOR_RUNS", "2" if QUICK else "10"))
SECONDS_PER_VARIANT = 1.0 if QUICK else 6.0
RULES = 10_000

# name -> (the build knobs it is compiled with, whether it drops the port no rule allows)
VARIANTS: dict[str, tuple[tuple[str, ...], bool]] = {
    "tc_passes": (("PF_BENCH_TC_PASS",), False),
    "nf_passes": (("PF_BENCH_NF_PASS",), True),
    "no_flow_state": (("PF_BENCH_NO_FLOW_STATE",), False),
    "hooks_only": (("PF_BENCH_TC_PASS", "PF_BENCH_NF_PASS"), False),
}


def build_knob_variant(index: int, name: str) -> datapath.Variant:
    defines, drops = VARIANTS[name]
    variant = datapath.build_variant(index, "bpf", RULES, must_enforce=False, bench_defines=defines)
    variant.name = name
    if variant.enforcing != drops:
        datapath.destroy_variant(variant)
        raise RuntimeError(f"{name}: a port no rule allows was {'not ' if drops else ''}dropped")
    return variant


def summarise(runs: list[dict[str, float]]) -> dict[str, Any]:
    """runs: connections/s per variant name, one dict per time-sliced run (each has "none")."""
    summary: dict[str, Any] = {}
    names = [name for name in runs[0] if name != "none"] if runs else []
    added: dict[str, float] = {}
    for name in ["none", *names]:
        # (this variant, no filter) of every run that measured both
        paired = [(run[name], run["none"]) for run in runs if run.get(name) and run.get("none")]
        if not paired:
            continue
        entry: dict[str, float] = {"conn_per_s": round(statistics.median(v for v, _ in paired))}
        if name != "none":
            entry["vs_none"] = round(statistics.median(v / b for v, b in paired), 3)
            added[name] = statistics.median(1e6 / v - 1e6 / b for v, b in paired)
            entry["added_us_per_conn"] = round(added[name], 2)
        summary[name] = entry
    if {"bpf_10000", "hooks_only", "nf_passes", "tc_passes", "no_flow_state"} <= added.keys():
        summary["split_us_per_conn"] = {
            "hooks": round(added["hooks_only"], 2),
            "tc_work": round(added["nf_passes"] - added["hooks_only"], 2),
            "nf_work": round(added["tc_passes"] - added["hooks_only"], 2),
            "basics": round(added["no_flow_state"] - added["hooks_only"], 2),
            "flow_state_and_policy": round(added["bpf_10000"] - added["no_flow_state"], 2),
        }
    return summary


def run() -> dict[str, Any]:
    _netlab.remove_all(_netlab.PREFIX + "d")
    started = time.monotonic()
    variants: list[datapath.Variant] = []
    try:
        variants.append(datapath.build_variant(60, None, 0))
        variants.append(datapath.build_variant(61, "bpf", RULES))
        for index, name in enumerate(VARIANTS, start=62):
            variants.append(build_knob_variant(index, name))
        runs = []
        for number in range(RUNS):
            runs.append(
                datapath.measure_sliced(variants, "same_node", "conn_per_s_sliced", SECONDS_PER_VARIANT)
            )
            print(f"hook_floor: time-sliced run {number + 1}/{RUNS} done", flush=True)
    finally:
        for variant in variants:
            datapath.destroy_variant(variant)
    return {
        "same_node_conn_per_s": summarise(runs),
        "runs": RUNS,
        "seconds_per_variant": SECONDS_PER_VARIANT,
        "elapsed_seconds": round(time.monotonic() - started, 1),
    }


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
