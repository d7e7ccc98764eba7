"""The bpf(2) system call through ctypes, for the commands BCC does not wrap: test runs, netfilter
programs and their links."""

from __future__ import annotations

import ctypes
import ctypes.util
import os

SYS_BPF = 321  # x86_64

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def bpf(command: int, attr: ctypes.Structure, what: str) -> int:
    """bpf(command, &attr): its result (a new fd for loads and links), or OSError naming `what`."""
    result = int(_libc.syscall(SYS_BPF, command, ctypes.byref(attr), ctypes.sizeof(attr)))
    if result < 0:
        error = ctypes.get_errno()
        raise OSError(error, f"{what}: {os.strerror(error)}")
    return result
