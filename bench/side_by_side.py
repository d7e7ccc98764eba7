"""The eBPF dataplane built from two sources, side by side: the BPF sources of another git revision
against the working tree's, each at 10,000 rules beside a no-filter topology, in the same
time-sliced runs of same-node connections (bench/datapath.py's instrument), with the kernel's own
run time per program run (bpf_stats) for each build.

Why: a datapath change moves the connection rate by a percent or two, while on this shared
machine one build reads 0.85-0.92x of no filter from one hour to the next. Two builds measured in
the same slices compare; two runs an hour apart do not.

Run: `.venv/bin/python -m bench.side_by_side REV [ROUNDS [SECONDS]]` (root). REV is a git
revision (`HEAD~1`, a tag, a commit); ROUNDS time-sliced runs (default 8), SECONDS per variant in
each (default 5). Only `bpf/` comes from REV: the agent that programs both builds is the working
tree's, so REV's maps must have the working tree's layout. Not part of `make bench` (it has no
run()): it answers a question about a change, not about the product.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from agent.dataplane.bpf import loader
from bench import _netlab, datapath

RULES = 10_000
REPOSITORY = Path(__file__).resolve().parents[1]


def bpf_sources_of(revision: str, into: Path) -> Path:
    """`bpf/` as it is at `revision`, written under `into`; returns that folder."""
    archive = subprocess.run(
        ["git", "-C", str(REPOSITORY), "archive", revision, "bpf"], capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into / "bpf"


def programs_from(bpf_dir: Path) -> contextlib.AbstractContextManager[None]:
    """While inside, dataplanes compile the sources in `bpf_dir` (includes resolved there too)."""

    def text() -> str:
        original_dir = loader.BPF_SOURCE_DIR
        loader.BPF_SOURCE_DIR = bpf_dir
        try:
            return loader.inline_local_includes(bpf_dir / loader.MAIN_SOURCE)
        finally:
            loader.BPF_SOURCE_DIR = original_dir

    return datapath.compiled_from(text)


def loaded_programs() -> dict[int, dict[str, Any]]:
    """Every BPF program in the kernel by id, as bpftool reports it (with bpf_stats enabled,
    run_time_ns and run_cnt)."""
    shown = subprocess.run(["bpftool", "prog", "show", "-j"], capture_output=True, text=True, check=True)
    return {program["id"]: program for program in json.loads(shown.stdout)}


def run_times(owners: dict[int, tuple[str, str]]) -> dict[tuple[str, str], tuple[int, int]]:
    """(build, program name) -> (run_time_ns, run_cnt) summed over the programs of `owners`
    (program id -> (build, name)): both lab nodes of a build have their own copies."""
    programs = loaded_programs()
    totals: dict[tuple[str, str], tuple[int, int]] = {}
    for program_id, owner in owners.items():
        program = programs.get(program_id)
        if program is None:
            continue
        time_ns, count = totals.get(owner, (0, 0))
        totals[owner] = (time_ns + program.get("run_time_ns", 0), count + program.get("run_cnt", 0))
    return totals


def summarise(
    runs: list[dict[str, float]],
    before: dict[tuple[str, str], tuple[int, int]],
    after: dict[tuple[str, str], tuple[int, int]],
) -> dict[str, Any]:
    """runs: connections/s of "none", "old" and "new" per time-sliced run; before/after: run_times
    around the runs. The ratio new/old per run and its median, each build against no filter, and
    the kernel's nanoseconds per program run of each build."""
    ratios = [run["new"] / run["old"] for run in runs]
    per_run_ns: dict[str, dict[str, float]] = {}
    for (build, name), (time_ns, count) in sorted(after.items()):
        time_before, count_before = before.get((build, name), (0, 0))
        if count > count_before:
            spent = (time_ns - time_before) / (count - count_before)
            per_run_ns.setdefault(build, {})[name] = round(spent, 1)
    return {
        "new_vs_old_per_run": [round(ratio, 3) for ratio in ratios],
        "new_vs_old": round(statistics.median(ratios), 3),
        "vs_none": {
            build: round(statistics.median(run[build] / run["none"] for run in runs), 3)
            for build in ("old", "new")
        },
        "ns_per_program_run": per_run_ns,
    }


def measure(revision: str, rounds: int, seconds: float) -> dict[str, Any]:
    subprocess.run(["sysctl", "-q", "kernel.bpf_stats_enabled=1"], check=True)
    _netlab.remove_all(_netlab.PREFIX + "d")
    variants: list[datapath.Variant] = []
    owners: dict[int, tuple[str, str]] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="podfence-side-by-side-") as scratch:
            old_sources = bpf_sources_of(revision, Path(scratch))
            variants.append(datapath.build_variant(70, None, 0))
            for index, build in ((71, "old"), (72, "new")):
                present = set(loaded_programs())
                with programs_from(old_sources) if build == "old" else contextlib.nullcontext():
                    variant = datapath.build_variant(index, "bpf", RULES)
                variant.name = build
                variants.append(variant)
                owners |= {
                    program_id: (build, program.get("name", str(program_id)))
                    for program_id, program in loaded_programs().items()
                    if program_id not in present
                }
        runs = []
        before = run_times(owners)
        for number in range(rounds):
            runs.append(datapath.measure_sliced(variants, "same_node", "conn_per_s_sliced", seconds))
            print(f"side_by_side: time-sliced run {number + 1}/{rounds} done", file=sys.stderr, flush=True)
        after = run_times(owners)
    finally:
        for variant in variants:
            datapath.destroy_variant(variant)
        subprocess.run(["sysctl", "-q", "kernel.bpf_stats_enabled=0"], check=False)
    summary = summarise(runs, before, after)
    return {"revision": revision, "rounds": rounds, "seconds_per_variant": seconds, **summary}


def main(argv: list[str]) -> int:
    if not 1 <= len(argv) <= 3:
        print("usage: python -m bench.side_by_side REV [ROUNDS [SECONDS]]", file=sys.stderr)
        return 2
    rounds = int(argv[1]) if len(argv) > 1 else 8
    seconds = float(argv[2]) if len(argv) > 2 else 5.0
    print(json.dumps(measure(argv[0], rounds, seconds), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
