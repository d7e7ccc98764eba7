"""The benchmark-only build knobs (PF_BENCH_*, bench/hook_floor.py) cut the programs where they
say, and only there: each build is loaded by the kernel and judges, through BPF_PROG_TEST_RUN,
a pod whose ingress and egress allow TCP port 80 only. The default build (test_bpf_packets.py)
drops port 81 both ways."""

from __future__ import annotations

import ipaddress
import secrets
from collections.abc import Iterator

import pytest

from agent.dataplane.bpf import loader
from agent.dataplane.bpf.dataplane import BpfDataplane
from agent.dataplane.bpf.settings import BpfSettings
from agent.dataplane.bpf.testrun import NF_ACCEPT, TC_ACT_OK, TC_ACT_SHOT, run_netfilter_program, run_program
from agent.dataplane.types import Allow, DirectionPolicy, Endpoint, IdentityPeer, NodeState
from agent.lab import wiring
from bench import hook_floor
from tests.privileged import bpf_frames as f

pytestmark = pytest.mark.needs("bpffs")

POD, PEER, NODE = "10.0.0.1", "10.0.1.7", "10.0.9.1"
PEER_IDENTITY = 7


@pytest.fixture(params=[(), *hook_floor.VARIANTS.values()], ids=["default", *hook_floor.VARIANTS])
def plane(request: pytest.FixtureRequest) -> Iterator[tuple[tuple[str, ...], BpfDataplane]]:
    defines = request.param[0] if request.param else ()
    prefix = f"pfb-{secrets.token_hex(3)}"
    netns = f"{prefix}-knob"
    wiring.create(netns, loopback_up=False)
    dataplane = BpfDataplane(
        BpfSettings(
            pin_dir=f"/sys/fs/bpf/{prefix}",
            netns=netns,
            state_file=f"/run/podfence-tests/{prefix}.json",
            bench_defines=defines,
        )
    )
    try:
        dataplane.start()
        port_80 = DirectionPolicy(True, (Allow(IdentityPeer(PEER_IDENTITY), f.TCP, 80, 80),))
        pod = Endpoint("ns/pod", (ipaddress.ip_address(POD),), port_80, port_80, ifindex=1)
        dataplane.apply(
            NodeState(
                1,
                {pod.key: pod},
                {PEER_IDENTITY: (ipaddress.ip_address(PEER),)},
                (ipaddress.ip_address(NODE),),
                frozenset({1}),
            )
        )
        yield defines, dataplane
    finally:
        dataplane.teardown()
        wiring.remove(netns)


def passes(plane: BpfDataplane, hook: str, frame: bytes) -> bool:
    programs = plane._programs
    if hook == "nf_egress":  # iptables' bpf match: non-zero = drop
        return run_program(programs[loader.PROGRAM_NF_EGRESS].fd, frame) == 0
    if hook == "nf_egress_link":
        return run_netfilter_program(plane.hook.links.program_fd, frame) == NF_ACCEPT
    result = run_program(programs[hook].fd, frame)
    assert result in (TC_ACT_OK, TC_ACT_SHOT)
    return result == TC_ACT_OK


def test_each_knob_passes_exactly_the_hooks_it_names(plane: tuple[tuple[str, ...], BpfDataplane]) -> None:
    defines, dataplane = plane
    if dataplane.egress_hook_in_use != "netfilter":
        pytest.skip("needs netfilter BPF links (kernel >= 6.4) to run nf_egress_link")
    tc_pass = "PF_BENCH_TC_PASS" in defines
    nf_pass = "PF_BENCH_NF_PASS" in defines
    no_flows = "PF_BENCH_NO_FLOW_STATE" in defines
    unallowed_in = f.tcp4(PEER, POD, dport=81)
    unallowed_out = f.tcp4(POD, PEER, dport=81)
    # the port no rule allows: refused by the policy lookups, which no_flow_state skips too
    assert passes(dataplane, loader.PROGRAM_TO_POD, unallowed_in) == (tc_pass or no_flows)
    assert passes(dataplane, "nf_egress", unallowed_out) == (nf_pass or no_flows)
    assert passes(dataplane, "nf_egress_link", unallowed_out) == (nf_pass or no_flows)
    # tc_from_pod's basic checks stay in every build but tc_passes/hooks_only: a spoofed source
    assert passes(dataplane, loader.PROGRAM_FROM_POD, f.tcp4("10.0.0.99", PEER)) == tc_pass
    # what the policy allows passes in every build
    assert passes(dataplane, loader.PROGRAM_TO_POD, f.tcp4(PEER, POD, dport=80))
    assert passes(dataplane, "nf_egress_link", f.tcp4(POD, PEER, dport=80))
