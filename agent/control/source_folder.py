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
before, and its error is logged, counted and kept in `errors`/`last_error`. The objects of all
files are merged and diffed against the previous merge, so an object that moves from one file to
another is one update, not a delete then an add.

An invalid object never opens anything. Objects are tracked by (kind, namespace, name), across
files: when the definition that wins for a key (the last file in path order that defines it) is
invalid, the form in force so far stays in force (an edit that breaks a default-deny keeps the
default-deny), and the error is reported (log, `podfence status`, metrics) until the object is
fixed or removed. A key invalid at its first appearance has no valid form: another file's valid
definition is used if there is one, else the object is rejected. A key defined by no file any
more is deleted, valid or not; a file renamed (or an object moved to another file) in one step
keeps its objects in force, invalid ones included.
"""

from __future__ import annotations

import hashlib
import logging
import stat
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from agent.control.folder_watch import FolderWatch
from agent.control.hub import PolicyHub, SourceProblem
from agent.model.errors import ModelError
from agent.model.load import ParseMemo, load_file
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


def _error_key(error: ModelError) -> ObjectKey | None:
    """The key of the object an error is about; None when it names no object."""
    if not error.kind or not error.name:
        return None
    return (error.kind, error.namespace or "", error.name)


def _object_name(error: ModelError) -> str | None:
    return f"{error.kind} {error.object_ref}" if error.kind else None


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
        self._invalid: dict[Path, list[ModelError]] = {}
        # Per file, the keys of the objects it defines but that failed validation.
        self._rejected: dict[Path, dict[ObjectKey, ModelError]] = {}
        self.held: dict[ObjectKey, str] = {}  # invalid now, last valid form in force: why invalid
        self.errors: dict[Path, str] = {}  # files that do not parse, with why
        self.last_error: str | None = None
        self._merged: dict[ObjectKey, KubeObject] = {}
        # per file, its last read's parsed documents: an edit re-parses what it changed only
        self._memos: dict[Path, ParseMemo] = {}
        self._started = False
        self._last_woken = float("-inf")  # when a file-system event last led to a pass (monotonic)
        self._newest_ns = 0  # the newest modification seen in the folder (the source generation)

    @property
    def invalid_objects(self) -> list[str]:
        return [str(error) for errors in self._invalid.values() for error in errors]

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
            self._memos.pop(path, None)
            self._good.pop(path, None)
            self._invalid.pop(path, None)
            self._rejected.pop(path, None)
            self.errors.pop(path, None)
            changed = True
        for path, signature in sorted(current.items()):
            if self._signatures.get(path) == signature:
                continue
            self._signatures[path] = signature
            self._read(path)
            changed = True
        if not changed and self._started:
            self._hub.set_source_problems(self.problems())  # a folder that cannot be listed, say
            return False
        published = self._publish()
        self._hub.set_source_problems(self.problems())
        return published

    def _source_mark(self) -> tuple[int, str]:
        """(generation, digest) of the files read: the newest change to the folder (a deletion
        changes its directory), the same on replicas that share the folder's files."""
        digest = hashlib.sha256()
        for path, signature in sorted(self._signatures.items()):
            line = f"{path.relative_to(self.folder)}\0{signature.size}\0{signature.mtime_ns}\n"
            digest.update(line.encode())
        return self._newest_ns, "files:" + digest.hexdigest()[:16]

    def _list_files(self) -> dict[Path, _Signature]:
        files: dict[Path, _Signature] = {}
        try:
            self._newest_ns = max(self._newest_ns, self.folder.stat().st_mtime_ns)
            entries = list(self.folder.rglob("*"))
        except OSError as exc:
            self._report(self.folder, f"cannot list {self.folder}: {exc}")
            return dict(self._signatures)  # keep everything as it was
        for path in entries:
            # Editors' swap and backup files, and kubectl's hidden caches, are not policy.
            if any(part.startswith(".") for part in path.relative_to(self.folder).parts):
                continue
            directory = path.suffix not in SUFFIXES
            try:
                if directory and not path.is_dir():
                    continue
                st = path.stat()
            except OSError:
                continue  # deleted between listing and stat: the next pass sees it gone
            if directory:  # a deletion shows only in its directory's mtime
                self._newest_ns = max(self._newest_ns, st.st_mtime_ns)
            elif stat.S_ISREG(st.st_mode):
                files[path] = _Signature(st.st_ino, st.st_size, st.st_mtime_ns)
                self._newest_ns = max(self._newest_ns, st.st_mtime_ns)
        return files

    def _read(self, path: Path) -> None:
        result = load_file(path, self._memos.setdefault(path, ParseMemo()))
        if result.unreadable:
            # A half-written or broken file: none of it replaces what the file held before, so an
            # editor's intermediate save never drops policy that is in force.
            self._report(path, "; ".join(str(error) for error in result.unreadable))
            return
        self.errors.pop(path, None)
        self._good[path] = {object_key(obj): obj for obj in result.objects}
        for error in result.errors:
            if error not in self._invalid.get(path, []):
                log.warning("invalid object in %s: %s", path, error)
        self._invalid[path] = list(result.errors)
        self._rejected[path] = {
            key: error for error in result.errors if (key := _error_key(error)) is not None
        }
        log.info("read %s: %d object(s), %d invalid", path, len(result.objects), len(result.errors))

    def _report(self, path: Path, message: str) -> None:
        kept = len(self._good.get(path, {}))
        log.error("%s (keeping its last %d good object(s))", message, kept)
        self.errors[path] = message
        self.last_error = message
        self._hub.metrics.source_errors_total.inc()

    def _publish(self) -> bool:
        merged, held = self._resolve()
        for key in held.keys() - self.held.keys():
            log.warning("%s %s/%s is invalid; its last valid form stays in force: %s", key[0], key[1],
                        key[2], held[key])
        for key in self.held.keys() - held.keys():
            log.info("%s %s/%s: no longer held at its last valid form", *key)
        self.held = held
        upserts = [obj for key, obj in merged.items() if self._merged.get(key) != obj]
        deletes = [key for key in self._merged if key not in merged]
        first = not self._started
        self._started = True
        if not first and not upserts and not deletes:
            return False
        with self._hub.change() as resolver:
            self._hub.note_source(*self._source_mark())
            if first:
                resolver.replace_all(list(merged.values()))
            else:
                for kind, namespace, name in deletes:
                    resolver.delete(kind, namespace, name)
                for obj in upserts:
                    resolver.upsert(obj)
        self._merged = merged
        log.info("folder %s: %d object(s); %d changed, %d removed", self.folder, len(merged),
                 len(upserts), len(deletes))
        return True

    def _resolve(self) -> tuple[dict[ObjectKey, KubeObject], dict[ObjectKey, str]]:
        """The objects in force, and the keys held at their last valid form (with the error).

        For each key the last file in path order that defines it wins, valid or not. A winning
        definition that is invalid keeps what is in force now; with nothing in force, the last
        valid definition in another file, else nothing (rejected)."""
        winner: dict[ObjectKey, Path] = {}
        valid: dict[ObjectKey, KubeObject] = {}  # the last valid definition in path order
        for path in sorted(set(self._good) | set(self._rejected)):
            for key, obj in self._good.get(path, {}).items():
                if key in winner and winner[key] != path:
                    log.warning("%s %s/%s is defined in both %s and %s; using %s", key[0], key[1], key[2],
                                winner[key], path, path)
                winner[key] = path
                valid[key] = obj
            for key in self._rejected.get(path, {}):
                winner[key] = path
        merged: dict[ObjectKey, KubeObject] = {}
        held: dict[ObjectKey, str] = {}
        for key, path in winner.items():
            chosen = self._good.get(path, {}).get(key)
            if chosen is not None:
                merged[key] = chosen
                continue
            error = str(self._rejected[path][key])
            if key in self._merged:
                merged[key] = self._merged[key]
                held[key] = error
            elif key in valid:
                merged[key] = valid[key]
        return merged, held

    def problems(self) -> list[SourceProblem]:
        """Every invalid object and unreadable file, for `podfence status`."""
        found = [
            SourceProblem(None, str(path), message, last_valid_in_force=path in self._good)
            for path, message in self.errors.items()
        ]
        for path, errors in self._invalid.items():
            for error in errors:
                key = _error_key(error)
                in_force = key is not None and key in self._merged
                found.append(
                    SourceProblem(_object_name(error), str(path), str(error), last_valid_in_force=in_force)
                )
        return found

    def objects(self) -> Iterable[KubeObject]:
        return list(self._merged.values())
