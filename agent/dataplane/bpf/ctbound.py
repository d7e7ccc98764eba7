"""What one endpoint may hold of the conntrack map (issue 21, item 10; bpf/lib/conntrack.h).

The datapath charges each new pf_ct entry to the endpoint whose verdict inserted it
(pf_ct_charged, which only the datapath writes) and drops a new flow of an endpoint charged for
its bound of live entries. An LRU map evicts silently, so only a count can tell what an
endpoint still holds: `release` walks pf_ct, deletes the entries the datapath already treats as
expired, counts the live ones per owner, and writes pf_ct_released = charged (read before the
walk) - live, which only the agent writes. An entry inserted during the walk and seen by it
makes `released` smaller, never larger, so an endpoint is never credited with an entry it holds;
it gets it back at the next walk.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

from agent.dataplane.base import TemporaryDataplaneError
from agent.dataplane.bpf import structs

# pf_nf_now() may run a tick ahead of the agent's clock: an entry is expired only past this margin.
_EXPIRY_MARGIN_NS = 1_000_000_000
_NSEC = 1_000_000_000
_VALUE = struct.Struct("<Q2I3BxI")  # struct pf_ct_value: last_seen_ns, slot[2], flags[2], closing, pad, owner
_PROTOCOL_OFFSET = structs.CtKey.protocol.offset


def lookup_batches(table: Any, chunk: int = 8192) -> Iterator[tuple[Any, Any, int]]:
    """(keys, values, count) of a hash map, BPF_MAP_LOOKUP_BATCH at a time: a handful of
    syscalls instead of one get_next_key per entry (a full 65,536-entry conntrack: ~250 ms
    iterated from Python). The buffers are reused by the next batch."""
    from bcc.libbcc import lib

    size = min(chunk, table.max_entries)
    keys, values = (table.Key * size)(), (table.Leaf * size)()
    token_in, token_out, count = ctypes.c_uint32(0), ctypes.c_uint32(0), ctypes.c_uint32(0)
    first = True
    while True:
        count.value = size
        result = lib.bpf_lookup_batch(
            table.map_fd, None if first else ctypes.byref(token_in), ctypes.byref(token_out),
            ctypes.byref(keys), ctypes.byref(values), ctypes.byref(count),
        )  # fmt: skip
        error = ctypes.get_errno()
        yield keys, values, count.value
        if result != 0:
            if error == errno.ENOENT:
                return  # walked to the end
            raise TemporaryDataplaneError(f"reading {table.Key.__name__} entries: {os.strerror(error)}")
        token_in.value, first = token_out.value, False


def _timeout_ns(protocol: int, closing: int) -> int:
    if closing:
        return structs.CT_TIMEOUT_TCP_CLOSING * _NSEC
    return structs.CT_TIMEOUTS.get(protocol, structs.CT_TIMEOUT_OTHER) * _NSEC


def live_entries(ct: Any, now_ns: int) -> tuple[Counter[int], list[tuple[bytes, int]]]:
    """Live entries of pf_ct per owner (endpoint_id + 1), and the (key, last_seen_ns) of the
    expired ones."""
    live: Counter[int] = Counter()
    expired: list[tuple[bytes, int]] = []
    key_size, value_size = ctypes.sizeof(ct.Key), ctypes.sizeof(ct.Leaf)
    for keys, values, count in lookup_batches(ct):
        raw_keys = memoryview(keys).cast("B")[: count * key_size]
        raw_values = bytes(memoryview(values).cast("B")[: count * value_size])
        for index, (last_seen, _, _, _, _, closing, owner) in enumerate(_VALUE.iter_unpack(raw_values)):
            key = raw_keys[index * key_size : (index + 1) * key_size]
            age = now_ns - last_seen
            if age > _timeout_ns(key[_PROTOCOL_OFFSET], closing) + _EXPIRY_MARGIN_NS:
                expired.append((bytes(key), last_seen))
            elif owner:
                live[owner] += 1
    return live, expired


def _delete_if_unchanged(ct: Any, raw_key: bytes, last_seen: int) -> bool:
    """Deletes an expired entry unless a packet revived it since it was read (a new flow on the
    same tuple overwrites an expired entry in place)."""
    key = ct.Key.from_buffer_copy(raw_key)
    try:
        if ct[key].last_seen_ns != last_seen:
            return False
        del ct[key]
    except KeyError:
        return False  # evicted or deleted meanwhile: gone all the same
    return True


def _read_charged(charged: Any) -> dict[int, int]:
    return {key.value: value.value for key, value in charged.items() if value.value}


def _counters(module: Any) -> tuple[Any, Any] | None:
    """pf_ct_charged and pf_ct_released; None for a program built from sources older than the
    bound (bench.side_by_side builds them), which has neither."""
    try:
        return module[b"pf_ct_charged"], module[b"pf_ct_released"]
    except KeyError:
        return None


def release(module: Any, lock: Callable[[], AbstractContextManager[Any]], bound: int) -> int:
    """One count (see the module doc), when an endpoint holds half its `bound` or more (a walk
    of a full 65,536-entry map costs ~0.15 s; the two arrays, a few ms); returns the expired
    entries deleted. `lock`: held while `released` is written, so that a slot handed to a new
    endpoint (charged zeroed) in between is not credited with the old endpoint's entries."""
    counters = _counters(module)
    if counters is None:
        return 0
    ct, (charged, released) = module[b"pf_ct"], counters
    before = _read_charged(charged)
    credited = {key.value: value.value for key, value in released.items() if value.value}
    if all(count - credited.get(index, 0) < bound / 2 for index, count in before.items()):
        return 0
    live, expired = live_entries(ct, time.clock_gettime_ns(time.CLOCK_MONOTONIC))
    deleted = sum(_delete_if_unchanged(ct, key, last_seen) for key, last_seen in expired)
    with lock():
        now = _read_charged(charged)
        for index, count in before.items():
            if now.get(index, 0) < count:
                continue  # zeroed since: a new endpoint in the slot
            value = max(0, count - live.get(index + 1, 0))
            key = released.Key(index)
            if released[key].value != value:
                released[key] = released.Leaf(value)
    return deleted


def zero(module: Any, endpoint_id: int) -> None:
    """A slot handed to a new endpoint starts with nothing charged (the old endpoint's entries
    still in pf_ct are counted as the new one's until they expire, never credited to it)."""
    for table in _counters(module) or ():
        table[table.Key(endpoint_id)] = table.Leaf(0)
