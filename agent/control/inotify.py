"""Wake-ups for the folder source: Linux inotify through the C library (ctypes, no dependency).

The folder source keeps polling; a watch only ends its wait early, so an edit is read within a
millisecond or two instead of up to one poll interval later. Whatever goes wrong here (not Linux,
the per-user watch limit reached, a directory gone) leaves the source polling as before.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import select
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)

# <sys/inotify.h>: what changes a directory's files, and the directory itself going away.
_IN_MODIFY, _IN_ATTRIB, _IN_CLOSE_WRITE = 0x2, 0x4, 0x8
_IN_MOVED_FROM, _IN_MOVED_TO, _IN_CREATE, _IN_DELETE = 0x40, 0x80, 0x100, 0x200
_IN_DELETE_SELF, _IN_MOVE_SELF, _IN_ONLYDIR = 0x400, 0x800, 0x01000000
_IN_NONBLOCK, _IN_CLOEXEC = os.O_NONBLOCK, os.O_CLOEXEC
_MASK = (
    _IN_MODIFY | _IN_ATTRIB | _IN_CLOSE_WRITE | _IN_MOVED_FROM | _IN_MOVED_TO | _IN_CREATE | _IN_DELETE
    | _IN_DELETE_SELF | _IN_MOVE_SELF | _IN_ONLYDIR
)


class DirectoryWatch:
    """One inotify instance watching directories (not recursively: pass every directory)."""

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        fd = self._libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if fd < 0:
            code = ctypes.get_errno()
            raise OSError(code, f"inotify_init1: {os.strerror(code)}")
        self._fd = fd

    @classmethod
    def open(cls) -> DirectoryWatch | None:
        """A watch, or None where inotify is not available (the caller then only polls)."""
        try:
            return cls()
        except (OSError, AttributeError) as exc:  # AttributeError: a C library without inotify
            log.info("inotify unavailable (%s); polling only", exc)
            return None

    def watch(self, directories: Iterable[Path]) -> None:
        """Watch each directory; watching one again is a no-op, so callers pass all of them."""
        for directory in directories:
            if self._libc.inotify_add_watch(self._fd, os.fsencode(directory), _MASK) < 0:
                code = ctypes.get_errno()
                if code != errno.ENOENT:  # gone between listing and watching: the poll sees it
                    log.debug("cannot watch %s: %s", directory, os.strerror(code))

    def wait(self, timeout: float) -> bool:
        """Block until something changed (True) or `timeout` seconds passed (False)."""
        readable, _, _ = select.select([self._fd], [], [], timeout)
        if not readable:
            return False
        while True:  # what happened is read again from the folder; the events only wake us
            try:
                if not os.read(self._fd, 65536):
                    break
            except BlockingIOError:
                break
        return True

    def close(self) -> None:
        os.close(self._fd)
