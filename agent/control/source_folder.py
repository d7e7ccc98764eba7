"""Policy source: a folder of YAML/JSON files as `kubectl get -o yaml` writes them.

The folder is read once at start, then polled for changes every `poll_interval` seconds (200 ms
by default; polling file signatures is portable and cheap for the few hundred files such a folder
holds). Where file-system events work (watchdog: inotify on Linux), a watch on the folder and its
subfolders ends a wait early, so an edit after a quiet poll interval is read within milliseconds;
edits closer together than that are still read once per poll interval, so a burst (pod churn)
becomes a few versions, not one per file write. The polling stays, covering whatever the events
miss (watch limits, filesystems without them, a folder replaced). Only files whose (inode, size,
mtime) changed are re-read.

Each file keeps its last good objects: a file that stops parsing keeps contributing what it held
before, and its error is logged, counted and kept in `errors`/`last_error`. A single invalid
object inside a parsable file is skipped with its own error. The objects of all files are merged
and diffed against the previous merge, so an object that moves from one file to another is one
update, not a delete then an add.
"""

from __future__ import annotations

import logging
import stat
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from agent.control.folder_watch import FolderWatch
from agent.control.hub import PolicyHub
from agent.model.load import load_file
from agent.model.objects import KubeObject

log = logging.getLogger(__name__)

SUFFIXES = (".yaml", ".yml", ".json")
# After a wake-up, how long to let the rest of a burst of events land (an atomic replace is a
# create, a write, a close and a rename) before reading the folder.
SETTLE_S = 0.002
STOP_CHECK_S = 0.25
ObjectKey = tuple[str, str, str]  # (kind, namespace, name); namespace "" for a Namespace


def object_key(obj: KubeObject) -> ObjectKey:
    return (type(obj).__name__, getattr(obj, "namespace", ""), obj.name)


@dataclass(frozen=True)
class _Signature:
    inode: int
    size: int
    mtime_ns: int


class FolderSource:
    """Feeds a PolicyHub from a folder; `scan()` is one pass, `run(stop)` polls until stopped."""

    def __init__(self, folder: str | Path, hub: PolicyHub, poll_interval: float = 0.2) -> None:
        self.folder = Path(folder)
        self._hub = hub
        self.poll_interval = poll_interval
        self._signatures: dict[Path, _Signature] = {}
        self._good: dict[Path, dict[ObjectKey, KubeObject]] = {}
        self._invalid: dict[Path, list[str]] = {}
        self.errors: dict[Path, str] = {}  # files that do not parse, with why
        self.last_error: str | None = None
        self._merged: dict[ObjectKey, KubeObject] = {}
        self._started = False
        self._last_woken = float("-inf")  # when a file-system event last led to a pass (monotonic)

    @property
    def invalid_objects(self) -> list[str]:
        return [error for errors in self._invalid.values() for error in errors]

    def run(self, stop: threading.Event, use_events: bool = True) -> None:
        watch = FolderWatch.open(self.folder) if use_events else None
        try:
            while not self._wait(stop, watch):
                try:
                    self.scan()
                except Exception:  # a surprise in one pass must not end the watch
                    log.exception("scanning %s failed", self.folder)
                    self._hub.metrics.source_errors_total.inc()
        finally:
            if watch is not None:
                watch.close()

    def _wait(self, stop: threading.Event, watch: FolderWatch | None) -> bool:
        """Until the next pass is due (a change or the poll interval); True once `stop` is set."""
        if watch is None:
            return stop.wait(self.poll_interval)
        deadline = time.monotonic() + self.poll_interval
        while not stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            # in slices, so that `stop` ends a long poll interval promptly
            if watch.wait(min(remaining, STOP_CHECK_S)):
                # At once after a quiet interval; within a burst, one pass per poll interval.
                stop.wait(max(SETTLE_S, self._last_woken + self.poll_interval - time.monotonic()))
                self._last_woken = time.monotonic()
                break
        return stop.is_set()

    def scan(self) -> bool:
        """Re-reads changed, new and deleted files; publishes one version if any object changed."""
        current = self._list_files()
        changed = False
        for path in sorted(set(self._signatures) - set(current)):
            log.info("file %s deleted", path)
            del self._signatures[path]
            self._good.pop(path, None)
            self._invalid.pop(path, None)
            self.errors.pop(path, None)
            changed = True
        for path, signature in sorted(current.items()):
            if self._signatures.get(path) == signature:
                continue
            self._signatures[path] = signature
            self._read(path)
            changed = True
        self._hub.metrics.invalid_objects.set(len(self.invalid_objects))
        if not changed and self._started:
            return False
        return self._publish()

    def _list_files(self) -> dict[Path, _Signature]:
        files: dict[Path, _Signature] = {}
        try:
            entries = list(self.folder.rglob("*"))
        except OSError as exc:
            self._report(self.folder, f"cannot list {self.folder}: {exc}")
            return dict(self._signatures)  # keep everything as it was
        for path in entries:
            # Editors' swap and backup files, and kubectl's hidden caches, are not policy.
            if any(part.startswith(".") for part in path.relative_to(self.folder).parts):
                continue
            if path.suffix not in SUFFIXES:
                continue
            try:
                st = path.stat()
            except FileNotFoundError:
                continue  # deleted between listing and stat: the next pass sees it gone
            if stat.S_ISREG(st.st_mode):
                files[path] = _Signature(st.st_ino, st.st_size, st.st_mtime_ns)
        return files

    def _read(self, path: Path) -> None:
        result = load_file(path)
        if result.unreadable:
            # A half-written or broken file: none of it replaces what the file held before, so an
            # editor's intermediate save never drops policy that is in force.
            self._report(path, "; ".join(str(error) for error in result.unreadable))
            return
        self.errors.pop(path, None)
        self._good[path] = {object_key(obj): obj for obj in result.objects}
        messages = [str(error) for error in result.errors]
        for message in messages:
            if message not in self._invalid.get(path, []):
                log.warning("skipping an invalid object in %s: %s", path, message)
        self._invalid[path] = messages
        log.info("read %s: %d object(s), %d invalid", path, len(result.objects), len(messages))

    def _report(self, path: Path, message: str) -> None:
        kept = len(self._good.get(path, {}))
        log.error("%s (keeping its last %d good object(s))", message, kept)
        self.errors[path] = message
        self.last_error = message
        self._hub.metrics.source_errors_total.inc()

    def _publish(self) -> bool:
        merged: dict[ObjectKey, KubeObject] = {}
        owner: dict[ObjectKey, Path] = {}
        for path in sorted(self._good):
            for key, obj in self._good[path].items():
                if key in owner:
                    log.warning(
                        "%s %s/%s is defined in both %s and %s; using %s",
                        key[0],
                        key[1],
                        key[2],
                        owner[key],
                        path,
                        path,
                    )
                merged[key] = obj
                owner[key] = path
        upserts = [obj for key, obj in merged.items() if self._merged.get(key) != obj]
        deletes = [key for key in self._merged if key not in merged]
        first = not self._started
        self._started = True
        if not first and not upserts and not deletes:
            return False
        with self._hub.change() as resolver:
            if first:
                resolver.replace_all(list(merged.values()))
            else:
                for kind, namespace, name in deletes:
                    resolver.delete(kind, namespace, name)
                for obj in upserts:
                    resolver.upsert(obj)
        self._merged = merged
        log.info(
            "folder %s: %d object(s); %d changed, %d removed",
            self.folder,
            len(merged),
            len(upserts),
            len(deletes),
        )
        return True

    def objects(self) -> Iterable[KubeObject]:
        return list(self._merged.values())
