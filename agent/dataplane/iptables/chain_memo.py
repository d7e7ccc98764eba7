"""Endpoint chains remembered between compiles, so that an apply compiles what changed (issue 27).

compile_state is pure and compiles every endpoint direction of the node at every apply: with
10,000 single-rule policies and flow records on (a log chain per rule) that was ~0.3 s of the
agent's CPU for one policy edited. The chains, sets, log chains and names one endpoint direction
produces depend only on what it reads: the endpoint itself, the compiler's settings, the node's
addresses (ingress) and the members of the identities its allows name. ChainMemo compiles each
endpoint direction alone into a scratch DesiredState, remembers it with those inputs, and at the
next compile merges the remembered output when every input is equal, instead of compiling again.

The merge is what the whole compile would write: every name the chains and sets are given spells
their content (or their endpoint), so two endpoint directions writing one name write the same
thing, and the result equals a compile without memo (tests/unit/test_iptables_chain_memo.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from agent.dataplane.types import Endpoint, IPAddress

if TYPE_CHECKING:
    from agent.dataplane.iptables.layout import DesiredState

Identities = Mapping[int, tuple[IPAddress, ...]]


class _ReadIdentities(Mapping[int, tuple[IPAddress, ...]]):
    """The node's identity table, noting which identities a compile read and what it found."""

    def __init__(self, identities: Identities) -> None:
        self._identities = identities
        self.read: dict[int, tuple[IPAddress, ...] | None] = {}

    def __getitem__(self, identity: int) -> tuple[IPAddress, ...]:
        value = self._identities[identity]
        self.read[identity] = value
        return value

    def get(self, identity: int, default: object = None) -> object:  # type: ignore[override]
        value = self._identities.get(identity)
        self.read[identity] = value
        return default if value is None else value

    def __contains__(self, identity: object) -> bool:
        value = self._identities.get(identity)  # type: ignore[call-overload]
        self.read[identity] = value  # type: ignore[index]
        return value is not None

    def __iter__(self) -> Iterator[int]:
        raise TypeError("an endpoint's compile reads identities one by one")

    def __len__(self) -> int:
        raise TypeError("an endpoint's compile reads identities one by one")


@dataclass
class _Compiled:
    """One endpoint direction's output and the inputs it was compiled from."""

    endpoint: Endpoint
    settings: tuple[object, ...]
    node_ips: tuple[IPAddress, ...]
    identities: dict[int, tuple[IPAddress, ...] | None]
    name: str
    out: DesiredState

    def still_valid(
        self,
        endpoint: Endpoint,
        settings: tuple[object, ...],
        node_ips: tuple[IPAddress, ...],
        now: Identities,
    ) -> bool:
        return (
            (self.endpoint is endpoint or self.endpoint == endpoint)
            and self.settings == settings
            and self.node_ips == node_ips
            and all(now.get(i) == members for i, members in self.identities.items())
        )


def merge(into: DesiredState, out: DesiredState, family: int) -> None:
    """Write one endpoint direction's output into the node's."""
    into.sets.update(out.sets)
    into.chains[family].update(out.chains[family])
    for name, users in out.set_users.items():
        into.set_users.setdefault(name, set()).update(users)
    into.rule_names.update(out.rule_names)
    for owner, by_family in out.endpoint_chains.items():
        into.endpoint_chains.setdefault(owner, {}).update(by_family)


@dataclass
class ChainMemo:
    """The endpoint directions of the last compile (one NodeState's), by (key, direction, family)."""

    _last: dict[tuple[str, str, int], _Compiled] = field(default_factory=dict)
    _now: dict[tuple[str, str, int], _Compiled] = field(default_factory=dict)
    compiled: int = 0  # endpoint directions compiled (not taken from the memo) since begin()

    def begin(self) -> None:
        self._now = {}
        self.compiled = 0

    def end(self) -> None:
        """Only the last compile is remembered: endpoints gone from it are forgotten."""
        self._last, self._now = self._now, {}

    def endpoint_chain(
        self,
        endpoint: Endpoint,
        direction: str,
        family: int,
        settings: tuple[object, ...],
        node_ips: tuple[IPAddress, ...],
        identities: Identities,
        into: DesiredState,
        compile_alone: Callable[[_ReadIdentities], tuple[str, DesiredState]],
    ) -> str:
        """The endpoint direction's chain name, its output merged `into` the node's: remembered
        when its inputs are unchanged, else `compile_alone(identities)` into a scratch state."""
        key = (endpoint.key, direction, family)
        found = self._last.get(key) or self._now.get(key)
        if found is None or not found.still_valid(endpoint, settings, node_ips, identities):
            reads = _ReadIdentities(identities)
            name, out = compile_alone(reads)
            found = _Compiled(endpoint, settings, node_ips, reads.read, name, out)
            self.compiled += 1
        self._now[key] = found
        merge(into, found.out, family)
        return found.name
