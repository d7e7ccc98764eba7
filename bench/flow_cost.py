"""What flow records (issue 24) cost the datapath: the working tree's programs against the BPF
sources of another revision, both built and started in one process, measured in interleaved
rounds with BPF_PROG_TEST_RUN of `tc_to_pod` (the pod's ingress verdict).

Per build (kernel-timed nanoseconds, median over ROUNDS):
  new_allowed_ns   the first packet of a new allowed flow: conntrack insert and, in the tree's
                   build, its record (mean of FLOWS single runs, a source port each)
  new_denied_ns    the first packet of a new denied flow: the tree's build records it and
                   remembers the flow for aggregation (pf_flow_denied)
  denied_again_ns  a denied packet of a flow seen before (mean of REPEAT runs): the tree's build
                   adds it to the flow's aggregate; older builds sent a deny event per packet
                   until their budget or ring buffer ran out
  established_ns   a packet of an admitted flow (mean of REPEAT runs): must not move
Both builds get a budget of EVENT_RATE records per second so that every new flow pays for its
record, and the ring buffer is read between batches as the agent's flow feed does. Single runs
include the kernel's timer reads (tens of ns, the same in both builds): compare the builds, not
the absolute figures.

Run: `.venv/bin/python -m bench.flow_cost REV [ROUNDS]` (root), e.g. REV `main`. Only `bpf/`
comes from REV (bench/side_by_side.py). No run(): it answers a question about a change.
"""

from __future__ import annotations

import ipaddress
import json
import secrets
import statistics
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from agent.dataplane.bpf import loader
from agent.dataplane.bpf.dataplane import BpfDataplane
from agent.dataplane.bpf.settings import BpfSettings
from agent.dataplane.bpf.testrun import run_program_timed
from agent.dataplane.types import Allow, DirectionPolicy, Endpoint, IdentityPeer, NodeState
from agent.lab import wiring
from bench.side_by_side import bpf_sources_of, programs_from
from tests.privileged import bpf_frames as frames

POD, PEER = "10.0.0.1", "10.64.0.7"
ALLOWED_PORT, DENIED_PORT = 80, 81
FLOWS = 2000
REPEAT = 100_000
EVENT_RATE = 10_000_000
BATCH = 500  # records read after this many new flows: the ring buffer holds ~2,900


@contextmanager
def started(tag: str, drain_only: bool) -> Iterator[tuple[BpfDataplane, Callable[[], None]]]:
    """A started dataplane in a netns of its own, the pod admitting PEER on ALLOWED_PORT, and how
    to read its ring buffer. `drain_only`: the build's events are not flow records (an older
    revision): consume them unread."""
    prefix = f"pfb-{secrets.token_hex(3)}"
    netns = f"{prefix}-{tag}"
    wiring.create(netns, loopback_up=False)
    plane = BpfDataplane(
        BpfSettings(
            pin_dir=f"/sys/fs/bpf/{prefix}",
            netns=netns,
            event_rate=EVENT_RATE,
            flows_per_pod=0,  # rounds x FLOWS new flows of one pod: no bound
            state_file=f"/run/podfence-bench/{prefix}.json",
        )
    )
    if drain_only:
        plane._flows._on_event = lambda *_: None  # type: ignore[method-assign]
    try:
        plane.start()
        ingress = DirectionPolicy(True, (Allow(IdentityPeer(7), 6, ALLOWED_PORT, ALLOWED_PORT),))
        pod = Endpoint("bench/pod", (ipaddress.ip_address(POD),), ingress, ifindex=1)
        plane.apply(NodeState(1, {pod.key: pod}, {7: (ipaddress.ip_address(PEER),)}, (), frozenset({1})))

        def drain() -> None:
            if drain_only:
                plane._module.ring_buffer_consume()
            else:
                plane.poll_flows(0)

        yield plane, drain
    finally:
        plane.teardown()
        wiring.remove(netns)


def _new_flows(fd: int, drain: Callable[[], None], port: int, first_sport: int, verdict: int) -> float:
    total = 0
    for index in range(FLOWS):
        result, ns = run_program_timed(fd, frames.tcp4(PEER, POD, sport=first_sport + index, dport=port), 1)
        assert result == verdict, f"flow {index} to {port}: {result}"
        total += ns
        if index % BATCH == BATCH - 1:
            drain()
    drain()
    return total / FLOWS


def measure_round(plane: BpfDataplane, drain: Callable[[], None], round_index: int) -> dict[str, float]:
    fd = plane._programs[loader.PROGRAM_TO_POD].fd
    first_sport = 2000 + round_index * FLOWS
    figures = {
        "new_allowed_ns": _new_flows(fd, drain, ALLOWED_PORT, first_sport, 0),
        "new_denied_ns": _new_flows(fd, drain, DENIED_PORT, first_sport, 2),
    }
    again = frames.tcp4(PEER, POD, sport=first_sport, dport=DENIED_PORT)
    figures["denied_again_ns"] = run_program_timed(fd, again, REPEAT)[1]
    drain()
    established = frames.tcp4(PEER, POD, sport=first_sport, dport=ALLOWED_PORT)
    figures["established_ns"] = run_program_timed(fd, established, REPEAT)[1]
    drain()
    return figures


def compare(revision: str, rounds: int) -> dict[str, Any]:
    per_build: dict[str, list[dict[str, float]]] = {revision: [], "tree": []}
    with tempfile.TemporaryDirectory() as scratch, ExitStack() as stack:
        sources = bpf_sources_of(revision, Path(scratch))
        with programs_from(sources):
            old = stack.enter_context(started("old", drain_only=True))
        new = stack.enter_context(started("new", drain_only=False))
        for index in range(rounds):  # each build first in every other round: no order bias
            order = [(revision, old), ("tree", new)]
            for build, (plane, drain) in order if index % 2 == 0 else reversed(order):
                per_build[build].append(measure_round(plane, drain, index))
    medians = {
        build: {name: round(statistics.median(r[name] for r in runs), 1) for name in runs[0]}
        for build, runs in per_build.items()
    }
    ratios = {name: round(medians["tree"][name] / medians[revision][name], 3) for name in medians["tree"]}
    return {
        "revision": revision,
        "medians_ns": medians,
        "tree_over_revision": ratios,
        "rounds": rounds,
        "flows": FLOWS,
        "repeat": REPEAT,
    }


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    print(json.dumps(compare(argv[0], int(argv[1]) if len(argv) > 1 else 5), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
