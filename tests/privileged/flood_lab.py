"""Conntrack floods in a lab of pods (issue 21, item 10), for either dataplane's lab: pods are
anything with `netns` and `ip` (named network namespaces). The traffic comes from flood_tool.py
run inside the pods."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from typing import Any

from tests.privileged.bpf_netns import PYTHON, in_netns

TOOL = os.path.join(os.path.dirname(__file__), "flood_tool.py")


def tool(pod: Any, *argv: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        in_netns(pod.netns, PYTHON, TOOL, *argv),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def flood(pod: Any, host: str, first_port: int, count: int) -> None:
    """`count` new UDP flows from `pod` to ports of `host`, two datagrams each (flood_tool.py)."""
    done = tool(pod, "flood", host, str(first_port), str(count))
    _, error = done.communicate(timeout=60)
    assert done.returncode == 0, error


def idle_flow_survives_a_flood(pods: Sequence[Any], host: str, flood_size: int) -> bool:
    """a asks b (UDP, b's port 7000 from a's 5353), the flow idles while c floods `host` with
    `flood_size` new flows, then b answers: does the answer reach a?"""
    a, b, c = pods[:3]
    answerer = tool(b, "answer", b.ip, "7000")
    assert answerer.stdout is not None and answerer.stdin is not None
    assert answerer.stdout.readline().strip() == "ready"
    asker = tool(a, "ask", a.ip, "5353", b.ip, "7000")
    try:
        assert asker.stdout is not None
        assert asker.stdout.readline().strip() == "sent"
        assert answerer.stdout.readline().strip() == "got"  # a's egress admitted the flow
        flood(c, host, 20000, flood_size)
        answerer.stdin.write("\n")
        answerer.stdin.flush()
        answerer.wait(timeout=10)
        # the answer arrives within milliseconds if it passes; a's own timeout is the long one
        try:
            out, _ = asker.communicate(timeout=3)
        except subprocess.TimeoutExpired:
            return False
        return out.strip() == "answered"
    finally:
        for process in (answerer, asker):
            if process.poll() is None:
                process.kill()
                process.wait(timeout=5)
