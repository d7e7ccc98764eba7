"""What podfence's ipsets hold, without asking the kernel on every apply (issue 27), and the
`ipset restore` script that makes them hold what the compiler wants (sets_script).

`ipset save` of 10,000 identity members, and its parse, cost most of an apply that moves one
remote pod; so the dataplane keeps its own view of what it wrote (SetsView) and reads the kernel
only at start, after a failed write, and every `verify_interval_s` (which also repairs what
someone else changed: the next script is written against what the kernel really holds). A set
that changes by a few members is edited in place (`member_edits`), not refilled and swapped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from functools import partial

from agent.dataplane.base import PermanentDataplaneError
from agent.dataplane.iptables.kernel import KernelSet
from agent.dataplane.iptables.layout import SET_PREFIX, IpSetSpec, member_address

log = logging.getLogger(__name__)

DEFAULT_VERIFY_INTERVAL_S = 60.0


class SetsView:
    """podfence's ipsets as this process last wrote them; None-like (must read) when unknown."""

    def __init__(self, verify_interval_s: float = DEFAULT_VERIFY_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self.verify_interval_s = verify_interval_s
        self._clock = clock
        self._sets: dict[str, KernelSet] | None = None
        self._read_at = float("-inf")

    def needs_read(self) -> bool:
        return self._sets is None or self._clock() - self._read_at >= self.verify_interval_s

    def read(self, kernel_sets: dict[str, KernelSet]) -> dict[str, KernelSet]:
        """Take what the kernel holds as the view; say so if it is not what was written."""
        if self._sets is not None:
            found, written = _contents(kernel_sets), _contents(self._sets)
            names = found.keys() | written.keys()
            drifted = sorted(name for name in names if found.get(name) != written.get(name))
            if drifted:
                log.warning(
                    "ipsets differ from what podfence wrote; rewriting them: %s", ", ".join(drifted)
                )
        self._sets, self._read_at = dict(kernel_sets), self._clock()
        return kernel_sets

    def current(self) -> dict[str, KernelSet]:
        if self._sets is None:
            raise RuntimeError("SetsView.current() before any read")
        return dict(self._sets)

    def wrote(self, desired: Mapping[str, IpSetSpec], maxelem: int) -> None:
        """The sets are `desired` now (the restore succeeded and every other set of ours is gone)."""
        self._sets = {
            name: KernelSet(name, spec.kind, spec.family, maxelem, spec.members)
            for name, spec in desired.items()
        }

    def forget(self) -> None:
        """A write failed half way (or something else wrote): read the kernel next time."""
        self._sets = None


def _contents(sets: Mapping[str, KernelSet]) -> dict[str, tuple[str, int, frozenset[str]]]:
    # maxelem aside: a set adopted from a run with another setting is not a drift
    return {name: (s.kind, s.family, s.members) for name, s in sets.items()}


def member_edits(name: str, spec: IpSetSpec, current: KernelSet, maxelem: int,
                 text: Callable[[str], str]) -> list[str] | None:  # fmt: skip
    """`ipset restore` lines that turn `current` into `spec` member by member, or None when the
    set must be refilled and swapped instead.

    Added members go in before removed ones leave, so an address is in the set as before or as
    after, never out of both: each lookup answers as the old set or as the new one. Entries with
    a flag (`nomatch`: an except carved out of a net) are not edited in place (a net flipping
    between match and nomatch is one entry under two texts), nor is a change as large as the set
    or one whose union would not fit in maxelem.
    """
    added, removed = spec.members - current.members, current.members - spec.members
    changes = len(added) + len(removed)
    if (
        2 * changes > len(spec.members)
        or len(current.members) + len(added) > maxelem
        or any(" " in member for member in (*added, *removed))
    ):
        return None
    lines = [f"add {name} {text(member)}" for member in sorted(added)]
    lines += [f"del {name} {text(member)}" for member in sorted(removed)]
    return lines


def sets_script(desired: Mapping[str, IpSetSpec], sets_now: Mapping[str, KernelSet], maxelem: int) -> str:
    """The `ipset restore` script that turns `sets_now` into `desired` ("" when they agree): new
    sets created and filled, changed ones edited in place (member_edits) or filled as a copy
    and swapped in. Sets only in `sets_now` are left: chains may still match them."""
    lines: list[str] = []
    for name in sorted(desired):
        spec = desired[name]
        current = sets_now.get(name)
        if current is not None and current.members == spec.members:
            continue
        header = f"{spec.kind} family {spec.inet} maxelem {maxelem}"
        adds = sorted(_member_text(spec, m) for m in spec.members)
        if current is None:
            lines.append(f"create {name} {header}")
            lines += [f"add {name} {m}" for m in adds]
            continue
        if (current.kind, current.family) != (spec.kind, spec.family):
            raise PermanentDataplaneError(f"ipset {name} exists as {current.kind}/ipv{current.family}")
        edits = member_edits(name, spec, current, maxelem, partial(_member_text, spec))
        if edits is not None:
            lines += edits
            continue
        # Fill a copy, then swap it in: a lookup sees the old members or the new, never half.
        temporary = f"{SET_PREFIX}tmp-{name[len(SET_PREFIX) :]}"[:31]
        if temporary in sets_now:
            lines.append(f"destroy {temporary}")
        lines.append(f"create {temporary} {header}")
        lines += [f"add {temporary} {m}" for m in adds]
        lines += [f"swap {temporary} {name}", f"destroy {temporary}"]
    return "\n".join(lines) + "\n" if lines else ""


def moved_members(desired: Mapping[str, IpSetSpec], sets_now: Mapping[str, KernelSet]) -> set[str]:
    """Addresses (or networks) that join or leave a set kept under its name: a peer whose identity
    changed. The chains matching the set are unchanged, so only this says whose flows moved.
    New and removed sets need nothing here: the chains using them change, and with them the
    endpoint's chain name."""
    moved: set[str] = set()
    for name, spec in desired.items():
        current = sets_now.get(name)
        if current is not None:
            moved |= {member_address(member) for member in current.members ^ spec.members}
    return moved


def _member_text(spec: IpSetSpec, member: str) -> str:
    if spec.kind == "hash:ip":  # hash:ip takes plain addresses (a /len would mean a range)
        return member.split("/", 1)[0]
    return member
