"""Wake-ups for the folder source: file-system events through watchdog (inotify on Linux).

The folder source keeps polling; a watch only ends its wait early, so an edit is read within a
millisecond or two instead of up to one poll interval later. Whatever goes wrong here (no
inotify, the per-user watch limit reached, the folder replaced) leaves the source polling.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

log = logging.getLogger(__name__)


class _Wake(FileSystemEventHandler):
    """Any event under the folder only sets a flag: what changed is read again from the folder."""

    def __init__(self, changed: threading.Event) -> None:
        self._changed = changed

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type not in ("opened", "closed_no_write"):  # reads change nothing
            self._changed.set()


class FolderWatch:
    """Watches a folder and its subfolders; `wait()` returns early when something changed."""

    def __init__(self, folder: Path) -> None:
        self._changed = threading.Event()
        self._observer = Observer()
        self._observer.daemon = True
        self._observer.schedule(_Wake(self._changed), str(folder), recursive=True)
        self._observer.start()

    @classmethod
    def open(cls, folder: Path) -> FolderWatch | None:
        """A watch, or None where file-system events are not available (the caller then polls)."""
        try:
            return cls(folder)
        except OSError as exc:
            log.info("file-system events unavailable for %s (%s); polling only", folder, exc)
            return None

    def wait(self, timeout: float) -> bool:
        """Block until something changed (True) or `timeout` seconds passed (False)."""
        if not self._changed.wait(timeout):
            return False
        self._changed.clear()
        return True

    def close(self) -> None:
        self._observer.stop()
        self._observer.join(timeout=5)
