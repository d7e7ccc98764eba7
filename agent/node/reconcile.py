"""The reconcile loop: desired policy (from the control service) + discovered interfaces -> dataplane.

Two things change what the kernel must enforce: a new policy version (the SyncClient calls
`Reconciler.apply`, which returns only once the kernel enforces that version, so the version is
acked, or raises so it is nacked) and the host's interfaces (the NetlinkMonitor calls
`interfaces_changed`; `run` then re-resolves every pod IP and re-applies, no ack involved).

Both paths go through one lock and one function: look at the namespace, fill in each endpoint's
ifindex, the pod interfaces and the node IPs, and hand the complete NodeState to the dataplane
unless it equals what the kernel already has.

A full scan of a 100-pod node costs tens of milliseconds of netlink dumps, most of a policy
edit's latency. With `reuse_views` (set when a NetlinkMonitor feeds `interfaces_changed`) a new
policy version reuses the last scan while no notification has arrived since it was taken: the
kernel tells us whenever that view stops being true. Interface changes and the periodic resync
always scan afresh, so a notification still in flight is covered by the background loop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Protocol

from agent.dataplane.base import Dataplane, DataplaneError, TemporaryDataplaneError
from agent.dataplane.fit import Rejection
from agent.dataplane.types import Endpoint, IPAddress, NodeState
from agent.node.histogram import LatencyHistogram
from agent.node.interfaces import DiscoveryError, HostView, Link
from agent.node.monitor import EVERYTHING, NEIGHBOUR

log = logging.getLogger(__name__)

class Discovery(Protocol):
    """What the loop needs from interface discovery (InterfaceDiscovery, or a test double)."""

    def scan(self) -> HostView: ...

    def scan_links(self) -> dict[int, Link]: ...

    def resolve(self, ip: IPAddress, view: HostView) -> int | None: ...

    def mac_of(self, ifindex: int, view: HostView) -> str | None: ...


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff for TemporaryDataplaneError. A policy version is retried for at most `budget_s`
    before it is nacked; the background loop keeps retrying the latest version after that."""

    initial_s: float = 0.05
    max_s: float = 2.0
    budget_s: float = 10.0


@dataclass(frozen=True)
class ReconcileStatus:
    applied_version: int | None  # last policy version the kernel enforces
    last_error: str | None  # None once a later attempt succeeded
    apply_errors_total: int
    managed_endpoints: int
    resolved_endpoints: int  # endpoints whose interface was found
    pod_interfaces: int
    adopted: bool  # the dataplane adopted kernel state left by a previous run
    # policies the dataplane left out because the node cannot hold them (agent/dataplane/fit.py):
    # "namespace/name" -> the map or set they did not fit, and the message
    rejected_policies: tuple[tuple[str, str, str], ...] = ()


class Reconciler:
    def __init__(
        self,
        dataplane: Dataplane,
        discovery: Discovery,
        *,
        retry: RetryPolicy = RetryPolicy(),
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        reuse_views: bool = False,
    ) -> None:
        self._dataplane = dataplane
        self._discovery = discovery
        self._retry = retry
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()  # serialises discovery and dataplane programming
        self._desired: NodeState | None = None
        self._programmed: NodeState | None = None
        self._programmed_wiring: dict[int, tuple[str, int | None]] = {}
        self._last_view: HostView | None = None
        self._refused_version: int | None = None  # the dataplane refused it for good (permanent error)
        self._applied_version: int | None = None
        self._last_error: str | None = None
        self._errors_total = 0
        self._adopted = False
        self._changed = threading.Event()
        self._pending_lock = threading.Lock()
        self._pending_kinds: set[str] = set()
        self._changed_at = 0.0
        self._reuse_views = reuse_views
        # A version whose programming failed (nacked, or about to be). If the background loop
        # programs it later, `_on_recovered` is told so the version is acked after all.
        self._failed_version: int | None = None
        self._on_recovered: Callable[[int], None] | None = None
        # What notifications said changed since _last_view was taken, and whether any came at all:
        # the monitor's first call follows its subscription, before which nothing vouches for a
        # view (both under _pending_lock).
        self._stale_kinds: set[str] = set()
        self._notified = False
        self.programming_seconds = LatencyHistogram()
        self.interface_seconds = LatencyHistogram()

    # -- inputs --------------------------------------------------------------------------------

    def apply(self, state: NodeState) -> None:
        """SyncClient callback: returns once the kernel enforces `state`; raises to nack."""
        started = self._clock()
        with self._lock:
            self._desired = state
        delay = self._retry.initial_s
        fresh_view = False
        while True:
            try:
                with self._lock:
                    self._program_locked(state, fresh_view=fresh_view)
                break
            except (TemporaryDataplaneError, DiscoveryError) as exc:
                self._record_error(exc)
                if self._clock() + delay - started > self._retry.budget_s:
                    # The background loop keeps trying the stored desired state.
                    self.interfaces_changed()
                    raise
                log.warning("programming version %d failed, retrying in %.2fs: %s", state.version, delay, exc)
                self._sleep(delay)
                delay = min(delay * 2, self._retry.max_s)
                fresh_view = True  # what failed may be an interface that is gone by now
            except Exception as exc:
                self._record_error(exc)
                # A DataplaneError explains itself; anything else is a bug worth its traceback.
                log.error(
                    "programming version %d failed permanently: %s",
                    state.version,
                    exc,
                    exc_info=not isinstance(exc, DataplaneError),
                )
                raise
        self.programming_seconds.observe(self._clock() - started)

    def interfaces_changed(self, kinds: Iterable[str] = EVERYTHING) -> None:
        """NetlinkMonitor callback: look at the interfaces again soon."""
        with self._pending_lock:
            self._pending_kinds |= set(kinds)
            self._stale_kinds |= set(kinds)
            self._notified = True
            if not self._changed.is_set():
                self._changed_at = self._clock()
            self._changed.set()

    def wake(self) -> None:
        """Wake `run` at once, so that a stop just set is seen now, not after the resync interval
        (which would hold up the agent's exit on SIGTERM)."""
        self._changed.set()

    def on_recovered(self, callback: Callable[[int], None]) -> None:
        """Call `callback(version)` when the background loop programs a version that had failed
        (SyncClient.applied_late: it was nacked, now it is acked)."""
        self._on_recovered = callback

    def mark_adopted(self) -> None:
        """The dataplane found and kept kernel state from a previous run (readiness)."""
        self._adopted = True

    # -- the background loop -------------------------------------------------------------------

    def run(self, stop: threading.Event, resync_interval_s: float = 30.0, debounce_s: float = 0.002) -> None:
        """Re-applies the latest desired state on interface changes (and every resync interval,
        which covers notifications the kernel dropped). Blocks until `stop` is set."""
        delay = self._retry.initial_s
        while not stop.is_set():
            triggered = self._changed.wait(timeout=resync_interval_s)
            if stop.is_set():
                return
            if triggered and debounce_s > 0:
                stop.wait(debounce_s)  # let a burst of notifications (veth pair + addresses) settle
            with self._pending_lock:
                changed_at, kinds = self._changed_at, self._pending_kinds
                self._pending_kinds = set()
                self._changed.clear()
            if triggered and kinds <= {NEIGHBOUR} and (self._all_located() or self._refused_desired()):
                # Neighbour and FDB churn (ARP refreshes, ageing) cannot improve on locations
                # that are all known, and locations stick; on a busy node this is most events.
                # Nor can it make a state the dataplane refused (a full map) acceptable.
                continue
            try:
                self.reconcile_once(changed_at if triggered else None)
            except (TemporaryDataplaneError, DiscoveryError) as exc:
                log.warning("re-applying after an interface change failed, retrying in %.2fs: %s", delay, exc)
                stop.wait(delay)
                delay = min(delay * 2, self._retry.max_s)
                self.interfaces_changed()
                continue
            except Exception as exc:
                # Retrying the same state cannot help; the next change (or resync) tries again.
                log.error(
                    "re-applying after an interface change failed: %s",
                    exc,
                    exc_info=not isinstance(exc, DataplaneError),
                )
                continue
            delay = self._retry.initial_s

    def reconcile_once(self, changed_at: float | None = None) -> bool:
        """Re-apply the latest desired state if discovery changed it; True if the kernel was updated.

        Two passes: new pod interfaces are guarded first from a bare link dump (their traffic is
        dropped as unknown from then on), then a full scan locates endpoints, which costs a route
        lookup per pod IP. `changed_at` (a netlink notification's time) feeds
        podfence_interface_programming_seconds with the first pass that changed the kernel.
        """
        with self._lock:
            if self._desired is None:
                return False
            version, failed = self._desired.version, self._failed_version
            try:
                guarded = self._guard_new_interfaces_locked()
                if guarded and changed_at is not None:
                    self.interface_seconds.observe(self._clock() - changed_at)
                changed = self._program_locked(self._desired, fresh_view=True)
            except Exception as exc:
                self._record_error(exc)
                raise
        if changed and not guarded and changed_at is not None:
            self.interface_seconds.observe(self._clock() - changed_at)
        if failed == version and self._on_recovered is not None:
            log.info(
                "version %d is programmed after all (it had failed)", version, extra={"version": version}
            )
            self._on_recovered(version)
        return guarded or changed

    def _refused_desired(self) -> bool:
        desired = self._desired
        return desired is not None and self._refused_version == desired.version

    def _all_located(self) -> bool:
        programmed = self._programmed
        return (
            programmed is not None
            and self._desired is not None
            and programmed.version == self._desired.version
            and all(ep.ifindex is not None for ep in programmed.endpoints.values())
        )

    def _guard_new_interfaces_locked(self) -> bool:
        programmed, view = self._programmed, self._last_view
        if programmed is None or view is None:
            return False
        links = self._discovery.scan_links()
        fresh = {
            index
            for index, link in links.items()
            if link.peer_netnsid is not None
            and index not in view.uplinks
            and index not in programmed.pod_interfaces
        }
        if not fresh:
            return False
        guarded = replace(programmed, pod_interfaces=programmed.pod_interfaces | fresh)
        self._dataplane.apply(guarded)
        self._programmed = guarded
        self._programmed_wiring |= {index: (links[index].name, links[index].master) for index in fresh}
        return True

    # -- the one place that programs the kernel ------------------------------------------------

    def _program_locked(self, desired: NodeState, *, fresh_view: bool) -> bool:
        view = self._host_view_locked(fresh_view)
        complete = self._complete(desired, view)
        # Dataplanes derive more than the ifindex from a pod interface (its name, the bridge it
        # is a port of: iptables matches bridged traffic with physdev), so a veth that joins a
        # bridge after it appeared must be programmed again even though NodeState is unchanged.
        wiring = {
            index: (link.name, link.master)
            for index in complete.pod_interfaces
            if (link := view.links.get(index)) is not None
        }
        if complete == self._programmed and wiring == self._programmed_wiring:
            self._succeeded_locked(desired.version)
            return False
        self._dataplane.apply(complete)
        self._programmed_wiring = wiring
        if self._programmed is None or self._programmed.pod_interfaces != complete.pod_interfaces:
            log.info(
                "guarding %d pod interfaces, %d of %d endpoints located",
                len(complete.pod_interfaces),
                sum(1 for ep in complete.endpoints.values() if ep.ifindex is not None),
                len(complete.endpoints),
                extra={"version": desired.version},
            )
        self._programmed = complete
        self._succeeded_locked(desired.version)
        return True

    def _succeeded_locked(self, version: int) -> None:
        # The kernel enforces `version` now: an earlier failure is no longer the node's state.
        self._applied_version = version
        self._last_error = None
        self._refused_version = None
        self._failed_version = None

    def _host_view_locked(self, fresh: bool) -> HostView:
        """The last scan while notifications say it still holds (see the module docstring), else a new one."""
        with self._pending_lock:
            view, stale = self._last_view, set(self._stale_kinds)
            if view is not None and not view.bridged:
                stale.discard(NEIGHBOUR)  # a routed node's view holds no neighbour or FDB entry
            reuse = self._reuse_views and self._notified and not fresh and view is not None and not stale
            if not reuse:
                # Cleared before scanning: a notification during the scan makes this view stale.
                self._stale_kinds = set()
        if reuse and view is not None:
            # Addresses inside pods raise no notification here; `resolve` reads them again lazily.
            return replace(view, peer_addresses={})
        try:
            view = self._discovery.scan()
        except BaseException:
            with self._pending_lock:
                self._stale_kinds |= EVERYTHING
            raise
        self._last_view = view
        return view

    def _complete(self, desired: NodeState, view: HostView) -> NodeState:
        located: dict[str, int | None] = {
            key: self._locate(ep, view) for key, ep in desired.endpoints.items()
        }
        claims: dict[int, list[str]] = {}
        for key, ifindex in located.items():
            if ifindex is not None:
                claims.setdefault(ifindex, []).append(key)
        for ifindex, keys in claims.items():
            if len(keys) > 1:
                # A stale IP of a deleted pod can point at a new pod's interface. Enforcing either
                # policy there could be wrong; leaving it unknown keeps it fail-closed.
                log.warning("interface %d claimed by several endpoints %s; leaving it unknown", ifindex, keys)
                for key in keys:
                    located[key] = None
        # Sticky locations: a quiet bridged pod's neighbour and FDB entries age out (300 s by
        # default), and dropping its policy then would turn it into an unknown endpoint. Keep
        # the interface found before while it still exists and no fresh lookup claims it.
        previous = self._programmed.endpoints if self._programmed is not None else {}
        claimed = {ifindex for ifindex in located.values() if ifindex is not None} | set(claims)
        for key, ifindex in located.items():
            before = previous[key].ifindex if key in previous else None
            if (
                ifindex is None
                and before is not None
                and before in view.pod_interfaces
                and before not in claimed
                and previous[key].ips == desired.endpoints[key].ips
            ):
                located[key] = before
                claimed.add(before)
        macs = self._bind_macs(located, view)
        endpoints = {
            key: ep
            if (ep.ifindex, ep.mac) == (located[key], macs.get(key))
            else replace(ep, ifindex=located[key], mac=macs.get(key))
            for key, ep in desired.endpoints.items()
        }
        return replace(
            desired, endpoints=endpoints, pod_interfaces=view.pod_interfaces, node_ips=view.node_ips
        )

    def _bind_macs(self, located: dict[str, int | None], view: HostView) -> dict[str, str]:
        """The MAC each located endpoint is bound to (the dataplanes drop frames from any other);
        `located` loses the endpoints that cannot be bound.

        A MAC is read from the pod's end of the veth when the endpoint is first located on an
        interface and kept while it stays there: a pod that changes its MAC later only cuts
        itself off. On a bridge a MAC is one port's: a pod claiming a MAC another endpoint on
        the same bridge is bound to (to have the bridge send that pod's traffic to it) is left
        unknown, its traffic dropped. Without a binding from this run (the agent restarted),
        the port the bridge's forwarding database has the MAC on keeps it: the previous run's
        filters let only the rightful pod teach it. Routed veths are links of their own, where
        a MAC names nothing beyond the link."""
        previous = self._programmed.endpoints if self._programmed is not None else {}
        macs: dict[str, str] = {}
        kept: set[str] = set()
        for key, ifindex in located.items():
            if ifindex is None:
                continue
            before = previous.get(key)
            if before is not None and before.ifindex == ifindex and before.mac is not None:
                macs[key] = before.mac
                kept.add(key)
            elif (mac := self._discovery.mac_of(ifindex, view)) is not None:
                macs[key] = mac
        claims: dict[tuple[int, str], list[str]] = {}
        for key, mac in macs.items():
            link = view.links.get(located[key] or 0)
            if link is not None and link.master is not None:
                claims.setdefault((link.master, mac), []).append(key)
        for (bridge, mac), keys in claims.items():
            if len(keys) < 2:
                continue
            holders = [k for k in keys if k in kept] or [
                k for k in keys if view.fdb.get((bridge, mac)) == located[k]
            ]
            rightful = holders[0] if len(holders) == 1 else None
            for key in keys:
                if key != rightful:
                    log.warning(
                        "MAC %s of %s is bound to %s on the same bridge; leaving %s unknown",
                        mac,
                        key,
                        rightful or "another endpoint",
                        key,
                    )
                    located[key] = None
                    del macs[key]
        return macs

    def _locate(self, endpoint: Endpoint, view: HostView) -> int | None:
        for ip in endpoint.ips:
            ifindex = self._discovery.resolve(ip, view)
            if ifindex is not None:
                return ifindex
        return None

    def _record_error(self, exc: BaseException) -> None:
        if self._desired is not None:
            self._failed_version = self._desired.version
        if not isinstance(exc, TemporaryDataplaneError | DiscoveryError) and self._desired is not None:
            self._refused_version = self._desired.version
        self._errors_total += 1
        self._last_error = f"{type(exc).__name__}: {exc}"

    # -- for metrics, readiness and logs -------------------------------------------------------

    def status(self) -> ReconcileStatus:
        programmed = self._programmed
        endpoints = programmed.endpoints.values() if programmed is not None else ()
        return ReconcileStatus(
            applied_version=self._applied_version,
            last_error=self._last_error,
            apply_errors_total=self._errors_total,
            managed_endpoints=len(endpoints),
            resolved_endpoints=sum(1 for ep in endpoints if ep.ifindex is not None),
            pod_interfaces=len(programmed.pod_interfaces) if programmed is not None else 0,
            adopted=self._adopted,
            rejected_policies=tuple(
                (policy, rejection.table, rejection.message) for policy, rejection in self._rejections()
            ),
        )

    def rejected_policy_messages(self) -> list[str]:
        """What the ack of an applied version reports: one "namespace/name: why" per rejection."""
        return [rejection.message for _policy, rejection in self._rejections()]

    def _rejections(self) -> list[tuple[str, Rejection]]:
        # Only dataplanes with fixed capacities reject policies; others have no such attribute.
        found: Mapping[str, Rejection] = getattr(self._dataplane, "rejected_policies", {})
        return sorted(found.items())

    def ready(self) -> bool:
        return self._applied_version is not None or self._adopted

    def endpoint_for_ifindex(self, ifindex: int) -> str | None:
        """The endpoint key ("namespace/name") enforced on `ifindex`, for flow logs."""
        programmed = self._programmed
        if programmed is None:
            return None
        for key, ep in programmed.endpoints.items():
            if ep.ifindex == ifindex:
                return key
        return None
