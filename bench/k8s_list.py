"""Memory of the control service's first list of 100,000 pods from the API server.

The API server is tests/kube_api_double.py (a test double on loopback: there is none on this
machine), holding 100,000 pods in 1,000 namespaces. A fresh process per case runs the real
KubernetesSource `relist("Pod")` through the real kubernetes client into a real Resolver, and
reports its resident memory before, at its peak (VmHWM) and after the list. Cases: pages of 500
(the default `--list-page-size`) and one unpaged list (every pod in one response, as before
pagination). What the resolver keeps is the same for both; the difference of the peaks is what
pagination saves. Figures are of one run on this shared machine; compare the two cases of one run.
Run: `.venv/bin/python -m bench.k8s_list`.

One run (2026-12-07, 2 cores shared): peak over the process's start 235 MiB paged vs 552 MiB
unpaged (x2.35); 32 s vs 29 s for the whole list, parse and resolve.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

PODS = 100_000
NAMESPACES = 1_000
CASES = {"paged_500": 500, "unpaged": 10**9}


def pod(i: int) -> dict[str, Any]:
    """A pod with what podfence reads and a little of what a real one carries besides."""
    ip = f"10.{i // 65536}.{(i // 256) % 256}.{i % 256}"
    return {
        "metadata": {
            "name": f"pod-{i}", "namespace": f"ns-{i % NAMESPACES}",
            "uid": f"{i:08x}-0000-4000-8000-000000000000",
            "labels": {"app": f"app-{i % 500}", "tier": ("web", "db", "cache")[i % 3],
                       "pod-template-hash": f"{i % 9973:x}"},
            "annotations": {"kubectl.kubernetes.io/restartedAt": "2026-12-01T00:00:00Z"},
        },
        "spec": {"nodeName": f"node-{i % 1000}", "containers": [{
            "name": "app", "image": "registry.example/app:1.2.3",
            "ports": [{"containerPort": 8080, "name": "http", "protocol": "TCP"}],
            "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}},
        }]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "hostIP": "192.168.0.1"},
    }


def _child(url: str, page_size: int) -> dict[str, Any]:
    """In a fresh process: relist the pods and read this process's memory around it."""
    import gc

    from kubernetes import client

    from agent.control.hub import PolicyHub
    from agent.control.metrics import ControlMetrics
    from agent.control.source_kubernetes import KubernetesSource
    from agent.policy.resolver import Resolver
    from bench._proc import memory_kib

    configuration = client.Configuration()
    configuration.host = url
    hub = PolicyHub(Resolver(), ControlMetrics())
    source = KubernetesSource(hub, client.ApiClient(configuration), page_size=page_size,
                              request_timeout_seconds=600)
    gc.collect()
    before = memory_kib(_pid())
    started = time.perf_counter()
    source.relist("Pod")
    seconds = time.perf_counter() - started
    gc.collect()
    after = memory_kib(_pid())
    return {"pods": len(source._known["Pod"]), "seconds": round(seconds, 1),
            "rss_before_mib": round(before["VmRSS"] / 1024), "peak_mib": round(after["VmHWM"] / 1024),
            # Not only what the resolver holds: memory freed after a big response stays in malloc's arenas.
            "rss_after_over_start_mib": round((after["VmRSS"] - before["VmRSS"]) / 1024),
            "peak_over_start_mib": round((after["VmHWM"] - before["VmRSS"]) / 1024)}


def _pid() -> int:
    import os

    return os.getpid()


def run() -> dict[str, Any]:
    from tests.kube_api_double import KubeApiDouble

    results: dict[str, Any] = {"pods": PODS}
    with KubeApiDouble() as api:
        for i in range(PODS):
            api.upsert("Pod", pod(i))
        for case, page_size in CASES.items():
            command = [sys.executable, "-m", "bench.k8s_list", "--child", api.url, str(page_size)]
            done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
            if done.returncode != 0:
                raise RuntimeError(f"{case}: {done.stderr[-2000:]}")
            results[case] = json.loads(done.stdout.strip().splitlines()[-1])
            print(case, results[case], flush=True)
    paged, unpaged = results["paged_500"], results["unpaged"]
    ratio = unpaged["peak_over_start_mib"] / max(1, paged["peak_over_start_mib"])
    results["unpaged_over_paged_peak"] = round(ratio, 2)
    return results


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        print(json.dumps(_child(sys.argv[2], int(sys.argv[3]))))
    else:
        print(json.dumps(run(), indent=2))
