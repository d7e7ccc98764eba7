"""Read a pinned map from another process, without compiling the datapath: `podfence inspect`
reads what the running agent programmed. The keys and values are the ctypes mirrors of
structs.py (MAP_MIRRORS); a pin whose sizes are not the mirror's is refused, never misread.
Read-only: nothing here writes a map.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from agent.dataplane.base import PermanentDataplaneError
from agent.dataplane.bpf import loader, structs


class PinnedMap:
    """One pinned map, opened by path; `items()` walks it with the kernel's get_next_key."""

    def __init__(self, pin_dir: str, name: str, per_cpu: bool = False) -> None:
        from bcc import libbcc

        self._lib = libbcc.lib
        self.name = name
        mirrors: tuple[Any, Any] = structs.MAP_MIRRORS[name]  # ctypes classes
        self.key_type, self.value_type = mirrors
        path = Path(pin_dir) / name
        self.fd = self._lib.bpf_obj_get(str(path).encode())
        if self.fd < 0:
            raise PermanentDataplaneError(f"cannot open pinned map {path}: is the bpf agent running here?")
        info = loader._MapInfo()
        length = ctypes.c_uint32(ctypes.sizeof(info))
        if self._lib.bpf_obj_get_info(self.fd, ctypes.byref(info), ctypes.byref(length)) != 0:
            self.close()
            raise PermanentDataplaneError(f"cannot read the layout of pinned map {path}")
        value_size = ctypes.sizeof(self.value_type)
        if (info.key_size, info.value_size) != (ctypes.sizeof(self.key_type), value_size):
            self.close()
            raise PermanentDataplaneError(
                f"pinned map {path} has key/value sizes {info.key_size}/{info.value_size}, this version "
                f"reads {ctypes.sizeof(self.key_type)}/{value_size}"
            )
        # a per-CPU map's lookup fills one value per possible CPU, each rounded up to 8 bytes
        self.per_cpu = per_cpu
        self._cpus = loader.possible_cpus() if per_cpu else 1
        self._stride = (value_size + 7) // 8 * 8 if per_cpu else value_size

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> PinnedMap:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[Any]:
        return self.keys()

    def keys(self) -> Iterator[Any]:
        key, following = self.key_type(), self.key_type()
        previous: Any = None
        while self._lib.bpf_get_next_key(self.fd, previous, ctypes.byref(following)) == 0:
            ctypes.memmove(ctypes.byref(key), ctypes.byref(following), ctypes.sizeof(key))
            yield self.key_type.from_buffer_copy(key)
            previous = ctypes.byref(key)

    def lookup(self, key: Any) -> list[Any] | None:
        """The value(s) at `key` (one per possible CPU for a per-CPU map); None when absent."""
        buffer = ctypes.create_string_buffer(self._stride * self._cpus)
        if self._lib.bpf_lookup_elem(self.fd, ctypes.byref(key), buffer) != 0:
            return None
        raw = buffer.raw
        return [self.value_type.from_buffer_copy(raw, i * self._stride) for i in range(self._cpus)]

    def items(self) -> Iterator[tuple[Any, Any]]:
        """(key, value) of every entry (a per-CPU map's value: the list of per-CPU values). An
        entry deleted between the key walk and its lookup is skipped."""
        for key in self.keys():
            values = self.lookup(key)
            if values is not None:
                yield key, values if self.per_cpu else values[0]


def read_map(pin_dir: str, name: str, per_cpu: bool = False) -> list[tuple[Any, Any]]:
    with PinnedMap(pin_dir, name, per_cpu) as table:
        return list(table.items())
