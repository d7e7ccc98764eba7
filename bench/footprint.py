"""Agent footprint: RSS and CPU of a real `podfence agent` while idle and during pod churn.

A `pfbench-` node with 100 pods and the ring policies (bench/_cluster.py) runs `podfence control`
(default 0.2 s folder poll) and `podfence agent`. After the agent has caught up:

* idle: CPU time used over IDLE_SECONDS (as % of one core) and RSS at the end;
* churn: CHURN_EVENTS pod events written to the folder at CHURN_RATE per second, first adding
  CHURN_EVENTS/2 pods (one file each; every other one on this node, whose interface the agent
  will not find, the rest on another node; labels spread over the ring's apps so each one changes
  identities that local endpoints admit) and then deleting them again. Measured from the first
  event until the agent has applied the control service's final version: CPU seconds, CPU % of
  one core, peak RSS (sampled every event) and RSS afterwards. The control service's figures
  are reported beside, for scale.

Both dataplanes are measured, each on its own node; then again at issue 25's scale, SCALE_PODS
pods and SCALE_RULES allow entries on the node (rules_policies: per-app policies of /32 ipBlock
peers, SCALE_RULES / SCALE_PODS allows on every endpoint besides the ring's), reported under
"<dataplane> 250 pods 10,000 rules". BENCH_SCALE=0 leaves the scale runs out, BENCH_SCALE=only
runs nothing else.
Run: `.venv/bin/python -m bench footprint`.
"""

from __future__ import annotations

import ipaddress
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import _cluster, _proc

QUICK = os.environ.get("BENCH_QUICK") == "1"
PODS = 100
IDLE_SECONDS = 3.0 if QUICK else 10.0
CHURN_EVENTS = 1_000
CHURN_RATE = 200.0  # events per second: 5 s of churn, about 25 folder polls
DATAPLANES = tuple(os.environ.get("BENCH_DATAPLANES", "bpf,iptables").split(","))
CHURN_NET = ipaddress.IPv4Network("10.79.0.0/16")  # churn pods' addresses, routed nowhere
SCALE = os.environ.get("BENCH_SCALE", "1")  # "0": no scale runs; "only": nothing else
SCALE_PODS, SCALE_RULES = 250, 10_000  # issue 25
RULES_NET = ipaddress.IPv4Network("10.80.0.0/16")  # the rules' peers, routed nowhere


def churn_pod(index: int) -> dict[str, Any]:
    node = _cluster.NODE if index % 2 == 0 else "elsewhere"
    ip = str(CHURN_NET.network_address + 10 + index)
    return _cluster.pod_manifest(f"churn-{index}", ip, _cluster.pod_labels(index), node=node)


def rules_policies(rules: int, pods: int) -> list[dict[str, Any]]:
    """One policy per app admitting `rules // pods` distinct /32 peers on the serve port: every
    endpoint (each carries one app's label) gets that many allows, `rules` on the node in all."""
    per_endpoint = rules // pods
    policies = []
    for app in range(_cluster.APPS):
        peers = [{"ipBlock": {"cidr": f"{RULES_NET.network_address + app * per_endpoint + i}/32"}}
                 for i in range(per_endpoint)]
        policy = _cluster.ingress_policy(f"rules-{app}", {"app": f"a{app}"}, {})
        policy["spec"]["ingress"][0]["from"] = peers
        policies.append(policy)
    return policies


def sample(pids: dict[str, int]) -> dict[str, dict[str, float]]:
    return {
        name: {"cpu_s": _proc.cpu_seconds(pid), **_proc.memory_kib(pid)} for name, pid in pids.items()
    }


def churn(folder: Path, pids: dict[str, int]) -> dict[str, float]:
    """Write the events on schedule; the peak RSS (KiB) of each process seen while doing so."""
    peak = {name: 0.0 for name in pids}
    started = time.monotonic()
    half = CHURN_EVENTS // 2
    for event in range(CHURN_EVENTS):
        path = folder / f"churn-{event % half}.yaml"
        if event < half:
            _cluster.write_yaml(path, [churn_pod(event)])
        else:
            path.unlink()
        for name, pid in pids.items():
            peak[name] = max(peak[name], _proc.memory_kib(pid)["VmRSS"])
        delay = started + (event + 1) / CHURN_RATE - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    return peak


def measure(dataplane: str, tag: str, pods: int = PODS, rules: int = 0) -> dict[str, Any]:
    with _cluster.node_with_pods(tag, pods) as topology, tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "source"
        folder.mkdir()
        _cluster.write_base_folder(folder, topology, {})
        if rules:
            _cluster.write_yaml(folder / "30-rules.yaml", rules_policies(rules, pods))
        processes = _cluster.Processes(topology, folder, Path(tmp), dataplane)
        try:
            processes.start_control()
            processes.start_agent()
            processes.wait(lambda: processes.caught_up(pods), "agent caught up", 300)
            assert processes.control is not None and processes.agent is not None
            pids = {"agent": processes.agent.pid, "control": processes.control.pid}
            time.sleep(1.0)  # let start-up work (first metrics scrape, GC) finish

            before = sample(pids)
            time.sleep(IDLE_SECONDS)
            idle = sample(pids)

            burst_start = time.monotonic()
            version_before = processes.control_version()
            peak = churn(folder, pids)
            processes.wait(
                lambda: processes.control_version() > version_before and processes.caught_up(pods),
                "agent caught up after churn", 120, interval=0.05,
            )
            burst_seconds = time.monotonic() - burst_start
            after = sample(pids)
            versions = processes.control_version() - version_before
        finally:
            processes.stop()
    report: dict[str, Any] = {"pods": pods, "rules": rules, "churn_events": CHURN_EVENTS,
                              "churn_versions": versions}
    for name in pids:
        idle_cpu = idle[name]["cpu_s"] - before[name]["cpu_s"]
        burst_cpu = after[name]["cpu_s"] - idle[name]["cpu_s"]
        report[name] = {
            "idle_cpu_percent": round(100 * idle_cpu / IDLE_SECONDS, 2),
            "idle_rss_mib": round(idle[name]["VmRSS"] / 1024, 1),
            "startup_peak_rss_mib": round(idle[name]["VmHWM"] / 1024, 1),
            "churn_seconds": round(burst_seconds, 2),
            "churn_cpu_s": round(burst_cpu, 2),
            "churn_cpu_percent": round(100 * burst_cpu / burst_seconds, 1),
            "churn_peak_rss_mib": round(peak[name] / 1024, 1),
            "rss_after_churn_mib": round(after[name]["VmRSS"] / 1024, 1),
        }
    return report


def run() -> dict[str, Any]:
    results: dict[str, Any] = {
        "load_average": [round(x, 2) for x in os.getloadavg()],  # the neighbours' load, for context
        "pods": PODS,
        "idle_seconds": IDLE_SECONDS,
        "churn_rate_per_s": CHURN_RATE,
    }
    for index, dataplane in enumerate(DATAPLANES if SCALE != "only" else ()):
        try:
            results[dataplane] = measure(dataplane, f"f{index}")
        except Exception as exc:  # one dataplane that cannot run here must not hide the other
            results[dataplane] = {"error": repr(exc)}
    for index, dataplane in enumerate(DATAPLANES if SCALE != "0" else ()):
        name = f"{dataplane} {SCALE_PODS} pods {SCALE_RULES:,} rules"
        try:
            results[name] = measure(dataplane, f"s{index}", SCALE_PODS, SCALE_RULES)
        except Exception as exc:
            results[name] = {"error": repr(exc)}
    return results


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
