"""The Dataplane protocol, its optional capabilities and its error hierarchy, shared by the bpf
and iptables implementations.

`Dataplane` is what every dataplane does. The capabilities below are what only some do (the bpf
dataplane has them all); the node layer asks `isinstance(dataplane, Capability)` before it uses
one, so a dataplane gains a metric, a flow log or a hook check by implementing the method.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

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


# ---- optional capabilities -----------------------------------------------------------------------


@runtime_checkable
class Adopting(Protocol):
    """Reports whether start() found kernel state from a previous run."""

    adopted: bool


@runtime_checkable
class HookRepairing(Protocol):
    def repair_hooks(self) -> list[str]:
        """Put podfence's hooks back first where they are not; returns what was repaired."""


@runtime_checkable
class EgressHookReporting(Protocol):
    @property
    def egress_hook_in_use(self) -> str:
        """Where the egress verdict runs ("netfilter", "iptables"; "" before start)."""


@runtime_checkable
class DropReasons(Protocol):
    def drop_reason_counts(self) -> Mapping[str, int]:
        """Packets dropped so far, per drop reason name (types.Reason, lower case)."""


@runtime_checkable
class MapUsage(Protocol):
    def map_usage(self) -> Mapping[str, tuple[int, int]]:
        """Per map (or ipset): (entries in use, capacity)."""


@runtime_checkable
class AuditCounting(Protocol):
    def audit_denied(self) -> Mapping[tuple[str, str], int]:
        """Per (endpoint key, "ingress"|"egress"): new flows the enforced policy of that
        direction admitted and its audit view (policies in audit enforced) would deny."""


@runtime_checkable
class EventsLost(Protocol):
    def events_lost(self) -> int:
        """Flow records (deny events) the dataplane could not deliver."""


class DenyEvent(Protocol):
    """What a dataplane reports for one denied packet (agent.dataplane.bpf.DenyEvent)."""

    @property
    def endpoint(self) -> str: ...  # "namespace/name"; "" for a pod interface no endpoint claims

    @property
    def direction(self) -> str: ...  # "ingress" (to the pod) | "egress" (from the pod)

    @property
    def protocol(self) -> int: ...

    @property
    def source(self) -> str: ...

    @property
    def destination(self) -> str: ...

    @property
    def source_port(self) -> int: ...

    @property
    def destination_port(self) -> int: ...

    @property
    def reason(self) -> str: ...  # drop reason name, as in podfence_drops_total{reason}


@runtime_checkable
class ConntrackReleasing(Protocol):
    def release_conntrack(self) -> int:
        """Credit each pod with the conntrack entries it no longer holds (its flows-per-pod
        bound); returns expired entries deleted."""


@runtime_checkable
class DenyEventSource(Protocol):
    def poll_events(self, timeout_ms: int) -> Iterable[DenyEvent]: ...
