"""What the control service sends an agent that predates ClusterNetworkPolicy tiers.

DirectionPolicy.tiered is field 3 of a message such an agent already knows: protobuf parses the
field as unknown and drops it, so the agent would enforce only the NetworkPolicy tier. Every
Admin Deny (port 15000, the metadata address) would then be silently open, and a Baseline deny
would never isolate. The control service therefore sends tiered entries only to agents whose
Hello says `enforces_tiers`; to an older one, each direction that has tiered entries goes out
isolated with no allows (deny all): fail closed, since the NetworkPolicy allow list alone cannot
express a Deny that outranks it. Directions without tiered entries are exact either way. The
operator learns it from `podfence status` and the log (NodeRecord.tier_fallback).
"""

from __future__ import annotations

from dataclasses import replace

from agent.policy.compiled import DirectionAllows, EndpointPolicy, NodePolicy

_DENY_ALL = DirectionAllows(isolated=True)


def _closed(direction: DirectionAllows) -> DirectionAllows:
    return _DENY_ALL if direction.tiered else direction


def without_tiers(policy: NodePolicy) -> tuple[NodePolicy, tuple[str, ...]]:
    """`policy` as an agent without tiers can enforce it safely, and the directions that were
    closed for it ("namespace/name ingress"), sorted; the policy itself when none were."""
    closed: list[str] = []
    endpoints: dict[str, EndpointPolicy] = {}
    for key, endpoint in policy.endpoints.items():
        if not (endpoint.ingress.tiered or endpoint.egress.tiered):
            endpoints[key] = endpoint
            continue
        closed += [f"{key} {name}" for name, d in (("ingress", endpoint.ingress), ("egress", endpoint.egress))
                   if d.tiered]
        endpoints[key] = replace(endpoint, ingress=_closed(endpoint.ingress), egress=_closed(endpoint.egress))
    if not closed:
        return policy, ()
    # identities only tiered entries referenced stay: harmless, and the agent needs no new rule
    return replace(policy, endpoints=endpoints), tuple(sorted(closed))


def fallback_message(closed: tuple[str, ...]) -> str:
    """What `podfence status` says of a node whose agent got `closed` directions as deny-all."""
    if not closed:
        return ""
    shown = ", ".join(closed[:5]) + (f" and {len(closed) - 5} more" if len(closed) > 5 else "")
    return (
        f"the agent does not enforce ClusterNetworkPolicy tiers (its Hello lacks enforces_tiers): "
        f"{len(closed)} pod direction(s) with ClusterNetworkPolicy deny all until it is upgraded: {shown}"
    )
