"""Renders a run's results.json (written by `python -m bench`) as Markdown tables in RESULTS.md.

The known benchmarks (datapath, propagation, coldstart, footprint, hook_floor) get purpose-made tables; any
other module's result is flattened into a key/value table, so a new benchmark shows up without
changes here. Run: `.venv/bin/python -m bench.report [--publish] [results.json [RESULTS.md]]`:
bench/out/ by default, the published bench/results.json and bench/RESULTS.md with --publish.
(No `run()` here on purpose: `python -m bench` treats every module with one as a benchmark.)
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
METRIC_TITLES = {"tcp_gbps": "TCP Gbit/s", "conn_per_s": "conn/s", "udp_pps": "UDP pkt/s"}
SLICED_TITLES = {"conn_per_s_sliced": "conn/s", "tcp_gbps_sliced": "TCP Gbit/s"}
PATH_TITLES = {"same_node": "same node", "cross_node": "across nodes"}


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(cell) for cell in row) + " |" for row in rows]
    return [*lines, ""]


def _errors(result: dict[str, Any]) -> list[str]:
    return [f"- `{key}` failed: `{value['error']}`" for key, value in result.items()
            if isinstance(value, dict) and "error" in value]


def _ratio(entry: dict[str, Any], name: str) -> str:
    """A median ratio with its [lowest, highest] over the repetitions."""
    if name not in entry:
        return "-"
    low_high = entry.get(f"{name}_range")
    return f"{_fmt(entry[name])} ({_fmt(low_high[0])}-{_fmt(low_high[1])})" if low_high else _fmt(entry[name])


def render_sliced(result: dict[str, Any]) -> list[str]:
    sliced = result["sliced"]
    lines = [
        f"**Time-sliced** ({sliced['repetitions']} runs; in each, every variant in turn: connections "
        f"in slots of {sliced['conn']['slot_seconds']} s, {sliced['conn']['seconds_per_variant']} s per "
        f"variant, one bulk TCP stream per variant in slots of {sliced['stream']['slot_seconds']} s, "
        f"{sliced['stream']['seconds_per_variant']} s per variant). Ratios of each run's totals, median "
        "(lowest-highest) over the runs; `none_again` is the A/A control.",
        "",
    ]
    for path, variants in result.get("results", {}).items():
        rows = []
        for name, entry in variants.items():
            if not any(metric in entry for metric in SLICED_TITLES):
                continue
            row: list[Any] = [name]
            for metric in SLICED_TITLES:
                row += [entry.get(metric), _ratio(entry, f"{metric}_vs_none"),
                        _ratio(entry, f"{metric}_vs_conntrack")]
            row.append(_ratio(entry, "conn_per_s_sliced_10000_vs_10"))
            rows.append(row)
        if rows:
            header = ["variant"]
            for title in SLICED_TITLES.values():
                header += [title, f"{title} vs none", f"{title} vs none_conntrack"]
            lines += [f"{PATH_TITLES.get(path, path)}, time-sliced:", ""]
            lines += _table([*header, "conn/s 10k vs 10"], rows)
    return lines


def render_datapath(result: dict[str, Any]) -> list[str]:
    lines = [
        f"**Per-run**: {result.get('repetitions')} interleaved repetitions; medians; ratios are "
        "per-repetition ratios against the no-filter run of the same repetition (median). "
        f"Runs: iperf3 {result['seconds']['iperf']} s, {result.get('conn_workers')} connection workers "
        f"for {result['seconds']['conn']} s, {result.get('udp_flows')} UDP flows for "
        f"{result['seconds']['udp']} s.",
        "",
    ]
    for path, variants in result.get("results", {}).items():
        lines.append(f"**{PATH_TITLES.get(path, path)}**")
        lines.append("")
        header = ["variant"]
        for title in METRIC_TITLES.values():
            header += [title, f"{title} vs none"]
        header += ["conn/s 10k vs 10"]
        rows = []
        for name, entry in variants.items():
            row: list[Any] = [name]
            for metric in METRIC_TITLES:
                row += [entry.get(metric), entry.get(f"{metric}_vs_none")]
            row.append(entry.get("conn_per_s_10000_vs_10"))
            rows.append(row)
        lines += _table(header, rows)
        against_conntrack = [
            [name, *(entry.get(f"{metric}_vs_conntrack") for metric in METRIC_TITLES)]
            for name, entry in variants.items()
            if any(f"{metric}_vs_conntrack" in entry for metric in METRIC_TITLES)
        ]
        if against_conntrack:
            lines += _table(
                ["variant", *(f"{title} vs none_conntrack" for title in METRIC_TITLES.values())],
                against_conntrack,
            )
    if "sliced" in result:
        lines += render_sliced(result)
    targets = result.get("targets", {})
    if targets.get("checked"):
        verdicts = {True: "met", False: "NOT met", None: "not measured"}
        decided_by = targets.get("decided_by", {})
        lines.append("eBPF 10,000-rule targets (same node): " + ", ".join(
            f"{name}: {verdicts[ok]}" + (f" (`{decided_by[name]}`)" if name in decided_by else "")
            for name, ok in targets.items()
            if name not in ("checked", "median_lowest_highest", "decided_by", "aa_control")))
        lines.append("")
        control = {k: v for k, v in targets.get("aa_control", {}).items() if v is not None}
        if control:
            lines.append("A/A control (`none_again` vs `none`): "
                         + ", ".join(f"{name} {_fmt(value)}" for name, value in control.items()))
            lines.append("")
        spread = targets.get("median_lowest_highest", {})
        if spread:
            lines.append("Their spread over the repetitions (median; lowest-highest per-repetition ratio): "
                         + ", ".join(f"{name} {m} ({lo}-{hi})" for name, (m, lo, hi) in spread.items()))
            lines.append("")
    if result.get("failed_samples"):
        lines += [f"{len(result['failed_samples'])} run(s) failed and were left out "
                  "(`failed_samples` in results.json).", ""]
    if result.get("unavailable"):
        lines += [f"- variant `{k}` could not run: `{v}`" for k, v in result["unavailable"].items()] + [""]
    return lines


def render_propagation(result: dict[str, Any]) -> list[str]:
    lines = [
        f"{result.get('pods')} pods on the node; folder poll {result.get('poll_interval_s')} s; "
        f"probe every {result.get('probe_interval_ms')} ms.",
        "",
    ]
    keys = ["edits", "missed", "p50_ms", "p99_ms", "max_ms", "to_allow_p50_ms", "to_deny_p50_ms",
            "meets_target"]
    rows = [[name, *(entry.get(k) for k in keys)] for name, entry in result.items()
            if isinstance(entry, dict) and "error" not in entry]
    lines += _table(["dataplane", *keys], rows)
    stage_keys = ["write_to_control_version", "control_version_to_verdict_seen", "agent_apply_mean_ms"]
    stage_rows = [
        [name, *(entry["stages_p50_ms"].get(k) for k in stage_keys)]
        for name, entry in result.items()
        if isinstance(entry, dict) and "stages_p50_ms" in entry
    ]
    if stage_rows:
        lines += ["Where the time goes (ms; medians, the agent's apply is its own histogram's mean):", ""]
        lines += _table(["dataplane", *stage_keys], stage_rows)
    return lines + _errors(result)


def render_coldstart(result: dict[str, Any]) -> list[str]:
    lines = [f"{result.get('pods')} endpoints, {result.get('repetitions')} repetitions (medians).", ""]
    bpf = result.get("bpf_in_process", {})
    if "error" not in bpf:
        lines += _table(
            ["BpfDataplane in process", "start() = compile + load (s)", "apply() = programming (s)",
             "re-apply unchanged (s)", "apply, one endpoint changed (s)", "programming < 2 s"],
            [["bpf", bpf.get("compile_and_load_s"), bpf.get("programming_s"),
              bpf.get("reapply_unchanged_s"), bpf.get("apply_one_endpoint_changed_s"),
              bpf.get("meets_target")]],
        )
    scan = result.get("agent_interface_scan", {})
    if "scan_s" in scan:
        lines += [f"The agent's interface scan before each apply ({scan.get('pod_interfaces')} pod "
                  f"interfaces): {_fmt(scan['scan_s'])} s.", ""]
    rows = []
    for name, entry in result.items():
        if name.endswith("_agent_process") and "error" not in entry:
            for start, figures in entry.items():
                rows.append([name.removesuffix("_agent_process"), start, figures.get("to_enforced_s"),
                             figures.get("programming_sum_s")])
    if rows:
        lines += _table(["agent process", "start", "spawn to all enforced (s)",
                         "agent's programming histogram sum (s)"], rows)
    return lines + _errors(result)


def render_footprint(result: dict[str, Any]) -> list[str]:
    lines = [
        f"{result.get('pods')} pods; idle {result.get('idle_seconds')} s; churn "
        f"{result.get('churn_rate_per_s')} events/s.",
        "",
    ]
    keys = ["idle_cpu_percent", "idle_rss_mib", "startup_peak_rss_mib", "churn_seconds", "churn_cpu_s",
            "churn_cpu_percent", "churn_peak_rss_mib", "rss_after_churn_mib"]
    rows = []
    for dataplane, entry in result.items():
        if isinstance(entry, dict) and "error" not in entry:
            for process in ("agent", "control"):
                if process in entry:
                    rows.append([dataplane, process, *(entry[process].get(k) for k in keys)])
    lines += _table(["dataplane", "process", *keys], rows)
    return lines + _errors(result)


HOOK_FLOOR_TITLES = {
    "none": "no filter",
    "bpf_10000": "eBPF, 10,000 rules",
    "tc_passes": "the same, tc programs pass at once",
    "nf_passes": "the same, netfilter program passes at once",
    "no_flow_state": "the same, no flow table or policy lookups (parse, endpoint lookups, counters)",
    "hooks_only": "the same, every program passes at once (the hooks alone)",
}


def render_hook_floor(result: dict[str, Any]) -> list[str]:
    figures = result["same_node_conn_per_s"]
    lines = [
        f"Same-node connections, time-sliced: {result['runs']} runs, {result['seconds_per_variant']} s per "
        "variant in each; ratio = median of the per-run ratios, added = 1/rate minus that of no filter.",
        "",
    ]
    rows = [[HOOK_FLOOR_TITLES.get(name, name), entry.get("conn_per_s"), entry.get("vs_none"),
             entry.get("added_us_per_conn")]
            for name, entry in figures.items() if name != "split_us_per_conn"]
    lines += _table(["variant", "conn/s", "vs no filter", "added µs per connection"], rows)
    split = figures.get("split_us_per_conn")
    if split:
        lines += [
            f"Added per connection: the hooks {_fmt(split['hooks'])} µs; the programs' basic work "
            f"(parse, endpoint lookups, counters) {_fmt(split['basics'])} µs; flow state and policy "
            f"{_fmt(split['flow_state_and_policy'])} µs. By program group: the tc programs' work "
            f"{_fmt(split['tc_work'])} µs and the netfilter program's {_fmt(split['nf_work'])} µs, each "
            "measured with the other group passing at once (together they cost less than the sum: the "
            "first program to touch a flow's entry pays its cache misses).",
            "",
        ]
    return lines


def _flatten(value: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict):
        for key, inner in value.items():
            yield from _flatten(inner, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(value, list):
        if len(value) <= 6:
            yield prefix, ", ".join(_fmt(v) for v in value)
    else:
        yield prefix, value


def render_generic(result: Any) -> list[str]:
    return _table(["figure", "value"], [[k, v] for k, v in _flatten(result)])


RENDERERS: dict[str, Callable[[dict[str, Any]], list[str]]] = {
    "datapath": render_datapath,
    "propagation": render_propagation,
    "coldstart": render_coldstart,
    "footprint": render_footprint,
    "hook_floor": render_hook_floor,
}


def render(results: dict[str, Any]) -> str:
    lines = [
        "# podfence benchmark results",
        "",
        f"Date: {results.get('date', '?')}. Machine: {results.get('machine', '?')}.",
        "Produced by `make bench` (`python -m bench`), rendered by `python -m bench.report`.",
        "Absolute figures on this shared machine are noisy; compare the ratios measured in one run.",
        "",
    ]
    for name, result in results.items():
        if name in ("date", "machine"):
            continue
        lines += [f"## {name}", ""]
        if isinstance(result, dict) and set(result) == {"error"}:
            lines += [f"Failed: `{result['error']}`", ""]
            continue
        if isinstance(result, dict) and "load_average" in result:
            load = "/".join(_fmt(x) for x in result["load_average"])
            lines += [f"Load average (1/5/15 min) when it started: {load} on this shared machine.", ""]
        if isinstance(result, dict) and "note" in result:
            lines += [f"Note: {result['note']}", ""]
        renderer = RENDERERS.get(name)
        try:
            lines += renderer(result) if renderer else render_generic(result)
        except (KeyError, TypeError, AttributeError):  # an older result shape: show it raw
            lines += render_generic(result)
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str]) -> int:
    """`[--publish] [results.json [RESULTS.md]]`: by default bench/out/'s run; --publish renders
    the published bench/results.json into the tracked bench/RESULTS.md."""
    publish = "--publish" in argv
    argv = [arg for arg in argv if arg != "--publish"]
    folder = HERE if publish else HERE / "out"
    source = Path(argv[0]) if argv else folder / "results.json"
    target = Path(argv[1]) if len(argv) > 1 else folder / "RESULTS.md"
    try:
        results = json.loads(source.read_text())
    except (OSError, ValueError) as exc:
        print(f"cannot read {source}: {exc}", file=sys.stderr)
        return 2
    target.write_text(render(results))
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
