"""Policy LPM entries kept between compiles, so that a patched allow list costs its change, not
its length. Pure (no I/O).

compiler.entries_for_members expands every rule of every policy against the classes of its peer;
for one peer changed in a 10,000-peer list that is ~100 ms of the agent's work for four entries
that differ (issue 27). An `EntryMemo` keeps, for each policy id, its rules by peer and its
entries by (class, kind) *group*: the entries of one policy on one class depend only on the rules
whose peer is a member of that class. A call then recomputes only the groups that can differ:
  - of the rules added to or removed from a policy (a patched list, or a content an id inherits),
    the groups of the classes their peer is in;
  - of a class whose membership or id changed (the class lists are diffed as sets of
    (members, id) pairs), the groups of the policies reading one of its members.
The answer equals compiler.entries_for_members on the same arguments (a differential test
replays random patches: tests/unit/test_bpf_entry_memo.py). Tiered contents (ClusterNetworkPolicy)
are expanded whole on every call: their cells resolve overlaps across rules, and they are few.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Set
from dataclasses import dataclass, field
from typing import Any

from agent.dataplane.bpf.compiler import (
    PolicyContent,
    PolicyEntry,
    Rule,
    entries_for_members,
    group_entries,
)
from agent.dataplane.bpf.structs import PeerKind
from agent.dataplane.bpf.tiered import is_tiered
from agent.dataplane.types import CidrPeer, IdentityPeer

# A class is (its members, its id); members are identities (ints) or CidrPeers.
ClassPair = tuple[frozenset[Any], int]
Group = tuple[int, int]  # (class id, peer kind)
_KINDS = (PeerKind.IDENTITY, PeerKind.CIDR)


class ClassIndex:
    """The classes of one kind as last given, and for each member the ids of its classes."""

    def __init__(self) -> None:
        self.pairs: set[ClassPair] = set()
        self.members: dict[int, frozenset[Any]] = {}  # class id -> members
        self.classes_of: dict[Any, set[int]] = {}  # member -> class ids

    def update(self, pairs: Set[ClassPair], report: bool = True) -> dict[int, list[frozenset[Any]]]:
        """Move to `pairs`; with `report`, for each class id that came, went or changed members,
        the members it had and has (whose groups may differ now)."""
        gone, came = self.pairs - pairs, pairs - self.pairs
        changed: dict[int, list[frozenset[Any]]] = {}
        members_by_id, classes_of = self.members, self.classes_of
        for members, class_id in gone:
            if report:
                changed.setdefault(class_id, []).append(members)
            members_by_id.pop(class_id, None)  # a class id that came again is put back below
            for member in members:
                held = classes_of[member]
                held.discard(class_id)
                if not held:
                    del classes_of[member]
        for members, class_id in came:
            if report:
                changed.setdefault(class_id, []).append(members)
            members_by_id[class_id] = members
            for member in members:
                joined = classes_of.get(member)
                if joined is None:
                    classes_of[member] = {class_id}
                else:
                    joined.add(class_id)
        self.pairs -= gone
        self.pairs |= came
        return changed


def _member(peer: CidrPeer | IdentityPeer) -> tuple[int, Any]:
    """(kind, the key a class lists it by)."""
    if isinstance(peer, IdentityPeer):
        return PeerKind.IDENTITY, peer.identity
    return PeerKind.CIDR, peer


@dataclass
class _Book:
    """One policy id's rules by peer and entries by group (plain, not tiered, content)."""

    content: PolicyContent
    rules: dict[tuple[int, Any], list[Rule]] = field(default_factory=dict)  # (kind, member) -> rules
    groups: dict[Group, dict[PolicyEntry, int]] = field(default_factory=dict)


@dataclass
class EntryMemo:
    """The last answer of `entries` and what it was computed from (see the module docstring)."""

    indexes: dict[int, ClassIndex] = field(default_factory=lambda: {kind: ClassIndex() for kind in _KINDS})
    books: dict[int, _Book] = field(default_factory=dict)  # policy id -> its book
    readers: dict[tuple[int, Any], set[int]] = field(default_factory=dict)  # (kind, member) -> ids
    entries: dict[PolicyEntry, int] = field(default_factory=dict)  # every book's
    lock: threading.Lock = field(default_factory=threading.Lock)

    def forget(self) -> None:
        with self.lock:
            self._reset()

    def entries_for(
        self,
        policies: dict[PolicyContent, int],
        identity_classes: Set[ClassPair],
        cidr_classes: Set[ClassPair],
    ) -> dict[PolicyEntry, int]:
        """compiler.entries_for_members(policies, members of the identity classes, members of the
        CIDR classes), recomputing only what changed since the last call. Class ids are unique
        across both kinds' pairs (one counter hands them out)."""
        with self.lock:
            try:
                return self._entries(
                    policies, {PeerKind.IDENTITY: identity_classes, PeerKind.CIDR: cidr_classes}
                )
            except BaseException:
                self._reset()  # half updated: the next call starts from nothing
                raise

    def _reset(self) -> None:
        self.indexes = {kind: ClassIndex() for kind in _KINDS}
        self.books.clear()
        self.readers.clear()
        self.entries.clear()

    def _entries(
        self, policies: dict[PolicyContent, int], classes: dict[int, Set[ClassPair]]
    ) -> dict[PolicyEntry, int]:
        dirty: dict[int, set[Group]] = {}  # policy id -> groups to recompute
        for kind in _KINDS:
            # no book yet (a first load): nothing to redo, no changes to report
            changed = self.indexes[kind].update(classes[kind], report=bool(self.readers))
            for class_id, member_sets in changed.items():
                for members in member_sets:
                    for member in members:
                        for policy_id in self.readers.get((kind, member), ()):
                            dirty.setdefault(policy_id, set()).add((class_id, kind))
        wanted = {policy_id: content for content, policy_id in policies.items()}
        for policy_id in [pid for pid in self.books if pid not in wanted]:
            self._drop_book(policy_id)
        tiered: dict[PolicyContent, int] = {}
        for policy_id, content in wanted.items():
            book = self.books.get(policy_id)
            if book is not None:
                if book.content is content or book.content == content:
                    continue  # its groups are redone only where a class changed
                if self._repatch(policy_id, book, content, dirty):
                    continue
                self._drop_book(policy_id)  # it became tiered
            if is_tiered(content):
                tiered[content] = policy_id
            else:
                self._open(policy_id, content)
        for policy_id, groups in dirty.items():
            book = self.books.get(policy_id)
            if book is not None:
                for group in groups:
                    self._regroup(policy_id, book, group)
        if not tiered:
            return dict(self.entries)
        identity_members, cidr_members = (_members_by_member(self.indexes[kind]) for kind in _KINDS)
        return {**self.entries, **entries_for_members(tiered, identity_members, cidr_members)}

    # ---- books -------------------------------------------------------------------------------

    def _repatch(
        self, policy_id: int, book: _Book, content: PolicyContent, dirty: dict[int, set[Group]]
    ) -> bool:
        """Move `book` to `content`; False when `content` is tiered (not kept in books)."""
        added, removed = content - book.content, book.content - content
        if any(len(rule) != 4 for rule in added):
            return False
        if len(added) + len(removed) > len(content) // 2:  # mostly new: cheaper built afresh
            self._drop_book(policy_id)
            self._open(policy_id, content)
            return True
        book.content = content
        groups = dirty.setdefault(policy_id, set())
        for rule in removed:
            key = _member(rule[3])
            held = book.rules[key]
            held.remove(rule)
            if not held:
                del book.rules[key]
                self._unread(key, policy_id)
            groups.update((class_id, key[0]) for class_id in self.indexes[key[0]].classes_of.get(key[1], ()))
        self._add_rules(policy_id, book, added, dirty)
        return True

    def _add_rules(
        self, policy_id: int, book: _Book, rules: Iterable[Rule], dirty: dict[int, set[Group]]
    ) -> dict[Group, list[Rule]]:
        """Files `rules` in `book` and marks their groups dirty; returns the rules by group."""
        groups = dirty.setdefault(policy_id, set())
        by_group: dict[Group, list[Rule]] = {}
        classes_of = {kind: self.indexes[kind].classes_of for kind in _KINDS}
        readers, held_rules = self.readers, book.rules
        for rule in rules:
            peer = rule[3]
            key: tuple[int, Any]
            if isinstance(peer, IdentityPeer):
                kind, key = PeerKind.IDENTITY, (PeerKind.IDENTITY, peer.identity)
            else:
                kind, key = PeerKind.CIDR, (PeerKind.CIDR, peer)
            held = held_rules.get(key)
            if held is None:
                held = held_rules[key] = []
                readers.setdefault(key, set()).add(policy_id)
            held.append(rule)
            for class_id in classes_of[kind].get(key[1], ()):
                group = (class_id, kind)
                rules_of_group = by_group.get(group)
                if rules_of_group is None:
                    by_group[group] = [rule]
                    groups.add(group)
                else:
                    rules_of_group.append(rule)
        return by_group

    def _open(self, policy_id: int, content: PolicyContent) -> None:
        """A new book: every group computed at once from its rules (no member walks)."""
        book = self.books[policy_id] = _Book(content)
        for (class_id, kind), rules in self._add_rules(policy_id, book, content, {}).items():
            entries = group_entries(policy_id, class_id, kind, rules)
            book.groups[(class_id, kind)] = entries
            self.entries.update(entries)

    def _regroup(self, policy_id: int, book: _Book, group: Group) -> None:
        for entry in book.groups.pop(group, ()):
            del self.entries[entry]
        class_id, kind = group
        rules: list[Rule] = []
        for member in self.indexes[kind].members.get(class_id, ()):
            rules += book.rules.get((kind, member), ())
        if rules:
            entries = group_entries(policy_id, class_id, kind, rules)
            book.groups[group] = entries
            self.entries.update(entries)

    def _drop_book(self, policy_id: int) -> None:
        book = self.books.pop(policy_id, None)
        if book is None:
            return
        for entries in book.groups.values():
            for entry in entries:
                del self.entries[entry]
        for key in book.rules:
            self._unread(key, policy_id)

    def _unread(self, key: tuple[int, Any], policy_id: int) -> None:
        readers = self.readers[key]
        readers.discard(policy_id)
        if not readers:
            del self.readers[key]


@dataclass
class Memos:
    """One dataplane's remembered entries: its compile's, and the union view's per membership
    (transition.py expands the policies reading old and those reading new memberships apart)."""

    compile: EntryMemo = field(default_factory=EntryMemo)
    union_old: EntryMemo = field(default_factory=EntryMemo)
    union_new: EntryMemo = field(default_factory=EntryMemo)

    def forget(self) -> None:
        for memo in (self.compile, self.union_old, self.union_new):
            memo.forget()


def _members_by_member(index: ClassIndex) -> dict[Any, list[int]]:
    return {member: list(class_ids) for member, class_ids in index.classes_of.items()}
