"""Turns a node's compiled policy (agent.policy.compiled.NodePolicy) into Sync messages.

A snapshot carries the whole NodePolicy; a delta carries only the endpoints and identities that
differ between two consecutive NodePolicy values of the same node, and for an endpoint whose
addresses and isolation stay, only the allow entries that leave and join its lists (a patch):
one peer edited in a 10,000-peer list costs two entries on the wire, not the list. Both are pure
functions, so the server can build them outside its lock.
"""

from __future__ import annotations

from typing import Any

from agent.api import podfence_pb2 as pb
from agent.policy.compiled import (
    AllowEntry,
    CidrRef,
    DirectionAllows,
    EndpointPolicy,
    NodePolicy,
    TieredEntry,
    entry_sort_key,
)

# Encoded allows by content, kept across messages: an edit of one peer in a 10,000-peer list
# re-encodes that list, and building 10,000 messages in Python took ~100 ms. Bounded: emptied
# when it outgrows _ALLOW_CACHE_MAX. Read and filled under the hub's lock or the stream's thread;
# a lost race only encodes an allow twice.
_ALLOW_CACHE: dict[AllowEntry, pb.Allow] = {}
_ALLOW_CACHE_MAX = 1 << 18


def _allow(entry: AllowEntry) -> pb.Allow:
    cached = _ALLOW_CACHE.get(entry)
    if cached is None:
        if len(_ALLOW_CACHE) >= _ALLOW_CACHE_MAX:
            _ALLOW_CACHE.clear()
        cached = _ALLOW_CACHE[entry] = _encode_allow(entry)
    return cached


def _encode_allow(entry: AllowEntry) -> pb.Allow:
    peer = entry.peer
    if isinstance(peer, CidrRef):
        block = pb.IPBlock(cidr=str(peer.cidr))
        # `except` is a Python keyword, so the repeated field is reached with getattr.
        getattr(block, "except").extend(str(e) for e in peer.excepts)
        proto_peer = pb.Peer(cidr=block)
    else:
        proto_peer = pb.Peer(identity=peer.identity)
    return pb.Allow(
        peer=proto_peer,
        protocol=entry.protocol,
        port_first=entry.port_first,
        port_last=entry.port_last,
        policy=entry.policy,
        rule=entry.rule,
    )


def _tiered(entry: TieredEntry) -> pb.TieredAllow:
    allow = AllowEntry(
        entry.peer, entry.protocol, entry.port_first, entry.port_last, entry.policy, entry.rule
    )
    return pb.TieredAllow(allow=_allow(allow), tier=entry.tier, rank=entry.rank, action=entry.action)


Memo = dict[int, tuple[DirectionAllows, pb.DirectionPolicy]]


def _direction(direction: DirectionAllows, memo: Memo) -> pb.DirectionPolicy:
    # The resolver hands every endpoint selected by the same policies the same DirectionAllows
    # object: encode it once per message (10,000 allows took 80 ms per endpoint). Keyed by id,
    # with the object kept alive beside its encoding so the id cannot be reused meanwhile.
    known = memo.get(id(direction))
    if known is not None:
        return known[1]
    encoded = pb.DirectionPolicy(
        isolated=direction.isolated,
        allows=[_allow(a) for a in direction.allows],
        tiered=[_tiered(t) for t in direction.tiered],
    )
    if direction.audit is not None:
        encoded.audit.CopyFrom(_direction(direction.audit, memo))
    memo[id(direction)] = (direction, encoded)
    return encoded


def encode_endpoint(endpoint: EndpointPolicy, memo: Memo | None = None) -> pb.Endpoint:
    memo = {} if memo is None else memo
    return pb.Endpoint(
        namespace=endpoint.namespace,
        name=endpoint.name,
        ips=[str(ip) for ip in endpoint.ips],
        ingress=_direction(endpoint.ingress, memo),
        egress=_direction(endpoint.egress, memo),
    )


def _identity(identity: int, ips: tuple[Any, ...]) -> pb.Identity:
    return pb.Identity(id=identity, ips=[str(ip) for ip in ips])


def snapshot_message(version: int, policy: NodePolicy) -> pb.ControlMessage:
    memo: Memo = {}
    return pb.ControlMessage(
        version=version,
        snapshot=pb.Snapshot(
            endpoints=[encode_endpoint(policy.endpoints[key], memo) for key in sorted(policy.endpoints)],
            identities=[_identity(i, policy.identities[i]) for i in sorted(policy.identities)],
        ),
    )


PatchMemo = dict[tuple[int, int], tuple[DirectionAllows, DirectionAllows, pb.DirectionPatch | None]]


def _direction_patch(
    before: DirectionAllows, after: DirectionAllows, memo: PatchMemo
) -> pb.DirectionPatch | None:
    """The entries leaving and joining an isolated list, or None when a patch cannot say the
    change (isolation, the ClusterNetworkPolicy entries or the audit view change) or would not be shorter than
    the list itself."""
    known = memo.get((id(before), id(after)))
    if known is not None:
        return known[2]
    patch: pb.DirectionPatch | None = None
    # a patch says nothing of the audit view: a change of it goes as a whole endpoint
    if before.isolated == after.isolated and before.tiered == after.tiered and before.audit == after.audit:
        patch = pb.DirectionPatch()
        if before.allows != after.allows:
            old, new = set(before.allows), set(after.allows)
            leaving = sorted(old - new, key=entry_sort_key)
            joining = sorted(new - old, key=entry_sort_key)
            if 2 * (len(leaving) + len(joining)) > len(after.allows):
                patch = None
            else:
                patch.remove.extend(_allow(entry) for entry in leaving)
                patch.add.extend(_allow(entry) for entry in joining)
    memo[(id(before), id(after))] = (before, after, patch)  # the objects kept alive beside their ids
    return patch


def _endpoint_patch(
    before: EndpointPolicy, after: EndpointPolicy, memo: PatchMemo
) -> pb.EndpointPatch | None:
    if before.ips != after.ips:
        return None
    ingress = _direction_patch(before.ingress, after.ingress, memo)
    egress = _direction_patch(before.egress, after.egress, memo)
    if ingress is None or egress is None:
        return None
    return pb.EndpointPatch(namespace=after.namespace, name=after.name, ingress=ingress, egress=egress)


def delta_message(version: int, before: NodePolicy, after: NodePolicy) -> pb.ControlMessage:
    """What turns `before` into `after`; endpoints are keyed "namespace/name" on both sides."""
    memo: Memo = {}
    patch_memo: PatchMemo = {}
    upserts: list[pb.Endpoint] = []
    patches: list[pb.EndpointPatch] = []
    for key in sorted(after.endpoints):
        old, new = before.endpoints.get(key), after.endpoints[key]
        if old == new:
            continue
        patch = _endpoint_patch(old, new, patch_memo) if old is not None else None
        if patch is not None:
            patches.append(patch)
        else:
            upserts.append(encode_endpoint(new, memo))
    removed = sorted(key for key in before.endpoints if key not in after.endpoints)
    identity_upserts = [
        _identity(i, after.identities[i])
        for i in sorted(after.identities)
        if before.identities.get(i) != after.identities[i]
    ]
    identity_removed = sorted(i for i in before.identities if i not in after.identities)
    return pb.ControlMessage(
        version=version,
        delta=pb.Delta(
            upsert_endpoints=upserts,
            remove_endpoints=removed,
            upsert_identities=identity_upserts,
            remove_identities=identity_removed,
            patch_endpoints=patches,
        ),
    )
