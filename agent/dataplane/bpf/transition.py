"""The in-place update: peer entries change where they are, through a *union* view. Pure (no I/O).

Writing every peer entry under a fresh generation (plan.py's double buffer) costs the whole peer
view twice in the maps and in writes: one peer changed in a 10,000-peer allow list needed 20,000
CIDR entries and was refused with the default 16,384. Instead, within the one generation every
endpoint reads, each peer address goes old class -> union class -> new class, where its union
class holds every peer (identity or CIDR) that contains it in the old state or in the new one.
A policy entry (policy id, class) answers "does this allow list admit a peer of this class", so:
  - old policy ids read union classes exactly as old classes (the extra peers are new-only, and
    no old policy names them), new policy ids read union classes exactly as new classes;
  - so with every union entry written first, the peers can move old -> union one entry at a time
    (old policies still in force), the endpoints flip to their new policy ids, and the peers move
    union -> new one at a time: each packet is answered as by the old or by the new state.
CIDR prefixes change what an address's longest match is; inserting new prefixes longest first
and deleting vanished ones shortest first keeps each address's match on its old prefix or its
new one (never a third, shorter prefix of another class), which the replay test checks op by op
(tests/unit/test_bpf_plan.py). The maps hold old and new prefixes together only for one change's
worth of entries: |old U new|, not |old| + |new|.

It needs what the live class ids stand for (the previous Allocation); without it (pins adopted
without their state file) or with entries of several generations live (an update that died half
way), `union_view` returns None and plan.py falls back to the double buffer, which cleans up.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from agent.dataplane.bpf.cidr_classes import lpm_cidr_classes
from agent.dataplane.bpf.compiler import (
    NOT_ISOLATED,
    Allocation,
    CidrPrefix,
    Desired,
    EndpointEntry,
    PolicyContent,
    PolicyEntry,
    entries_for_members,
    policy_entries,
)
from agent.dataplane.bpf.entry_memo import ClassPair, Memos
from agent.dataplane.types import CidrPeer


@dataclass(frozen=True)
class UnionView:
    """The peer entries (of the live generation) and policy entries of the union state."""

    ipcache: dict[bytes, int]
    cidr: dict[CidrPrefix, int]
    policy: dict[PolicyEntry, int]
    # policy id -> the temporary id its joining endpoints read until the peers are new
    interim_ids: dict[int, int]
    # class ids this view handed out (beyond the desired allocation's), remembered with it
    identity_classes: dict[frozenset[int], int]
    cidr_classes: dict[frozenset[CidrPeer], int]
    next_id: int


def union_view(
    old_endpoints: Mapping[int, EndpointEntry],
    old_ipcache: dict[bytes, int],
    old_cidr: dict[CidrPrefix, int],
    previous: Allocation,
    desired: Desired,
    memos: Memos | None = None,
) -> UnionView | None:
    """The union of the live peer view (`old_*`, read through `previous`) and `desired`'s; None
    when a live id is not in `previous` (then only the double buffer is safe).

    CIDR membership never changes, so a union CIDR class (every old or new peer containing the
    address) answers any policy exactly. Identity membership does: an address may carry identity
    3 in the old state and 7 in the new. Its union class then keeps both memberships apart, and
    each policy id reads it through one of them: the old one if some endpoint leaves that id in
    this update (it must keep its old answers until it flips), else the new one (endpoints that
    keep the id accept either). Endpoints that join an id some other endpoint leaves read a
    temporary copy of it through the new membership (`interim_ids`) until the peers are new.
    """
    old_identities = {cid: ids for ids, cid in previous.identity_classes.items()}
    old_cidrs = {cid: peers for peers, cid in previous.cidr_classes.items()}
    old_policies = {pid: content for content, pid in previous.policies.items()}
    new_identities = {cid: ids for ids, cid in desired.allocation.identity_classes.items()}
    new_cidrs = {cid: peers for peers, cid in desired.allocation.cidr_classes.items()}
    leaving: set[int] = set()
    joining: set[int] = set()
    for ifindex in old_endpoints.keys() | desired.endpoints.keys():
        before, after = old_endpoints.get(ifindex), desired.endpoints.get(ifindex)
        for direction in ("ingress_policy_id", "egress_policy_id"):
            old_id = getattr(before, direction) if before else NOT_ISOLATED
            new_id = getattr(after, direction) if after else NOT_ISOLATED
            if old_id != new_id:
                leaving.add(old_id)
                joining.add(new_id)
    old_ids = {
        getattr(e, d) for e in old_endpoints.values() for d in ("ingress_policy_id", "egress_policy_id")
    }
    old_ids.discard(NOT_ISOLATED)
    if any(cid and cid not in old_identities for cid in old_ipcache.values()):
        return None
    if any(cid and cid not in old_cidrs for cid in old_cidr.values()):
        return None
    if any(pid not in old_policies for pid in old_ids):
        return None

    counter = [desired.allocation.next_id]

    def fresh() -> int:
        counter[0] += 1
        return counter[0] - 1

    # plain classes: the same membership in both states (any policy reads them alike)
    identity_ids: dict[frozenset[int], int] = {}
    # union-only classes: (old membership, new membership) -> id
    split_ids: dict[tuple[frozenset[int], frozenset[int]], int] = {}

    def plain_id(content: frozenset, known: dict, *allocated: dict) -> int:  # type: ignore[type-arg]
        if content not in known:
            existing = next((a[content] for a in allocated if content in a), None)
            known[content] = fresh() if existing is None else existing
        return int(known[content])

    empty: frozenset[int] = frozenset()
    ipcache: dict[bytes, int] = {}
    for address in old_ipcache.keys() | desired.ipcache.keys():
        before_ids = old_identities.get(old_ipcache.get(address, 0), empty)
        after_ids = new_identities.get(desired.ipcache.get(address, 0), empty)
        if before_ids == after_ids:
            ipcache[address] = plain_id(
                before_ids, identity_ids, desired.allocation.identity_classes, previous.identity_classes
            )
        else:
            ipcache[address] = split_ids.setdefault((before_ids, after_ids), fresh())
    cidr_ids: dict[frozenset[CidrPeer], int] = {}
    old_peers: set[CidrPeer] = set().union(*(old_cidrs[cid] for cid in set(old_cidr.values()) if cid))
    new_peers: set[CidrPeer] = set().union(*(new_cidrs[cid] for cid in set(desired.cidr.values()) if cid))
    cidr: dict[CidrPrefix, int] = {}
    # Classes are a function of the peer set: when peers were only added (or only removed), the
    # union view is the new (or the old) one, and the sweep over every peer can be skipped.
    if old_peers <= new_peers:
        cidr = dict(desired.cidr)
        cidr_ids = {content: cid for content, cid in desired.allocation.cidr_classes.items()}
    elif new_peers <= old_peers:
        cidr = dict(old_cidr)
        cidr_ids = {old_cidrs[cid]: cid for cid in set(old_cidr.values()) if cid}
    else:
        for lpm_prefix, members in lpm_cidr_classes(old_peers | new_peers).items():
            cidr[lpm_prefix] = (
                plain_id(members, cidr_ids, desired.allocation.cidr_classes, previous.cidr_classes)
                if members
                else 0
            )
    if not (old_cidr.keys() | desired.cidr.keys()) <= cidr.keys():
        return None  # a prefix no referenced peer explains (a peer carved whole): not ours to guess

    contents = {pid: content for pid, content in old_policies.items() if pid in old_ids}
    renamed = False
    for content, pid in desired.allocation.policies.items():
        if contents.get(pid, content) != content:
            renamed = True
            if pid in leaving:
                # an id that changed content in place while some endpoint still leaves it (only
                # after an update that died half way): the leaver needs the old content
                return None
        contents[pid] = content
    if renamed and split_ids:
        # An id whose entries change in place keeps its old entries until the end, on classes
        # an address may join in this update (it gains, loses or changes identities): old
        # rules on a new membership would be neither state.
        return None
    interim_ids = {pid: fresh() for pid in sorted(leaving & joining) if pid in contents}
    old_view = {pid for pid in contents if pid in leaving}
    views = [(pid, content, pid in old_view) for pid, content in contents.items()]
    views += [(interim_ids[pid], contents[pid], False) for pid in interim_ids]

    policy = _union_entries(views, identity_ids, split_ids, cidr_ids, memos, desired)
    # Interim copies are read until the peers are new, while they move union -> new: their
    # entries on the new classes too.
    for pid, interim in interim_ids.items():
        policy.update(
            policy_entries(
                {contents[pid]: interim}, desired.allocation.identity_classes, desired.allocation.cidr_classes
            )
        )
    return UnionView(ipcache, cidr, policy, interim_ids, identity_ids, cidr_ids, counter[0])


def _union_entries(
    views: list[tuple[int, PolicyContent, bool]],
    identity_ids: dict[frozenset[int], int],
    split_ids: dict[tuple[frozenset[int], frozenset[int]], int],
    cidr_ids: dict[frozenset[CidrPeer], int],
    memos: Memos | None,
    desired: Desired | None = None,
) -> dict[PolicyEntry, int]:
    """The entries of each (policy id, content, reads the old memberships) view on the union
    classes: a split class's members are its old identities or its new ones, by view. With
    `desired`, views the compile already expanded on these very classes are copied from it."""
    if desired is not None and not split_ids:
        copied = _entries_as_compiled(views, identity_ids, cidr_ids, desired)
        if copied is not None:
            return copied
    if memos is not None:
        answer: dict[PolicyEntry, int] = {}
        for reads_old, memo in ((True, memos.union_old), (False, memos.union_new)):
            chosen = {content: pid for pid, content, flag in views if flag == reads_old}
            if len(chosen) != sum(1 for view in views if view[2] == reads_old):
                break  # a content standing for two ids in one view: expanded one id at a time
            identity_pairs: set[ClassPair] = set(identity_ids.items())
            identity_pairs.update((pair[0] if reads_old else pair[1], cid) for pair, cid in split_ids.items())
            answer.update(memo.entries_for(chosen, identity_pairs, cidr_ids.items()))
        else:
            return answer
    identity_members: dict[int, list[int]] = {}
    for identities, class_id in identity_ids.items():
        for identity in identities:
            identity_members.setdefault(identity, []).append(class_id)
    members_by_view: dict[bool, dict[int, list[int]]] = {True: {}, False: {}}
    for (before_ids, after_ids), class_id in split_ids.items():
        for old_view_flag, identities in ((True, before_ids), (False, after_ids)):
            for identity in identities:
                members_by_view[old_view_flag].setdefault(identity, []).append(class_id)
    cidr_members: dict[CidrPeer, list[int]] = {}
    for members, class_id in cidr_ids.items():
        for member in members:
            cidr_members.setdefault(member, []).append(class_id)
    policy: dict[PolicyEntry, int] = {}
    for reads_old in (True, False):
        merged = {i: identity_members.get(i, []) + members_by_view[reads_old].get(i, [])
                  for i in identity_members.keys() | members_by_view[reads_old].keys()}  # fmt: skip
        # a content may stand for two ids (a policy and its interim copy): one call per id
        for pid, content, flag in views:
            if flag == reads_old:
                policy.update(entries_for_members({content: pid}, merged, cidr_members))
    return policy


def _entries_as_compiled(
    views: list[tuple[int, PolicyContent, bool]],
    identity_ids: dict[frozenset[int], int],
    cidr_ids: dict[frozenset[CidrPeer], int],
    desired: Desired,
) -> dict[PolicyEntry, int] | None:
    """When the union classes are the new state's (peers only joined, no address changed
    identities: a first load, a list that only grew), every view reads the classes the compile
    read: an id with the content it has in `desired` has the compile's entries, and only the
    others (ids on their way out, interim copies) are expanded. None when the classes differ."""
    allocation = desired.allocation
    if cidr_ids != allocation.cidr_classes or identity_ids != allocation.identity_classes:
        return None
    same = {pid for pid, content, _reads_old in views if allocation.policies.get(content) == pid}
    answer = {entry: count for entry, count in desired.policy.items() if entry[1] in same}
    for pid, content, _reads_old in views:
        if pid not in same:
            answer.update(
                policy_entries({content: pid}, allocation.identity_classes, allocation.cidr_classes)
            )
    return answer


def with_union(allocation: Allocation, union: UnionView | None) -> Allocation:
    """`allocation` with the union's ids remembered (they may be live if an apply fails half way)
    and its counter past them."""
    if union is None:
        return allocation
    return Allocation(
        policies=allocation.policies,
        identity_classes={**union.identity_classes, **allocation.identity_classes},
        cidr_classes={**union.cidr_classes, **allocation.cidr_classes},
        endpoint_slots=allocation.endpoint_slots,
        endpoint_policy_ids=allocation.endpoint_policy_ids,
        next_id=max(allocation.next_id, union.next_id),
    )


def insertion_order(prefixes: set[CidrPrefix]) -> list[CidrPrefix]:
    """Longest first: an address never matches a new prefix while a longer new one is missing."""
    return sorted(prefixes, key=lambda prefix: (-prefix[0], prefix[1]))


def deletion_order(prefixes: set[CidrPrefix]) -> list[CidrPrefix]:
    """Shortest first: an address never falls back to a vanishing prefix shorter than its own."""
    return sorted(prefixes)
