"""The BPF dataplane's state file: what each allocated id stands for, and which interfaces carry
podfence's filters. The maps hold only ids; without this record a restarted agent could hand a
live id to different content. Kept beside the pins (in /run, the same lifetime as bpffs), written
whole and atomically on every apply.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from agent.dataplane.bpf.compiler import Allocation
from agent.dataplane.types import CidrPeer, IdentityPeer

log = logging.getLogger(__name__)


def read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def save(path: Path, allocation: Allocation | None, interfaces: Iterable[int]) -> None:
    data = allocation_to_json(allocation or Allocation())
    data["interfaces"] = sorted(interfaces)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(data))
    os.replace(temporary, path)  # atomic: a crash leaves the old or the new file


def merge_allocations(old: Allocation | None, new: Allocation) -> Allocation:
    if old is None:
        return new
    reused = set(new.policies.values())  # an id whose content changed in place: the new content
    return Allocation(
        policies={**{c: i for c, i in old.policies.items() if i not in reused}, **new.policies},
        identity_classes={**old.identity_classes, **new.identity_classes},
        cidr_classes={**old.cidr_classes, **new.cidr_classes},
        endpoint_slots={**old.endpoint_slots, **new.endpoint_slots},
        endpoint_policy_ids={**old.endpoint_policy_ids, **new.endpoint_policy_ids},
        next_id=max(old.next_id, new.next_id),
    )


@functools.lru_cache(maxsize=1 << 17)
def _peer_to_json(peer: CidrPeer | IdentityPeer) -> dict[str, Any]:
    """Cached (the state file is written on every apply; callers only serialise the result)."""
    if isinstance(peer, IdentityPeer):
        return {"identity": peer.identity}
    return {"cidr": str(peer.cidr), "excepts": [str(e) for e in peer.excepts]}


def _peer_from_json(data: dict[str, Any]) -> CidrPeer | IdentityPeer:
    if "identity" in data:
        return IdentityPeer(int(data["identity"]))
    excepts = tuple(ipaddress.ip_network(e) for e in data["excepts"])
    return CidrPeer(ipaddress.ip_network(data["cidr"]), excepts)


def _cidr_peer_from_json(data: dict[str, Any]) -> CidrPeer:
    peer = _peer_from_json(data)
    if not isinstance(peer, CidrPeer):
        raise ValueError(f"not a CIDR peer: {data}")
    return peer


def allocation_to_json(allocation: Allocation) -> dict[str, Any]:
    return {
        "policies": [
            [policy_id, [[p, f, last, _peer_to_json(peer)] for p, f, last, peer in content]]
            for content, policy_id in allocation.policies.items()
        ],
        "identity_classes": [[cid, sorted(ids)] for ids, cid in allocation.identity_classes.items()],
        "cidr_classes": [
            [cid, [_peer_to_json(p) for p in peers]] for peers, cid in allocation.cidr_classes.items()
        ],
        "endpoint_slots": allocation.endpoint_slots,
        "endpoint_policy_ids": allocation.endpoint_policy_ids,
        "next_id": allocation.next_id,
    }


def allocation_from_json(data: dict[str, Any]) -> Allocation | None:
    try:
        return Allocation(
            policies={
                frozenset(
                    (int(p), int(f), int(last), _peer_from_json(peer)) for p, f, last, peer in rules
                ): int(pid)
                for pid, rules in data["policies"]
            },
            identity_classes={
                frozenset(int(i) for i in ids): int(cid) for cid, ids in data["identity_classes"]
            },
            cidr_classes={
                frozenset(_cidr_peer_from_json(p) for p in peers): int(cid)
                for cid, peers in data["cidr_classes"]
            },
            endpoint_slots={str(k): int(v) for k, v in data["endpoint_slots"].items()},
            endpoint_policy_ids={
                str(k): (int(v[0]), int(v[1])) for k, v in data.get("endpoint_policy_ids", {}).items()
            },
            next_id=int(data["next_id"]),
        )
    except (KeyError, TypeError, ValueError) as error:
        log.warning("ignoring unreadable BPF state file: %s", error)
        return None
