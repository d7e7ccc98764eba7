"""Hooking the programs into the kernel: tc clsact filters (pyroute2) and the iptables rules that
run the pinned netfilter program (xt_bpf) in FORWARD and INPUT.

Only what podfence created is ever removed: our tc filters are recognised by their fixed
priority/handle, our iptables rules live in our own chain (plus one jump per base chain,
tagged with a comment).
"""

from __future__ import annotations

import errno
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pyroute2 import IPRoute, NetlinkError, NetNS

from agent.dataplane import xtables
from agent.dataplane.base import PermanentDataplaneError, TemporaryDataplaneError

TC_PRIORITY = 0xC0DE & 0x7FFF  # fixed: identifies podfence's filters among others on clsact
TC_HANDLE = 1
TC_PARENT_INGRESS = "ffff:fff2"  # clsact ingress: packets FROM the pod (host side of its veth)
TC_PARENT_EGRESS = "ffff:fff3"  # clsact egress: packets TO the pod

IPTABLES_CHAIN = "PODFENCE-EGRESS"
IPTABLES_COMMENT = "podfence: pod egress judged after DNAT"
IPTABLES_BASE_CHAINS = ("FORWARD", "INPUT")
IPTABLES_COMMANDS = (xtables.IPTABLES[4], xtables.IPTABLES[6])


class InterfaceVanished(TemporaryDataplaneError):
    """The interface disappeared (pod deleted) between discovery and attach."""


@contextmanager
def netlink(netns: str | None) -> Iterator[Any]:
    """A netlink socket in `netns` (None: the agent's own namespace)."""
    try:
        sock: Any = NetNS(netns) if netns else IPRoute()
    except OSError as error:
        raise TemporaryDataplaneError(f"cannot open netlink in netns {netns!r}: {error}") from error
    try:
        yield sock
    finally:
        sock.close()


def attach_tc(sock: Any, ifindex: int, from_pod_fd: int, to_pod_fd: int) -> None:
    """Create clsact if missing and (re)place our two filters; idempotent and atomic per hook."""
    try:
        sock.tc("add", "clsact", ifindex)
    except NetlinkError as error:
        if error.code == errno.ENODEV:
            raise InterfaceVanished(f"interface {ifindex} vanished") from error
        if error.code != errno.EEXIST:
            raise TemporaryDataplaneError(f"clsact on interface {ifindex}: {error}") from error
    for parent, fd, name in (
        (TC_PARENT_INGRESS, from_pod_fd, "podfence_from_pod"),
        (TC_PARENT_EGRESS, to_pod_fd, "podfence_to_pod"),
    ):
        try:
            sock.tc(
                "replace-filter", "bpf", ifindex, TC_HANDLE, fd=fd, name=name, parent=parent,
                classid=1, direct_action=True, prio=TC_PRIORITY,
            )
        except NetlinkError as error:
            if error.code == errno.ENODEV:
                raise InterfaceVanished(f"interface {ifindex} vanished") from error
            raise PermanentDataplaneError(f"tc filter on interface {ifindex}: {error}") from error


def detach_tc(sock: Any, ifindex: int) -> None:
    """Remove our two filters (not clsact: other tools may share it). Missing is fine."""
    for parent in (TC_PARENT_INGRESS, TC_PARENT_EGRESS):
        try:
            sock.tc("del-filter", "bpf", ifindex, TC_HANDLE, parent=parent, prio=TC_PRIORITY)
        except NetlinkError as error:
            if error.code not in (errno.ENODEV, errno.ENOENT, errno.EINVAL):
                raise TemporaryDataplaneError(f"removing tc filter on {ifindex}: {error}") from error


def has_our_filters(sock: Any, ifindex: int) -> bool:
    try:
        filters = sock.get_filters(ifindex, parent=0xFFFFFFF2)
    except NetlinkError:
        return False
    return any(f.get_attr("TCA_KIND") == "bpf" and (f["info"] >> 16) == TC_PRIORITY for f in filters)


class Iptables:
    """podfence's own chain running the pinned egress program, for IPv4 and IPv6."""

    def __init__(self, netns: str | None) -> None:
        self._prefix = ["nsenter", f"--net=/var/run/netns/{netns}"] if netns else []
        self._stale_checked = False  # an older release's nft-backend hook looked for and removed

    def _run(self, command: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = [*self._prefix, command, "-w", *args]
        try:
            result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as error:
            raise TemporaryDataplaneError(f"{command} failed to run: {error}") from error
        if check and result.returncode != 0:
            raise TemporaryDataplaneError(f"{' '.join(argv)}: {result.stderr.strip()}")
        return result

    def install(self, pinned_program: str) -> list[str]:
        """Make our chain run `pinned_program` and be the FIRST rule of FORWARD and INPUT.

        Idempotent and cheap when nothing changed (one `-S` listing per family), so it runs on
        every apply and from the agent's periodic hook check: a firewall reload or a tool
        inserting above us is repaired. Returns what had to be fixed ([] when all was in place).
        A changed program is swapped with an atomic rule replace; a misplaced jump is moved to
        the top in one iptables-restore transaction (delete ours + insert at 1), so there is no
        moment without it. Other software's rules are never touched.
        """
        rule = ["-m", "bpf", "--object-pinned", pinned_program, "-m", "comment", "--comment",
                IPTABLES_COMMENT, "-j", "DROP"]  # fmt: skip
        jump = f'-m comment --comment "{IPTABLES_COMMENT}" -j {IPTABLES_CHAIN}'
        fixed: list[str] = []
        for command in IPTABLES_COMMANDS:
            lines = self._run(command, "-S").stdout.splitlines()
            if f"-N {IPTABLES_CHAIN}" not in lines:
                self._run(command, "-N", IPTABLES_CHAIN)
            ours = [line for line in lines if line.startswith(f"-A {IPTABLES_CHAIN} ")]
            if not ours:
                self._run(command, "-A", IPTABLES_CHAIN, *rule)
                fixed.append(f"{command} {IPTABLES_CHAIN} rule")
            elif pinned_program not in ours[0] or len(ours) > 1:
                self._run(command, "-R", IPTABLES_CHAIN, "1", *rule)
                for _ in ours[1:]:
                    self._run(command, "-D", IPTABLES_CHAIN, "2")
                fixed.append(f"{command} {IPTABLES_CHAIN} rule")
            script = ["*filter"]
            for base in IPTABLES_BASE_CHAINS:
                rules = [line for line in lines if line.startswith(f"-A {base} ")]
                if rules and rules[0].endswith(f"-j {IPTABLES_CHAIN}"):
                    continue
                jumps = [line for line in rules if line.endswith(f"-j {IPTABLES_CHAIN}")]
                script += [f"-D {base} {jump}" for _ in jumps] + [f"-I {base} 1 {jump}"]
                fixed.append(f"{command} {base} jump")
            if len(script) > 1:
                self._restore(command, "\n".join([*script, "COMMIT", ""]))
        self.remove_stale_backend()  # only once ours is in place: no moment without a hook
        return fixed

    def _restore(self, command: str, script: str) -> None:
        argv = [*self._prefix, f"{command}-restore", "--noflush", "-w"]
        try:
            result = subprocess.run(argv, input=script, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as error:
            raise TemporaryDataplaneError(f"{command}-restore failed to run: {error}") from error
        if result.returncode != 0:
            # e.g. a jump deleted by someone else between the listing and this commit: nothing
            # was changed (one transaction); the next check sees the new state and retries
            raise TemporaryDataplaneError(f"{' '.join(argv)}: {result.stderr.strip()}")

    def available(self) -> bool:
        """Are the iptables tools installed (the netfilter-link hook does without them)?"""
        return all(shutil.which(command) for command in IPTABLES_COMMANDS)

    def remove(self) -> None:
        self._remove(IPTABLES_COMMANDS)
        self.remove_stale_backend()

    def remove_stale_backend(self) -> None:
        """Remove the hook an older release wrote with the nft backend's tools, if any."""
        if not self._stale_checked:
            self._stale_checked = True
            self._remove(tuple(c for c in xtables.STALE_BACKEND.values() if shutil.which(c)))

    def _remove(self, commands: tuple[str, ...]) -> None:
        jump = ["-m", "comment", "--comment", IPTABLES_COMMENT, "-j", IPTABLES_CHAIN]
        for command in commands:
            if f"-N {IPTABLES_CHAIN}" not in self._run(command, "-S", check=False).stdout.splitlines():
                continue  # no chain, so no jump to it either
            for base in IPTABLES_BASE_CHAINS:
                while self._run(command, "-D", base, *jump, check=False).returncode == 0:
                    pass
            self._run(command, "-F", IPTABLES_CHAIN, check=False)
            self._run(command, "-X", IPTABLES_CHAIN, check=False)
