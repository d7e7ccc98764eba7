"""Entering a network namespace for one block of code, on the calling thread only."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


@contextlib.contextmanager
def inside(netns_name: str | None) -> Iterator[None]:
    """Run the block with this thread in /run/netns/`netns_name` (None: where it already is).
    Namespaces are per thread: the kernel calls the block makes (netlink, bpf links) and the
    subprocesses it starts act there."""
    if netns_name is None:
        yield
        return
    from pyroute2 import netns

    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        target = os.open(f"/run/netns/{netns_name}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        os.close(home)
        raise
    try:
        netns.setns(target, flags=0)
        yield
    finally:
        netns.setns(home, flags=0)
        os.close(target)
        os.close(home)
