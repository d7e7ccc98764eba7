"""Metrics every podfence process exposes besides its own: `podfence_build_info` (which release
runs where, for dashboards and upgrade tracking) and the standard `process_*` family (CPU, resident
memory, open descriptors, start time) of prometheus_client's ProcessCollector. Both have a fixed
set of series: build info one, process metrics six."""

from __future__ import annotations

import platform
from importlib import metadata

from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.process_collector import ProcessCollector


def podfence_version() -> str:
    try:
        return metadata.version("podfence")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def register_process_metrics(registry: CollectorRegistry) -> None:
    ProcessCollector(registry=registry)
    info = Gauge(
        "podfence_build_info",
        "Always 1; the labels say which podfence release and Python run this process.",
        labelnames=["version", "python"],
        registry=registry,
    )
    info.labels(podfence_version(), platform.python_version()).set(1)
