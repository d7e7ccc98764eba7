"""The demo's view of flows: `podfence observe` against the lab's control service.

The lab's control service runs without TLS and lets any local caller observe
(--observe-without-identity, cluster.py); the demo asks it as an operator would, through the CLI.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

# A bound, not a wait: a record is here ~1.5 s after its packet, the CLI's start-up included
# (tens of ms of it on the way, bench/flow_latency.py); generous for a loaded machine.
RECORD_WAIT_S = 20.0


def observed(control_address: str, *filters: str, timeout_s: float = RECORD_WAIT_S) -> list[dict[str, Any]]:
    """The stored flow records matching `filters` (observe's own flags), waiting up to
    `timeout_s` for the first to arrive."""
    argv = [sys.executable, "-m", "agent.cli", "observe", "--control", control_address, "--last", "50",
            "-o", "jsonl", *filters]  # fmt: skip
    deadline = time.monotonic() + timeout_s
    while True:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        records = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
        if records or time.monotonic() >= deadline:
            return records
        time.sleep(0.2)


def one_line(record: dict[str, Any]) -> str:
    """A record as `podfence observe -o table` says it, on one line."""

    def end(side: dict[str, Any]) -> str:
        who = f"{side['namespace']}/{side['pod']}" if side.get("pod") else side["ip"]
        return f"{who}:{side['port']}" if side.get("port") else who

    decided = "/".join(str(record.get(k) or "-") for k in ("tier", "policy", "rule"))
    return (f"{record['node']}  {end(record['source'])} -> {end(record['destination'])}  "
            f"{record['protocol']}  {record['verdict']}  {decided}")  # fmt: skip
