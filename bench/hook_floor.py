"""Where the eBPF dataplane's connection cost goes: the hooks themselves, or the programs' work.

The same-node connection rate (bench/datapath.py's time-sliced instrument) of five variants in
one run: no filter; the eBPF dataplane at 10,000 rules; and the same dataplane built from a
source whose tc programs (`tc_passes`), netfilter program (`nf_passes`) or all three
(`hooks_only`) return "pass" as their first statement. Those variants keep every hook in place
(clsact and its filters on each pod interface, the netfilter links at FORWARD and LOCAL_IN) but do
no work, so what `hooks_only` adds per connection over no filter is what the kernel charges for
running a BPF program at those hooks at all: the floor no program can go under.

Reported per variant: median connections/s, the median of the per-run ratios against no filter,
and what the variant adds per connection (1/rate - 1/rate of no filter, microseconds). The split
`tc_work` = nf_passes - hooks_only and `nf_work` = tc_passes - hooks_only: what each group of
programs' work adds when it runs alone. (The two overlap: the first program to touch a flow's
entry pays its cache misses, so tc_work + nf_work exceeds full - hooks_only.)

The passing variants exist in this benchmark alone: they are built by rewriting the program text
handed to BCC for their compile, never through a knob of the agent. Each rewrite must match
exactly once, and each variant is checked on a port no rule allows: the server pod's ingress
policy refuses it in tc_to_pod, so the full dataplane and `nf_passes` must drop it, while
`tc_passes` and `hooks_only` must let it through (the client is not egress-isolated).

Run: `.venv/bin/python -m bench.hook_floor` (root). `BENCH_QUICK=1` for a smoke test,
`BENCH_FLOOR_RUNS=N` for the number of time-sliced runs (default 10).
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Iterator
from typing import Any

from agent.dataplane.bpf import loader
from bench import _netlab, datapath

QUICK = os.environ.get("BENCH_QUICK") == "1"
RUNS = int(os.environ.get("BENCH_FLOOR_RUNS", "2" if QUICK else "10"))
SECONDS_PER_VARIANT = 1.0 if QUICK else 6.0
RULES = 10_000

# The first line of each program's body, and what a passing variant puts in front of it.
PROGRAM_OPENINGS = {
    "tc": (
        ("int tc_from_pod(struct __sk_buff *skb)\n{", "return TC_ACT_OK;"),
        ("int tc_to_pod(struct __sk_buff *skb)\n{", "return TC_ACT_OK;"),
    ),
    "nf": (("int nf_egress_link(struct pf_nf_ctx *ctx)\n{", "return PF_NF_ACCEPT;"),),
}

# name -> (which program groups pass at once, drops the unallowed port)
VARIANTS = {
    "tc_passes": (("tc",), False),
    "nf_passes": (("nf",), True),
    "hooks_only": (("tc", "nf"), False),
}


def passing_text(text: str, groups: tuple[str, ...]) -> str:
    """`text` with every program of `groups` returning pass as its first statement."""
    for group in groups:
        for opening, statement in PROGRAM_OPENINGS[group]:
            if text.count(opening) != 1:
                first_line = opening.splitlines()[0]
                raise RuntimeError(f"the program opening {first_line!r} is not in the source exactly once")
            text = text.replace(opening, f"{opening}\n\t{statement}  /* bench/hook_floor.py */")
    return text


@contextlib.contextmanager
def programs_passing(groups: tuple[str, ...]) -> Iterator[None]:
    """While inside, dataplanes compile the passing variant of the source."""
    original = loader.program_text
    loader.program_text = lambda: passing_text(original(), groups)
    try:
        yield
    finally:
        loader.program_text = original


def build_passing_variant(index: int, name: str) -> datapath.Variant:
    groups, drops = VARIANTS[name]
    with programs_passing(groups):
        variant = datapath.build_variant(index, "bpf", RULES, must_enforce=False)
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
        rates = [run[name] for run in runs if run.get(name) and run.get("none")]
        if not rates:
            continue
        entry: dict[str, float] = {"conn_per_s": round(statistics.median(rates))}
        if name != "none":
            paired = [(run[name], run["none"]) for run in runs if run.get(name) and run.get("none")]
            entry["vs_none"] = round(statistics.median(v / b for v, b in paired), 3)
            added[name] = statistics.median(1e6 / v - 1e6 / b for v, b in paired)
            entry["added_us_per_conn"] = round(added[name], 2)
        summary[name] = entry
    if {"hooks_only", "nf_passes", "tc_passes"} <= added.keys():
        summary["split_us_per_conn"] = {
            "hooks": round(added["hooks_only"], 2),
            "tc_work": round(added["nf_passes"] - added["hooks_only"], 2),
            "nf_work": round(added["tc_passes"] - added["hooks_only"], 2),
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
            variants.append(build_passing_variant(index, name))
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
