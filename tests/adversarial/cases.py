"""The adversarial cases: what a hostile pod sends, under which policy it must not arrive.

A Case is {policy, frames the attacker sends, the frame that must not arrive, the drop reason the
bpf datapath counts}. `run_twice` is the protocol every case follows: unguarded it must arrive,
guarded it must not.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from agent.dataplane.types import Allow, CidrPeer, NodeState
from tests.adversarial.harness import (
    ATTACKER,
    BYSTANDER,
    TOPOLOGIES,
    VICTIM,
    Lab,
    Member,
    allow_from,
    contains,
    isolated,
    marker,
)

TCP, UDP = 6, 17
Frames = Callable[[Lab, bytes], list[bytes]]
Matcher = Callable[[bytes], Callable[[bytes], bool]]


# ---- policies (the victim is pod VICTIM, the attacker pod ATTACKER) --------------------------------


def victim_isolated(lab: Lab) -> NodeState:
    """The victim's ingress is isolated and allows nothing."""
    return lab.state(ingress={VICTIM: isolated()})


def victim_takes_tcp80_from_attacker(lab: Lab) -> NodeState:
    """The attacker may open TCP/80 on the victim, nothing else: ports and protocols must be read
    where they really are."""
    return lab.state(ingress={VICTIM: isolated(allow_from(ATTACKER, TCP, 80, 80))})


def victim_takes_bystander_only(lab: Lab) -> NodeState:
    """Everything from the bystander, nothing from anyone else: worth spoofing the bystander."""
    return lab.state(ingress={VICTIM: isolated(allow_from(BYSTANDER))})


UNOWNED4, UNOWNED6 = "10.77.0.9", "fd00:77::9"


def victim_takes_unowned_range(lab: Lab) -> NodeState:
    """Everything from a range no pod owns (an ipBlock): worth claiming an address in it."""
    import ipaddress

    return lab.state(
        ingress={
            VICTIM: isolated(
                Allow(CidrPeer(ipaddress.ip_network("10.77.0.0/16"))),
                Allow(CidrPeer(ipaddress.ip_network("fd00:77::/64"))),
            )
        }
    )


def attacker_egress_isolated(lab: Lab) -> NodeState:
    """The attacker may send nothing; the victim's ingress is open."""
    return lab.state(egress={ATTACKER: isolated()})


def everyone_isolated(lab: Lab) -> NodeState:
    """Every pod isolated both ways, nothing allowed: no frame may pass between pods."""
    return lab.state(
        ingress={i: isolated() for i in range(len(lab.members))},
        egress={i: isolated() for i in range(len(lab.members))},
    )


def attacker_isolated(lab: Lab) -> NodeState:
    """The attacker may send nothing and receive nothing; everyone else is open."""
    return lab.state(ingress={ATTACKER: isolated()}, egress={ATTACKER: isolated()})


def attacker_reaches_only_the_node(lab: Lab) -> NodeState:
    """The attacker's egress allows the node's addresses only (an ipBlock of each)."""
    import ipaddress

    return lab.state(
        egress={
            ATTACKER: isolated(
                *(Allow(CidrPeer(ipaddress.ip_network(f"{a}/{a.max_prefixlen}"))) for a in lab.node_ips)
            )
        }
    )


def everyone_open(lab: Lab) -> NodeState:
    """Every pod an endpoint, nothing isolated: only what no pod may ever send is dropped."""
    return lab.state()


POLICIES: dict[str, Callable[[Lab], NodeState]] = {
    f.__name__: f
    for f in (
        victim_isolated,
        victim_takes_tcp80_from_attacker,
        victim_takes_bystander_only,
        victim_takes_unowned_range,
        attacker_egress_isolated,
        everyone_isolated,
        attacker_isolated,
        attacker_reaches_only_the_node,
        everyone_open,
    )
}


class GotThrough(AssertionError):
    """A guarded lab delivered what the case's policy forbids."""


@dataclass(frozen=True)
class Case:
    name: str
    policy: str  # a key of POLICIES
    frames: Frames
    reason: str | None = None  # what the bpf datapath counts the drop as (dataplane.types.Reason, lower case)
    match: Matcher = contains  # marker -> does this received frame show the case got through?
    topologies: tuple[str, ...] = TOPOLOGIES
    # labs ("<dataplane>-<topology>") where the frame passes today: tested in test_pending_fixes
    passes_on: tuple[str, ...] = ()
    sender: int = ATTACKER
    receiver: int = VICTIM
    setup: Callable[[Lab], None] | None = field(default=None, compare=False)
    # fragments of a datagram that never completes: where the node reassembles, the kernel holds
    # them until they time out and no filter sees them (dropped, but not counted by podfence)
    incomplete: bool = False


def delivered(lab: Lab, case: Case, *, expect: bool) -> bool:
    mark = marker()
    sender: Member = lab.members[case.sender]
    receiver: Member = lab.members[case.receiver]
    return lab.deliver(case.frames(lab, mark), receiver, case.match(mark), sender=sender, expect=expect)


def check_unguarded(lab: Lab, case: Case) -> None:
    """Without podfence the frame must arrive, else the case tests the topology, not podfence."""
    if case.setup is not None:
        case.setup(lab)
    assert delivered(lab, case, expect=True), (
        f"{case.name}: not delivered without podfence on a {lab.topology} node; the case proves nothing"
    )


def check_guarded(lab: Lab, case: Case) -> None:
    if case.setup is not None:
        case.setup(lab)
    before = lab.guard_impl.drop_reasons()
    got_through = delivered(lab, case, expect=False)
    after = lab.guard_impl.drop_reasons()
    counted = {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}
    if got_through:
        where = f"{lab.dataplane} on a {lab.topology} node"
        raise GotThrough(f"{case.name}: passed {where} (policy {case.policy})")
    if case.reason is not None and lab.dataplane == "bpf":
        held = case.incomplete and lab.guard_impl.reassembles and not counted
        assert held or counted.get(case.reason, 0) > 0, f"{case.name}: dropped, but counted as {counted}"


def run_twice(lab: Lab, case: Case) -> None:
    """The whole protocol for one case, alone (the pending-fix cases use this)."""
    lab.ensure_unguarded()
    check_unguarded(lab, case)
    lab.ensure_guarded(case.policy, POLICIES[case.policy])
    check_guarded(lab, case)
