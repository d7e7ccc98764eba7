"""The remembered policy entries (entry_memo.py) equal a from-scratch expansion after every step of
random patch sequences: rules added to and removed from lists, ids inheriting another content,
policies coming and going, classes changing members or ids, tiered contents in between.
"""

from __future__ import annotations

import ipaddress
import random

import pytest

from agent.dataplane.bpf import transition
from agent.dataplane.bpf.compiler import PolicyContent, Rule, compile_node_state, entries_for_members
from agent.dataplane.bpf.entry_memo import ClassPair, EntryMemo, Memos
from agent.dataplane.bpf.plan import compile_and_plan, plan
from agent.dataplane.bpf.transition import with_union
from agent.dataplane.types import ACTION_ACCEPT, ACTION_DENY, TIER_ADMIN, CidrPeer, IdentityPeer
from tests.unit.test_bpf_plan import Maps, random_state, small_edit

net = ipaddress.ip_network
CIDR_PEERS = [
    CidrPeer(net("10.0.0.0/8")),
    CidrPeer(net("10.0.0.0/8"), (net("10.1.0.0/16"),)),
    CidrPeer(net("10.1.0.0/16")),
    CidrPeer(net("fd00::/16")),
    *(CidrPeer(net(f"10.1.2.{i}/32")) for i in range(8)),
]
IDENTITIES = list(range(1, 7))
PEERS: list[CidrPeer | IdentityPeer] = [*CIDR_PEERS, *(IdentityPeer(i) for i in IDENTITIES)]


def random_rule(rng: random.Random) -> Rule:
    peer = rng.choice(PEERS)
    protocol = rng.choice((0, 6, 6, 17))
    if protocol == 0:
        first, last = 0, 65535
    else:
        first = rng.choice((10, 79, 80, 1000))
        last = first + rng.choice((0, 0, 1, 20, 1000))
    if rng.random() < 0.05:  # tiered (ClusterNetworkPolicy)
        return (
            protocol,
            first,
            last,
            peer,
            TIER_ADMIN,
            rng.randint(0, 3),
            rng.choice((ACTION_ACCEPT, ACTION_DENY)),
        )
    return (protocol, first, last, peer)


def random_classes(rng: random.Random, members: list, ids: list[int]) -> set[ClassPair]:  # type: ignore[type-arg]
    classes: dict[frozenset, int] = {}  # type: ignore[type-arg]
    for class_id in ids:
        content = frozenset(rng.sample(members, rng.randint(1, 3)))
        classes.setdefault(content, class_id)
    return set(classes.items())


def mutate_classes(
    rng: random.Random, pairs: set[ClassPair], members: list, next_id: list[int]
) -> set[ClassPair]:  # type: ignore[type-arg]
    pairs = set(pairs)
    for _ in range(rng.randint(0, 2)):
        action = rng.random()
        if action < 0.3 and pairs:
            pairs.discard(rng.choice(sorted(pairs, key=lambda p: p[1])))
        elif action < 0.6 and pairs:  # same members, fresh id
            old = rng.choice(sorted(pairs, key=lambda p: p[1]))
            pairs.discard(old)
            pairs.add((old[0], next_id[0]))
            next_id[0] += 1
        else:  # new members (maybe under an id that is still live elsewhere: replaced)
            content = frozenset(rng.sample(members, rng.randint(1, 3)))
            if all(content != have for have, _ in pairs):
                pairs.add((content, next_id[0]))
                next_id[0] += 1
    return pairs


def mutate_policies(
    rng: random.Random, policies: dict[int, PolicyContent], next_id: list[int]
) -> dict[int, PolicyContent]:
    policies = dict(policies)
    for _ in range(rng.randint(1, 3)):
        action = rng.random()
        if action < 0.5 and policies:  # a patch: a few rules in, a few out
            pid = rng.choice(sorted(policies))
            rules = set(policies[pid])
            for rule in rng.sample(sorted(rules, key=repr), min(len(rules), rng.randint(0, 2))):
                rules.discard(rule)
            rules.update(random_rule(rng) for _ in range(rng.randint(0, 2)))
            policies[pid] = frozenset(rules)
        elif action < 0.65 and policies:
            del policies[rng.choice(sorted(policies))]
        elif action < 0.8 and len(policies) > 1:  # an id takes another's content (inherit)
            a, b = rng.sample(sorted(policies), 2)
            policies[a] = policies.pop(b) | {random_rule(rng)}
        else:
            policies[next_id[0]] = frozenset(random_rule(rng) for _ in range(rng.randint(0, 6)))
            next_id[0] += 1
    # contents are dict keys: one id per content
    unique: dict[PolicyContent, int] = {}
    for pid, content in sorted(policies.items()):
        unique.setdefault(content, pid)
    return {pid: content for content, pid in unique.items()}


def members_of(pairs: set[ClassPair]) -> dict:  # type: ignore[type-arg]
    members: dict = {}  # type: ignore[type-arg]
    for content, class_id in pairs:
        for member in content:
            members.setdefault(member, []).append(class_id)
    return members


def test_remembered_entries_equal_a_fresh_expansion_over_random_patches() -> None:
    rng = random.Random(27)
    steps = changed_steps = 0
    for _ in range(60):
        memo = EntryMemo()
        next_id = [1000]
        identity_pairs = random_classes(rng, IDENTITIES, list(range(1, 6)))
        cidr_pairs = random_classes(rng, CIDR_PEERS, list(range(10, 20)))
        policies = mutate_policies(rng, {}, next_id)
        for _ in range(25):
            expected = entries_for_members(
                {content: pid for pid, content in policies.items()},
                members_of(identity_pairs),
                members_of(cidr_pairs),
            )
            got = memo.entries_for(
                {content: pid for pid, content in policies.items()}, identity_pairs, cidr_pairs
            )
            assert got == expected
            steps += 1
            changed_steps += bool(expected)
            policies = mutate_policies(rng, policies, next_id)
            if rng.random() < 0.5:
                identity_pairs = mutate_classes(rng, identity_pairs, IDENTITIES, next_id)
            if rng.random() < 0.5:
                cidr_pairs = mutate_classes(rng, cidr_pairs, CIDR_PEERS, next_id)
    assert changed_steps > steps // 2  # the answers compared were mostly not empty


def test_a_failed_call_leaves_nothing_half_remembered() -> None:
    memo = EntryMemo()
    rule = (6, 80, 80, IdentityPeer(1))
    cidr_pairs: set[ClassPair] = set()
    assert memo.entries_for({frozenset({rule}): 5}, {(frozenset({1}), 1)}, cidr_pairs)
    try:
        memo.entries_for({frozenset({(6, 90, 80, IdentityPeer(1))}): 5}, {(frozenset({1}), 1)}, cidr_pairs)
    except ValueError:
        pass
    else:  # pragma: no cover
        raise AssertionError("an inverted port range must not expand")
    assert memo.books == {} and memo.entries == {}
    again = memo.entries_for({frozenset({rule}): 5}, {(frozenset({1}), 1)}, cidr_pairs)
    assert again == entries_for_members({frozenset({rule}): 5}, {1: [1]}, {})


def test_a_remembering_apply_plans_exactly_what_a_fresh_one_plans() -> None:
    """compile_and_plan with one dataplane's memos over a run of edits (patched lists, moved
    addresses, fresh states) against the same without memos: the same desired state, the same
    ops (policy puts, all written before anything reads them, in dict order), the same maps."""
    rng = random.Random(2027)
    memos = Memos()
    fresh_maps, memo_maps = Maps(), Maps()
    fresh_allocation = memo_allocation = None
    state = random_state(rng, 1)
    unions = 0
    for version in range(2, 150):
        fresh, fresh_ops, fresh_union = compile_and_plan(fresh_maps, state, fresh_allocation)
        got, ops, union = compile_and_plan(memo_maps, state, memo_allocation, memos)
        assert got == fresh, version
        assert sorted(map(repr, ops)) == sorted(map(repr, fresh_ops)), version
        assert [op for op in ops if op.table != "policy"] == [op for op in fresh_ops if op.table != "policy"]
        assert union == fresh_union, version
        unions += union is not None
        for op in ops:
            fresh_maps.execute(op)
            memo_maps.execute(op)
        assert memo_maps == fresh_maps
        fresh_allocation = with_union(fresh.allocation, fresh_union)
        memo_allocation = with_union(got.allocation, union)
        state = small_edit(rng, state, version) if rng.random() < 0.85 else random_state(rng, version)
    assert unions > 50  # the in-place path (and its union memos) was taken


def test_union_entries_copied_from_the_compile_equal_the_expanded_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """transition._entries_as_compiled (the union's classes are the new state's) against the
    union view's own expansion, over the same random edits: the same union views."""
    rng = random.Random(31)
    maps = Maps()
    allocation = None
    state = random_state(rng, 1)
    copied = 0
    real = transition._entries_as_compiled

    def counting(*args: object) -> object:
        nonlocal copied
        answer = real(*args)  # type: ignore[arg-type]
        copied += answer is not None
        return answer

    for version in range(2, 120):
        desired = compile_node_state(state, allocation)
        monkeypatch.setattr(transition, "_entries_as_compiled", counting)
        ops, union = plan(maps, desired, allocation)
        monkeypatch.setattr(transition, "_entries_as_compiled", lambda *args: None)
        expanded_ops, expanded = plan(maps, desired, allocation)
        assert union == expanded, version
        assert sorted(map(repr, ops)) == sorted(map(repr, expanded_ops)), version  # puts in dict order
        for op in ops:
            maps.execute(op)
        allocation = with_union(desired.allocation, union)
        state = small_edit(rng, state, version) if rng.random() < 0.85 else random_state(rng, version)
    assert copied > 20  # the copy was taken
