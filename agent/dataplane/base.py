"""The Dataplane protocol and its error hierarchy, shared by the bpf and iptables implementations."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from agent.dataplane.types import NodeState


class DataplaneError(Exception):
    """A kernel programming failure. The cause (netlink, BCC, libiptc) is chained, never leaked."""


class TemporaryDataplaneError(DataplaneError):
    """Worth retrying: a busy lock, an interface that vanished under us."""


class PermanentDataplaneError(DataplaneError):
    """Retrying the same state cannot help: a full map, a program the kernel rejects."""


class CapacityError(PermanentDataplaneError):
    """A map (or ipset) is full. Nothing of the new state was half-applied."""


@dataclass(frozen=True)
class EndpointCounters:
    key: str
    direction: str  # "ingress" | "egress"
    allowed_packets: int
    allowed_bytes: int
    denied_packets: int
    denied_bytes: int


class Dataplane(Protocol):
    name: str

    def start(self) -> None:
        """Load/adopt kernel state left by a previous run; enforcement continues meanwhile."""

    def apply(self, state: NodeState) -> None:
        """Make the kernel enforce `state`, atomically per endpoint; raise DataplaneError."""

    def counters(self) -> list[EndpointCounters]:
        """Per-endpoint, per-direction counters, read live from the kernel."""

    def close(self) -> None:
        """Release user-space resources; kernel enforcement stays in place."""

    def teardown(self) -> None:
        """Remove everything this dataplane created (uninstall, tests)."""
