"""The BPF dataplane's state file: what each allocated id stands for, and which interfaces carry
podfence's filters. The maps hold only ids; without this record a restarted agent could hand a
live id to different content. Kept beside the pins (in /run, the same lifetime as bpffs).

Two files: the *base* (the whole record, written atomically: a temporary file renamed over it)
and a *journal* beside it (`<base>.journal`), one JSON line per save with what changed since the
line before (ids set, ids dropped, a policy's rules added and removed): rewriting 10,000 peers'
ids on every apply was 50-100 ms of one changed peer's 100 ms budget (issue 27). The journal is
folded into a fresh base once it outgrows the base, and on every start.

Crash safety (tests/unit/test_bpf_state_journal.py):
  - each line is one write() of a complete line; a line without its newline or that does not
    parse (a write torn by a crash) ends the replay: the lines before it are the record;
  - the dataplane saves the union of the old and the new ids *before* it writes the maps
    (write-ahead) and the new ids after, so a crash anywhere in an apply leaves every id the maps
    may hold on record;
  - the base carries an epoch, each line the epoch of the base it extends: folding writes the
    base under the next epoch before it empties the journal, so lines left over from a crash in
    between are recognised as folded already and skipped.
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

from agent.dataplane.bpf.compiler import Allocation, Rule
from agent.dataplane.types import CidrPeer, IdentityPeer

log = logging.getLogger(__name__)


def journal_path(path: Path) -> Path:
    return path.with_name(path.name + ".journal")


def read(path: Path) -> dict[str, Any]:
    """The record: the base with the journal's lines of its epoch replayed ({} without a base)."""
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    try:
        lines = journal_path(path).read_bytes().split(b"\n")
    except FileNotFoundError:
        return data
    # the last piece is b"" after a complete line, else a torn one: never replayed
    records = []
    for line in lines[:-1]:
        try:
            record = json.loads(line)
        except ValueError:
            break
        if not isinstance(record, dict):
            break
        records.append(record)
    epoch = data.get("epoch", 0)
    records = [record for record in records if record.get("epoch") == epoch]
    if not records:
        return data
    try:
        return _replayed(data, records)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        log.warning("ignoring an unreadable BPF state journal: %s", error)
        return data


def save(path: Path, allocation: Allocation | None, interfaces: Iterable[int], epoch: int = 0) -> int:
    """Write the whole record as the base of `epoch` (atomic: a crash leaves the old or the new
    file) and empty the journal; returns the base's size in bytes."""
    data = allocation_to_json(allocation or Allocation())
    data["interfaces"] = sorted(interfaces)
    data["epoch"] = epoch
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    text = json.dumps(data)
    temporary.write_text(text)
    os.replace(temporary, path)
    # after the base: journal lines of the previous epoch that survive a crash here are skipped
    journal_path(path).unlink(missing_ok=True)
    return len(text)


def remove(path: Path) -> None:
    for name in (path, journal_path(path)):
        name.unlink(missing_ok=True)


class StateFile:
    """The record of one dataplane, saved as journal lines against what it saved last."""

    MIN_JOURNAL_BYTES = 64 * 1024  # below this, never worth rewriting the base

    def __init__(self, path: Path) -> None:
        self.path = path
        self._saved: Allocation | None = None  # what the base and journal record (None: unknown)
        self._interfaces: list[int] = []
        self._epoch = 0
        self._base_bytes = 0
        self._journal_bytes = 0

    def load(self) -> dict[str, Any]:
        """The record as read(); the next save folds it into a fresh base (a journal this process
        did not write may end in a torn line, which an append would extend)."""
        data = read(self.path)
        self._saved = None
        self._epoch = int(data.get("epoch", 0)) if isinstance(data.get("epoch", 0), int) else 0
        return data

    def save(self, allocation: Allocation | None, interfaces: Iterable[int]) -> None:
        allocation = allocation or Allocation()
        interfaces = sorted(interfaces)
        saved = self._saved
        if saved is None or self._journal_bytes > max(self.MIN_JOURNAL_BYTES, self._base_bytes):
            self._fold(allocation, interfaces)
            return
        record = _delta(saved, allocation)
        if not record and interfaces == self._interfaces:
            return
        record["epoch"] = self._epoch
        record["interfaces"] = interfaces
        line = (json.dumps(record) + "\n").encode()
        try:
            descriptor = os.open(journal_path(self.path), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                written = os.write(descriptor, line)
            finally:
                os.close(descriptor)
        except OSError:
            written = -1
        if written != len(line):  # a short or failed write: the whole record, as a new base
            self._fold(allocation, interfaces)
            return
        self._journal_bytes += len(line)
        self._saved, self._interfaces = allocation, interfaces

    def _fold(self, allocation: Allocation, interfaces: list[int]) -> None:
        self._epoch += 1
        self._saved = None  # until the base is in place: a failure below must not append to it
        self._base_bytes = save(self.path, allocation, interfaces, self._epoch)
        self._journal_bytes = 0
        self._saved, self._interfaces = allocation, interfaces


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
            [policy_id, [[*rule[:3], _peer_to_json(rule[3]), *rule[4:]] for rule in content]]
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


def _rule_from_json(rule: list[Any]) -> Rule:
    """[protocol, first, last, peer] or, for a tiered rule, the same and [tier, rank, action]."""
    if len(rule) not in (4, 7):
        raise ValueError(f"bad rule {rule!r}")
    head = (int(rule[0]), int(rule[1]), int(rule[2]), _peer_from_json(rule[3]))
    if len(rule) == 4:
        return head
    return (*head, int(rule[4]), int(rule[5]), int(rule[6]))


def allocation_from_json(data: dict[str, Any]) -> Allocation | None:
    try:
        return Allocation(
            policies={
                frozenset(_rule_from_json(rule) for rule in rules): int(pid)
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


# ---- journal lines -------------------------------------------------------------------------------

_CLASS_TABLES = ("identity_classes", "cidr_classes")
_KEYED_TABLES = ("endpoint_slots", "endpoint_policy_ids")


def _rule_to_json(rule: Rule) -> list[Any]:
    return [*rule[:3], _peer_to_json(rule[3]), *rule[4:]]


def _delta(old: Allocation, new: Allocation) -> dict[str, Any]:
    """One journal line's content: what `new` sets, patches and drops against `old` ({}: nothing)."""
    record: dict[str, Any] = {}
    came = new.policies.items() - old.policies.items()
    if came:
        old_by_id = {pid: content for content, pid in old.policies.items()}
        whole, patched = [], []
        for content, pid in came:
            before = old_by_id.get(pid)
            added = content - before if before is not None else content
            removed = before - content if before is not None else frozenset()
            if before is not None and len(added) + len(removed) < len(content):
                # an id that kept its number while its list changed: the change, not the list
                patched.append([pid, [_rule_to_json(r) for r in added], [_rule_to_json(r) for r in removed]])
            else:
                whole.append([pid, [_rule_to_json(r) for r in content]])
        record.update(policies=whole, policy_rules=patched)
    gone = set(old.policies.values()) - set(new.policies.values())
    if gone:
        record["policies_gone"] = sorted(gone)
    for table in _CLASS_TABLES:
        before_classes, after_classes = getattr(old, table), getattr(new, table)
        came = after_classes.items() - before_classes.items()
        if came:
            record[table] = _classes_to_json(table, dict(came))
        gone = set(before_classes.values()) - set(after_classes.values())
        if gone:
            record[f"{table}_gone"] = sorted(gone)
    for table in _KEYED_TABLES:
        before_keyed, after_keyed = getattr(old, table), getattr(new, table)
        changed = {key: value for key, value in after_keyed.items() if before_keyed.get(key) != value}
        if changed:
            record[table] = changed
        dropped = before_keyed.keys() - after_keyed.keys()
        if dropped:
            record[f"{table}_gone"] = sorted(dropped)
    if new.next_id != old.next_id:
        record["next_id"] = new.next_id
    return record


def _classes_to_json(table: str, classes: dict[frozenset[Any], int]) -> list[Any]:
    if table == "identity_classes":
        return [[cid, sorted(ids)] for ids, cid in classes.items()]
    return [[cid, [_peer_to_json(p) for p in peers]] for peers, cid in classes.items()]


def _rule_key(rule: Any) -> str:
    return json.dumps(rule, sort_keys=True)


def _replayed(data: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any]:
    """The base `data` with the journal `records` applied, in the base's own form."""
    policies = {int(pid): {_rule_key(r): r for r in rules} for pid, rules in data["policies"]}
    classes = {table: {int(cid): members for cid, members in data[table]} for table in _CLASS_TABLES}
    keyed = {table: dict(data.get(table, {})) for table in _KEYED_TABLES}
    next_id, interfaces = data["next_id"], data.get("interfaces", [])
    for record in records:
        for pid, rules in record.get("policies", ()):
            policies[int(pid)] = {_rule_key(r): r for r in rules}
        for pid, added, removed in record.get("policy_rules", ()):
            rules = policies.setdefault(int(pid), {})
            for rule in removed:
                rules.pop(_rule_key(rule), None)
            rules.update((_rule_key(r), r) for r in added)
        for pid in record.get("policies_gone", ()):
            policies.pop(int(pid), None)
        for table in _CLASS_TABLES:
            classes[table].update((int(cid), members) for cid, members in record.get(table, ()))
            for cid in record.get(f"{table}_gone", ()):
                classes[table].pop(int(cid), None)
        for table in _KEYED_TABLES:
            keyed[table].update(record.get(table, {}))
            for key in record.get(f"{table}_gone", ()):
                keyed[table].pop(key, None)
        next_id = record.get("next_id", next_id)
        interfaces = record.get("interfaces", interfaces)
    return {
        **data,
        "policies": [[pid, list(rules.values())] for pid, rules in policies.items()],
        **{table: [[cid, members] for cid, members in held.items()] for table, held in classes.items()},
        **keyed,
        "next_id": next_id,
        "interfaces": interfaces,
    }
