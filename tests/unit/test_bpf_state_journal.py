"""The state file's journal (state_file.py): each save appends what changed, a read replays it to
exactly the allocation saved last, and no crash loses an id: a torn last line, a fold that died
between its base and its journal, an apply that died between its write-ahead line and the maps.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import random
from pathlib import Path

from agent.dataplane.bpf.compiler import Allocation, compile_node_state
from agent.dataplane.bpf.state_file import (
    StateFile,
    allocation_from_json,
    journal_path,
    merge_allocations,
    read,
    save,
)
from agent.dataplane.types import Allow, CidrPeer, DirectionPolicy, Endpoint, NodeState
from tests.unit.test_bpf_plan import random_state, small_edit


def recorded(path: Path) -> Allocation | None:
    return allocation_from_json(read(path))


def test_every_save_reads_back_exactly_over_random_edits(tmp_path: Path) -> None:
    path = tmp_path / "pf.bpf-state.json"
    record = StateFile(path)
    rng = random.Random(11)
    state = random_state(rng, 1)
    allocation = None
    appended = 0
    for version in range(2, 120):
        allocation = compile_node_state(state, allocation, inherit=rng.random() < 0.7).allocation
        interfaces = sorted(rng.sample(range(10, 20), rng.randint(0, 4)))
        record.save(allocation, interfaces)
        assert recorded(path) == allocation, version
        assert read(path)["interfaces"] == interfaces
        appended += journal_path(path).exists()
        state = small_edit(rng, state, version) if rng.random() < 0.8 else random_state(rng, version)
    assert appended > 100  # the journal, not the base, carried the saves


def host_peer_allocation(peers: list[str], previous: Allocation | None) -> Allocation:
    allows = tuple(Allow(CidrPeer(ipaddress.ip_network(p)), 6, 8080, 8080) for p in peers)
    endpoint = Endpoint("ns/p0", (), DirectionPolicy(True, allows), DirectionPolicy(), 11)
    return compile_node_state(NodeState(1, {"ns/p0": endpoint}), previous).allocation


def test_one_peer_changed_among_thousands_appends_a_few_hundred_bytes(tmp_path: Path) -> None:
    path = tmp_path / "pf.bpf-state.json"
    record = StateFile(path)
    peers = [f"172.16.{i // 256}.{i % 256}/32" for i in range(3000)]
    first = host_peer_allocation(peers, None)
    record.save(first, [11])
    base_bytes = path.stat().st_size
    second = host_peer_allocation([*peers[:-1], "172.31.0.1/32"], first)
    assert list(second.policies.values()) == list(first.policies.values())  # kept its id: patched
    record.save(second, [11])
    assert path.stat().st_size == base_bytes  # the base was not rewritten
    assert journal_path(path).stat().st_size < 600 < base_bytes // 100
    assert recorded(path) == second


def saved_twice(path: Path) -> tuple[Allocation, Allocation, StateFile]:
    rng = random.Random(5)
    state = random_state(rng, 1)
    first = compile_node_state(state).allocation
    second = compile_node_state(random_state(rng, 2), first, inherit=False).allocation
    record = StateFile(path)
    record.save(first, [1])
    record.save(second, [1, 2])
    assert first != second and recorded(path) == second
    return first, second, record


def test_a_torn_last_line_is_not_replayed(tmp_path: Path) -> None:
    path = tmp_path / "pf.bpf-state.json"
    _first, second, record = saved_twice(path)
    journal = journal_path(path)
    before = journal.read_bytes()
    third = dataclasses.replace(Allocation(), next_id=second.next_id + 7)
    record.save(third, [3])
    line = journal.read_bytes()[len(before) :]
    assert line.endswith(b"\n") and len(line) > 2
    for cut in (1, len(line) // 2, len(line) - 1):  # a crash in the middle of the write
        journal.write_bytes(before + line[:cut])
        assert recorded(path) == second, cut
        assert read(path)["interfaces"] == [1, 2]


def test_a_fold_that_died_before_emptying_the_journal_skips_its_lines(tmp_path: Path) -> None:
    path = tmp_path / "pf.bpf-state.json"
    _first, second, _record = saved_twice(path)
    leftover = journal_path(path).read_bytes()  # lines of epoch 1 that `second` came from
    folded = Allocation(next_id=second.next_id + 1)
    save(path, folded, [4], epoch=2)  # the fold's new base...
    journal_path(path).write_bytes(leftover)  # ...and the crash before the journal was emptied
    assert recorded(path) == folded
    assert read(path)["interfaces"] == [4]


def test_a_restart_after_a_crash_between_write_ahead_and_maps_knows_every_id(tmp_path: Path) -> None:
    """The dataplane saves merge(old, new) before the first map op: a crash in the maps' write
    leaves the next start with every id of both (the maps may hold either)."""
    path = tmp_path / "pf.bpf-state.json"
    _first, second, record = saved_twice(path)
    third = compile_node_state(random_state(random.Random(9), 3), second, inherit=False).allocation
    record.save(merge_allocations(second, third), [1, 2, 3])  # write-ahead, then the crash
    restarted = StateFile(path)
    adopted = allocation_from_json(restarted.load())
    assert adopted is not None
    for allocation in (second, third):
        assert set(allocation.policies.values()) <= set(adopted.policies.values())
        assert set(allocation.cidr_classes.values()) <= set(adopted.cidr_classes.values())
        assert set(allocation.identity_classes.values()) <= set(adopted.identity_classes.values())
    assert adopted.next_id >= third.next_id
    # the restarted process folds what it read into a fresh base before it appends
    restarted.save(third, [3])
    assert not journal_path(path).exists() and recorded(path) == third
    assert read(path)["epoch"] > 1


def test_a_journal_past_the_base_size_is_folded(tmp_path: Path) -> None:
    path = tmp_path / "pf.bpf-state.json"
    record = StateFile(path)
    record.MIN_JOURNAL_BYTES = 0
    allocation = Allocation()
    for step in range(200):
        allocation = dataclasses.replace(allocation, endpoint_slots={f"ns/p{step}": step}, next_id=step + 2)
        record.save(allocation, [])
        assert recorded(path) == allocation
        journal = journal_path(path)
        assert not journal.exists() or journal.stat().st_size <= 2 * path.stat().st_size + 200
