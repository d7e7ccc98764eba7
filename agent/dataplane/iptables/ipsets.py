"""What podfence's ipsets hold, without asking the kernel on every apply (issue 27).

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

from agent.dataplane.iptables.kernel import KernelSet
from agent.dataplane.iptables.layout import IpSetSpec

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
