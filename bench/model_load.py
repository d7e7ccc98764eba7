"""Model loading benchmark: how long `load_text` takes for a whole cluster dumped by kubectl.

A synthetic `kind: List` of 500 Namespaces, 10,000 Pods (labels, two named ports, dual IP
fields) and 2,000 NetworkPolicies (selectors with expressions, an ipBlock with except, named and
ranged ports, egress) is written once as YAML and once as JSON, then loaded: parsing plus
validation into model objects. Reported: seconds per format, objects per second, and the share
of the time spent validating (parse_object on the already-parsed dicts). Absolute times on this
shared 2-core machine are noisy; the YAML/JSON ratio is measured in one run.
Run: `.venv/bin/python -m bench.model_load`.
"""

from __future__ import annotations

import json
import random
import time
from typing import Any

import yaml

from agent.model.load import load_text, parse_object

NAMESPACES, PODS, POLICIES = 500, 10_000, 2_000


def cluster_documents(seed: int = 1) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    docs: list[dict[str, Any]] = [
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": f"ns-{i}", "labels": {"team": f"t{i % 20}"}},
        }
        for i in range(NAMESPACES)
    ]
    for i in range(PODS):
        ip = f"10.{i // 65536}.{(i // 256) % 256}.{i % 256}"
        ports = [
            {"containerPort": 8080, "name": "http"},
            {"containerPort": 53, "protocol": "UDP", "name": "dns"},
        ]
        docs.append(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": f"pod-{i}",
                    "namespace": f"ns-{i % NAMESPACES}",
                    "labels": {"app": f"app-{i % 300}", "tier": rng.choice(["web", "db", "cache"])},
                },
                "spec": {"nodeName": f"node-{i % 50}", "containers": [{"name": "c", "ports": ports}]},
                "status": {"podIP": ip, "podIPs": [{"ip": ip}]},
            }
        )
    for i in range(POLICIES):
        peers = [
            {
                "namespaceSelector": {
                    "matchExpressions": [{"key": "team", "operator": "In", "values": ["t1", "t2"]}]
                },
                "podSelector": {"matchLabels": {"tier": "web"}},
            },
            {"ipBlock": {"cidr": "172.16.0.0/12", "except": ["172.16.1.0/24"]}},
        ]
        docs.append(
            {
                "apiVersion": "networking.k8s.io/v1",
                "kind": "NetworkPolicy",
                "metadata": {"name": f"np-{i}", "namespace": f"ns-{i % NAMESPACES}"},
                "spec": {
                    "podSelector": {"matchLabels": {"app": f"app-{i % 300}"}},
                    "policyTypes": ["Ingress", "Egress"],
                    "ingress": [
                        {"from": peers, "ports": [{"port": "http"}, {"port": 8000, "endPort": 8100}]}
                    ],
                    "egress": [{"to": [{"podSelector": {}}], "ports": [{"port": 53, "protocol": "UDP"}]}],
                },
            }
        )
    return docs


def run() -> dict[str, Any]:
    docs = cluster_documents()
    listing = {"apiVersion": "v1", "kind": "List", "items": docs}
    texts = {"yaml": yaml.safe_dump(listing), "json": json.dumps(listing)}
    results: dict[str, Any] = {"objects": len(docs)}
    for label, text in texts.items():
        started = time.perf_counter()
        loaded = load_text(text, f"cluster.{label}")
        seconds = time.perf_counter() - started
        if loaded.errors or len(loaded.objects) != len(docs):
            raise RuntimeError(f"{label}: {len(loaded.objects)} objects, errors {loaded.errors[:3]}")
        results[label] = {
            "bytes": len(text),
            "seconds": round(seconds, 3),
            "objects_per_second": int(len(docs) / seconds),
        }
    started = time.perf_counter()
    for doc in docs:
        parse_object(doc)
    validation = time.perf_counter() - started
    results["validation_seconds"] = round(validation, 3)
    results["yaml_over_json"] = round(results["yaml"]["seconds"] / results["json"]["seconds"], 1)
    results["validation_share_of_json"] = round(validation / results["json"]["seconds"], 2)
    return results


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
