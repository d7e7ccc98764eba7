"""The lab's footprint on this machine, and removing it: the prefix every name it makes carries,
where it records what it made (RUN_DIR), the one-lab-per-machine lock, and teardown(), which
removes all of it, also from a fresh process after a crash (it finds leftovers by the prefix,
by the route protocol and by the netns of running processes).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import socket
import time
from pathlib import Path

from pyroute2 import netns
from pyroute2.netlink.exceptions import NetlinkError

from agent.lab import wiring
from agent.lab.prober import forget_namespaces

LAB_PREFIX = "pflab-"
RUN_DIR = Path("/run/podfence-lab")
BPF_FS = Path("/sys/fs/bpf")
LOCK_PATH = Path("/run/podfence-lab.lock")  # outside RUN_DIR, which teardown empties
DEFAULT_LOCK_WAIT_S = 10.0

# Routes the lab adds to the root netns carry this protocol number, so teardown finds exactly them.
LAB_ROUTE_PROTO = 0x9F


class LabError(RuntimeError):
    """The lab could not be built or torn down; the message says which step failed."""


def child_environment() -> dict[str, str]:
    """Environment for lab child processes, so they import this checkout's `agent` package."""
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


# --- teardown -------------------------------------------------------------------------------


def stop_pid_file(pid_file: Path, grace_seconds: float = 3.0) -> None:
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        pid_file.unlink(missing_ok=True)
        return
    # The pid file may outlive its process; only signal a process that still runs our code.
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        cmdline = b""
    if b"agent." in cmdline or b"podfence" in cmdline:
        with contextlib.suppress(ProcessLookupError):
            if os.getpgid(pid) == pid:
                os.killpg(pid, signal.SIGTERM)  # a session leader we started: its helpers go too
            else:
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_seconds
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            time.sleep(0.05)
        if Path(f"/proc/{pid}").exists():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    pid_file.unlink(missing_ok=True)


# --- one lab per machine ----------------------------------------------------------------------
#
# The lab's names are fixed (pflab-node1, ...), so two processes building labs at once would tear
# down each other's. A process holds this flock from build() until its teardown(); others wait
# for it. The kernel drops the lock when the holder dies, so a crash never leaves it held.

_held_lock: int | None = None


def _lock_holder() -> str:
    with contextlib.suppress(OSError, ValueError):
        return f"pid {int(LOCK_PATH.read_text().strip())}"
    return "another process"


def acquire_lab_lock(wait_seconds: float = DEFAULT_LOCK_WAIT_S) -> None:
    """Hold the machine-wide lab lock (idempotent within a process); LabError if busy too long."""
    global _held_lock
    if _held_lock is not None:
        return
    fd = os.open(LOCK_PATH, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                holder = _lock_holder()
                os.close(fd)
                raise LabError(
                    f"the lab is in use by {holder} (a test run or demo?); try again later"
                ) from None
            time.sleep(0.2)
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    _held_lock = fd


def lab_lock_held() -> bool:
    """Whether this process holds the lab lock."""
    return _held_lock is not None


def release_lab_lock() -> None:
    global _held_lock
    if _held_lock is not None:
        os.close(_held_lock)  # closing the only fd of the open file drops the flock
        _held_lock = None


def _lab_netns_inodes() -> set[int]:
    inodes = set()
    for name in netns.listnetns():
        if name.startswith(LAB_PREFIX):
            with contextlib.suppress(OSError):
                inodes.add(os.stat(wiring.path(name)).st_ino)
    return inodes


def stop_processes_in_lab_namespaces(grace_seconds: float = 3.0) -> list[int]:
    """SIGTERM (then SIGKILL) every process living in a lab netns, pid file or not.

    Catches what pid files miss after a crash: agents started by hand inside a node, servers whose
    pid file was deleted. Only the main thread's netns is visible in /proc/<pid>/ns/net, so a
    process that merely has a thread in a lab netns (like the prober's caller) is left alone.
    """
    inodes = _lab_netns_inodes()
    if not inodes:
        return []
    victims = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            link = os.readlink(proc / "ns" / "net")  # "net:[<inode>]"
        except OSError:
            continue
        if int(link[5:-1]) in inodes:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(proc.name), signal.SIGTERM)
                victims.append(int(proc.name))
    deadline = time.monotonic() + grace_seconds
    while victims and time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in victims):
        for pid in victims:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
        time.sleep(0.05)
    for pid in victims:
        with contextlib.suppress(OSError):  # gone already: nothing to do
            if int(os.readlink(f"/proc/{pid}/ns/net")[5:-1]) in inodes:
                os.kill(pid, signal.SIGKILL)
    return victims


def teardown(lock_wait_seconds: float = DEFAULT_LOCK_WAIT_S) -> list[str]:
    """Remove everything any lab made on this machine; returns what was removed. Idempotent.

    Waits up to `lock_wait_seconds` for a process that is using the lab right now to finish.
    """
    acquire_lab_lock(lock_wait_seconds)
    try:
        return _remove_everything()
    finally:
        release_lab_lock()


def _remove_everything() -> list[str]:
    forget_namespaces()  # this process's cached fds would keep deleted namespaces alive
    removed: list[str] = []
    if RUN_DIR.exists():
        for pid_file in sorted(RUN_DIR.glob("*.pid")):
            stop_pid_file(pid_file)
            removed.append(f"process {pid_file.stem}")
    removed += [f"stray process {pid}" for pid in stop_processes_in_lab_namespaces()]
    removed += [f"netns {name}" for name in wiring.remove_prefixed(LAB_PREFIX)]
    with wiring.ipr() as root:
        for link in root.get_links():
            ifname = link.get_attr("IFLA_IFNAME")
            if ifname and ifname.startswith(LAB_PREFIX):
                with contextlib.suppress(NetlinkError):
                    root.link("del", index=link["index"])
                    removed.append(f"root link {ifname}")
        for family in (socket.AF_INET, socket.AF_INET6):
            for route in root.get_routes(family=family, table=254):
                if route["proto"] == LAB_ROUTE_PROTO:
                    dst = f"{route.get_attr('RTA_DST')}/{route['dst_len']}"
                    with contextlib.suppress(NetlinkError):
                        root.route(
                            "del",
                            family=family,
                            dst=dst,
                            type=route["type"],
                            priority=route.get_attr("RTA_PRIORITY"),
                        )
                        removed.append(f"root route {dst}")
    for pin_dir in BPF_FS.glob(LAB_PREFIX + "*"):
        shutil.rmtree(pin_dir, ignore_errors=True)
        removed.append(f"pins {pin_dir}")
    if RUN_DIR.exists():
        for leftover in RUN_DIR.glob("*"):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
    return removed


def leftovers() -> list[str]:
    """What of a lab still exists (empty after a clean teardown); tests assert on this."""
    found = [f"netns {n}" for n in netns.listnetns() if n.startswith(LAB_PREFIX)]
    with wiring.ipr() as root:
        found += [
            f"root link {link.get_attr('IFLA_IFNAME')}"
            for link in root.get_links()
            if (link.get_attr("IFLA_IFNAME") or "").startswith(LAB_PREFIX)
        ]
        found += [
            f"root route {r.get_attr('RTA_DST')}/{r['dst_len']}"
            for family in (socket.AF_INET, socket.AF_INET6)
            for r in root.get_routes(family=family, table=254)
            if r["proto"] == LAB_ROUTE_PROTO
        ]
    found += [f"pins {p}" for p in BPF_FS.glob(LAB_PREFIX + "*")]
    if RUN_DIR.exists():
        found += [f"pid file {p.name}" for p in RUN_DIR.glob("*.pid")]
    return found
