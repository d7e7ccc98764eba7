"""BpfDataplane: makes the pinned BPF maps match a NodeState, in dependency order.

One apply: compile (compiler.py, pure), check every map's capacity against old+new entries
before touching anything, execute the ordered plan (plan.py, pure: add policies and peers, flip
endpoints, remove old; maps.py writes each op), then with established_on_change="reset" forget
the conntrack entries of endpoints whose policy changed and of peers whose identity or CIDR
class changed.

established_on_change: "keep" (default) lets flows the conntrack map already admitted continue
whatever the new policy says. "reset" deletes those flows' entries (every protocol) after the
flips, so their next packet is judged as new: dropped if now denied, re-admitted if still allowed;
TCP must then restart with a SYN (the program is built with -DPF_TCP_NEEDS_SYN=1), so every TCP
connection of an affected endpoint or peer ends. The iptables dataplane's modes behave the same.
Every intermediate state answers each packet as the old or the new state would, so no
allow-all or deny-all window opens. Ids and their content survive restarts in a small JSON state
file and its journal beside the pins (state_file.py).

The egress verdict runs from netfilter links or an xt_bpf rule (egress_hook.py); counters,
drop reasons and map usage are read by telemetry.py, flow records by flow_records.py.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import threading
from dataclasses import dataclass, field
from typing import Any

from agent.dataplane import bridge_netfilter
from agent.dataplane.base import (
    DataplaneError,
    EndpointCounters,
    PermanentDataplaneError,
    TemporaryDataplaneError,
)
from agent.dataplane.bpf import attach, ctbound, flow_records, loader, maps, state_file, telemetry, verify
from agent.dataplane.bpf.compiler import CidrPrefix, Desired
from agent.dataplane.bpf.egress_hook import EgressHook
from agent.dataplane.bpf.entry_memo import Memos
from agent.dataplane.bpf.fitting import fit_and_plan
from agent.dataplane.bpf.maps import Live
from agent.dataplane.bpf.plan import PUT, Op, peer_view
from agent.dataplane.bpf.settings import BpfSettings
from agent.dataplane.bpf.structs import address_from_bytes, network_from_prefix, network_prefix
from agent.dataplane.bpf.telemetry import DenyEvent
from agent.dataplane.bpf.transition import with_union
from agent.dataplane.fit import Rejection, report_rejections
from agent.dataplane.flow_reset import FlowReset
from agent.dataplane.flows import FlowRecord, FlowVerdict
from agent.dataplane.types import IPAddress, IPNetwork, NodeState

log = logging.getLogger(__name__)


@dataclass
class _Changes:
    """What an apply changed, for established_on_change="reset"."""

    endpoint_keys: set[str] = field(default_factory=set)
    peer_addresses: set[bytes] = field(default_factory=set)
    prefixes: set[CidrPrefix] = field(default_factory=set)

    def __bool__(self) -> bool:
        return bool(self.endpoint_keys or self.peer_addresses or self.prefixes)


class BpfDataplane:
    name = "bpf"

    def __init__(self, settings: BpfSettings | None = None) -> None:
        settings = settings or BpfSettings()
        self.settings = settings
        self.pin_dir = settings.pin_dir
        self.established_on_change = settings.established_on_change
        self.netns = settings.netns  # where the pod interfaces live (None: the agent's namespace)
        self.hook = EgressHook(settings.egress_hook, self.pin_dir, settings.netns)
        self.knobs = settings.knobs()
        self.state_file = settings.state_path
        self._state = state_file.StateFile(self.state_file)
        self._module: Any = None
        self._programs: dict[str, Any] = {}
        self._live = Live()
        self._flows = flow_records.FlowEvents(flow_records.FlowNamer(), settings.flow_deny_interval)
        # policy entries of the last apply, so that a patched allow list costs its change
        self._memos = Memos()
        # apply() runs on the reconcile thread while metrics and flow logs read from others
        self._lock = threading.Lock()
        self._bridge_netfilter_enabled = False
        self._capacity: dict[str, int] = {}  # real max_entries of the pinned maps (a pin keeps its size)
        # True once start() found state of a previous run in the pinned maps (read by the node layer)
        self.adopted = False
        # policies the last apply left out because they do not fit (read by the node layer)
        self.rejected_policies: dict[str, Rejection] = {}

    @property
    def egress_hook_in_use(self) -> str:
        """The egress hook installed by start(): "netfilter" or "iptables" ("" before)."""
        return self.hook.in_use

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Compile, adopt pinned maps, swap the programs in place; enforcement never stops."""
        retired = loader.retire_stale_flow_state(self.pin_dir)
        self._module = loader.compile_module(self.knobs)
        self._capacity, warnings = loader.verify_pinned_layouts(self._module)
        for warning in retired + warnings:
            log.warning("%s", warning)
        self._programs = loader.load_programs(self._module)
        try:
            self._adopt()
        except Exception as error:  # a pinned map of another layout, unreadable maps
            message = f"cannot adopt the pinned maps in {self.pin_dir}: {error}"
            raise PermanentDataplaneError(message) from error
        self._flows.namer.update(NodeState(version=0), self._endpoint_keys())
        self.hook.install(self._module, self._programs)
        with attach.netlink(self.netns) as sock:
            for ifindex in sorted(self._live.interfaces):
                with contextlib.suppress(TemporaryDataplaneError):  # vanished: swept on apply
                    self._attach(sock, ifindex)
        maps.move_exact_policy_entries(self._module)
        maps.move_host_prefixes(self._module)
        try:
            self._flows.open(self._module)
        except Exception as error:
            raise PermanentDataplaneError(f"cannot open the flow-event ring buffer: {error}") from error

    def close(self) -> None:
        """Drop user-space handles. Pinned maps, pinned program and attached filters stay."""
        if self._module is not None:
            with contextlib.suppress(Exception):
                self._module.cleanup()
        self._module = None
        self._programs = {}
        self.hook.close()

    def teardown(self) -> None:
        """Remove every filter, rule, pin and file podfence created (started or not: also our tc
        filters on interfaces no record names, e.g. after the state file was lost)."""
        interfaces = set(self._live.interfaces) | set(self._live.endpoints)
        interfaces |= set(state_file.read(self.state_file).get("interfaces", []))
        with attach.netlink(self.netns) as sock:
            for link in sock.get_links():
                if link["index"] not in interfaces and attach.has_our_filters(sock, link["index"]):
                    interfaces.add(link["index"])
            for ifindex in interfaces:
                attach.detach_tc(sock, ifindex)
        self.hook.remove()
        self.close()
        shutil.rmtree(self.pin_dir, ignore_errors=True)
        state_file.remove(self.state_file)
        self._live = Live()

    # ---- apply -------------------------------------------------------------------------------

    def apply(self, state: NodeState) -> None:
        if self._module is None:
            raise PermanentDataplaneError("BpfDataplane.apply() before start()")
        with self._lock:
            rejected, changes = self._apply_locked(state)
            if rejected:
                # Capacity is checked at the maps' fullest, old and new entries side by side: a
                # policy left out for want of that transient room may fit from the state just
                # written (a policy that grew under a fresh id needed its old and new entries).
                rejected, more = self._apply_locked(state)
                changes.endpoint_keys |= more.endpoint_keys
                changes.peer_addresses |= more.peer_addresses
                changes.prefixes |= more.prefixes
            self.rejected_policies = report_rejections(self.rejected_policies, rejected)
            self.hook.repair()  # self-heal (iptables reloads and reordering, unpinned links)
        if changes and self.established_on_change == "reset":
            self._reset_conntrack(changes)

    def _apply_locked(self, state: NodeState) -> tuple[dict[str, Rejection], _Changes]:
        old_allocation = self._live.allocation
        try:
            desired, ops, union, rejected = fit_and_plan(
                self._live, state, old_allocation, self._rooms(), self._memos
            )
        except ValueError as error:
            raise PermanentDataplaneError(f"cannot compile node state: {error}") from error
        allocation = with_union(desired.allocation, union)
        # O(peers): only "reset" needs it (10,000 peers: ~30 ms of every apply)
        changes = self._semantic_changes(desired) if self.established_on_change == "reset" else _Changes()
        # write-ahead: every id the maps may hold once any op ran is on record before the first
        # one runs (a crash mid-write then never leaves a live id unknown to the next start)
        ahead = state_file.merge_allocations(old_allocation, allocation)
        self._state.save(ahead, self._live.interfaces | desired.interfaces)
        try:
            self._write(ops)
        except Exception as error:
            # Half written: ids of both allocations may be live in the maps now. Remember
            # both, so the retry never hands a live id to different content.
            self._live.allocation = state_file.merge_allocations(old_allocation, allocation)
            self._save_state_file()
            if isinstance(error, DataplaneError):
                raise
            # BCC map errors are bare Exceptions / KeyErrors
            raise TemporaryDataplaneError(f"writing BPF maps failed: {error}") from error
        finally:
            self._flows.namer.update(state, self._endpoint_keys())
        self._live.allocation = allocation
        self._save_state_file()
        return rejected, changes

    def repair_hooks(self) -> list[str]:
        """Put the egress hook back where it must be if something moved or removed it (the xt_bpf
        rule first in FORWARD and INPUT running the current program; every netfilter link pinned);
        returns what was repaired."""
        if self._module is None or not self.hook.in_use:
            return []
        with self._lock:
            return self.hook.repair()

    def repair_state(self) -> list[verify.Drift]:
        """Put back the clsact qdiscs, tc filters and bpffs pins someone removed (verify.py; the
        egress hook is repair_hooks'); returns what was found."""
        if self._module is None:
            return []
        with self._lock:
            pins = verify.pins_of(self._module, self.pin_dir) | self.hook.program_pins(self._programs)
            with attach.netlink(self.netns) as sock:
                drift = verify.repair_tc(sock, self._live.interfaces, self._programs)
            return drift + verify.repair_pins(pins)

    def _rooms(self) -> dict[str, int]:
        """Entries each map holds: the size asked for, or the pinned map's own if smaller."""
        knobs = self.knobs
        requested = {
            "pf_policy": knobs.policy_max,
            "pf_policy_exact": knobs.policy_max,
            "pf_ipcache": knobs.ipcache_max,
            "pf_cidr": knobs.cidr_max,
            "pf_cidr_host": knobs.cidr_max,
            "pf_endpoints": knobs.endpoints_max,
            "pf_endpoint_ips": knobs.endpoints_max * 4,
            "pf_node_ips": knobs.node_ips_max,
            "pf_counters": knobs.endpoints_max * 2,
        }
        return {name: min(size, self._capacity.get(name, size)) for name, size in requested.items()}

    def _semantic_changes(self, desired: Desired) -> _Changes:
        """What the update changes for verdicts (not which entries move between generations)."""
        live, changes = self._live, _Changes()
        generations = {entry.generation for entry in live.endpoints.values()}
        old_ipcache, old_cidr = peer_view(live, generations.pop()) if len(generations) == 1 else ({}, {})
        changes.peer_addresses = {
            a
            for a in old_ipcache.keys() | desired.ipcache.keys()
            if old_ipcache.get(a) != desired.ipcache.get(a)
        }
        changes.prefixes = {
            p for p in old_cidr.keys() | desired.cidr.keys() if old_cidr.get(p) != desired.cidr.get(p)
        }
        for ifindex, previous in live.endpoints.items():
            entry = desired.endpoints.get(ifindex)
            if entry is None or (previous.ingress_policy_id, previous.egress_policy_id) != (
                entry.ingress_policy_id,
                entry.egress_policy_id,
            ):
                changes.endpoint_keys.add(previous.endpoint_key)
        return changes

    def _write(self, ops: list[Op]) -> None:
        """Execute the plan (plan.py) op by op; `self._live` follows each op that succeeded."""
        new_interfaces = [op.key for op in ops if op.table == "tc" and op.action == PUT]
        # bridged pods reach FORWARD (the egress judge) only through br_netfilter
        if not self._bridge_netfilter_enabled and any(_is_bridge_port(self.netns, i) for i in new_interfaces):
            bridge_netfilter.enable(self.netns)
            self._bridge_netfilter_enabled = True
        with attach.netlink(self.netns) as sock:
            for op in ops:
                self._execute(op, sock)

    def _execute(self, op: Op, sock: Any) -> None:
        if op.table != "tc":
            maps.write(self._module, self._live, op)
        elif op.action == PUT:
            try:
                self._attach(sock, op.key)
            except attach.InterfaceVanished:
                # nothing left to guard; the node layer drops it from the next snapshot
                log.info("pod interface %d vanished before it could be guarded", op.key)
                return
            self._live.interfaces.add(op.key)
        else:
            attach.detach_tc(sock, op.key)
            self._live.interfaces.discard(op.key)

    def _attach(self, sock: Any, ifindex: int) -> None:
        attach.attach_tc(
            sock,
            ifindex,
            self._programs[loader.PROGRAM_FROM_POD].fd,
            self._programs[loader.PROGRAM_TO_POD].fd,
        )

    def release_conntrack(self) -> int:
        """Credits each endpoint with the conntrack entries it no longer holds, so that one at
        its bound (flows_per_pod) may open flows again (ctbound.py); deletes expired entries.
        Returns how many."""
        if self._module is None or not self.knobs.ct_endpoint_max:
            return 0
        return ctbound.release(self._module, lambda: self._lock, self.knobs.ct_endpoint_max)

    def _reset_conntrack(self, changes: _Changes) -> None:
        """Forget flows whose verdict may differ now (flow_reset.py): endpoints with new policy
        ids, peers whose identity class changed, addresses under a changed CIDR prefix. Their
        next packet is judged afresh against the new policy."""
        live = self._live
        endpoint_ips: dict[str, list[IPAddress]] = {}
        for raw, ifindex in live.endpoint_ips.items():
            if ifindex in live.endpoints:
                key = live.endpoints[ifindex].endpoint_key
                endpoint_ips.setdefault(key, []).append(address_from_bytes(raw))
        moved: list[IPAddress | IPNetwork] = [address_from_bytes(raw) for raw in changes.peer_addresses]
        moved += [network_from_prefix(plen, raw) for plen, raw in changes.prefixes]
        reset = FlowReset.of(changes.endpoint_keys, endpoint_ips, moved)
        hosts, prefixes = set(), []
        for plen, raw in map(network_prefix, reset.networks):
            if plen == 128:
                hosts.add(raw)
            else:
                prefixes.append((plen, int.from_bytes(raw, "big") >> (128 - plen)))

        def under_changed_prefix(raw: bytes) -> bool:
            value = int.from_bytes(raw, "big")
            return any(value >> (128 - length) == network for length, network in prefixes)

        ct = self._module[b"pf_ct"]
        for key in list(ct):
            for side in (bytes(key.addr_a.bytes), bytes(key.addr_b.bytes)):
                if side in hosts or (prefixes and under_changed_prefix(side)):
                    maps.delete(ct, key)
                    break

    # ---- adoption and the state file ---------------------------------------------------------------

    def _adopt(self) -> None:
        """Read what a previous run left in the pinned maps so the next apply is a diff."""
        live, saved = maps.read_live(self._module, self._state.load())
        live.interfaces = set(saved.get("interfaces", [])) | set(live.endpoints)
        live.allocation = state_file.allocation_from_json(saved) if saved else None
        if live.allocation is None and (live.policy or live.ipcache or live.cidr or live.endpoints):
            live.allocation = maps.unknown_meaning_allocation(live)
        self._live = live
        self.adopted = bool(live.endpoints or live.endpoint_ips or live.policy or live.interfaces)

    def _endpoint_keys(self) -> dict[int, str]:
        return {e.endpoint_id: e.endpoint_key for e in self._live.endpoints.values()}

    def _save_state_file(self) -> None:
        self._state.save(self._live.allocation, self._live.interfaces)

    # ---- observability (telemetry.py) ------------------------------------------------------------

    def counters(self) -> list[EndpointCounters]:
        if self._module is None:
            return []
        with self._lock:
            entries = sorted(self._live.endpoints.values(), key=lambda e: e.endpoint_key)
        return telemetry.endpoint_counters(self._module, entries)

    def audit_denied(self) -> dict[tuple[str, str], int]:
        if self._module is None:
            return {}
        with self._lock:
            entries = sorted(self._live.endpoints.values(), key=lambda e: e.endpoint_key)
        counts = telemetry.audit_denied(self._module, entries)
        # egress audit verdicts are the agent's, counted as their records are named (flow_records)
        for key, count in self._flows.namer.egress_audit_denied().items():
            counts[(key, "egress")] = counts.get((key, "egress"), 0) + count
        return counts

    def drop_reason_counts(self) -> dict[str, int]:
        if self._module is None:
            return {}
        return telemetry.drop_reason_counts(self._module)

    def events_lost(self) -> int:
        if self._module is None:
            return 0
        return telemetry.events_lost(self._module)

    def map_usage(self) -> dict[str, tuple[int, int]]:
        if self._module is None:
            return {}
        with self._lock:
            usage = telemetry.written_map_usage(self._live, self.knobs)
        # conntrack is written by the datapath only: count what the kernel holds
        usage["ct"] = (telemetry.count_entries(self._module[b"pf_ct"]), self.knobs.ct_max)
        return usage

    def poll_flows(self, timeout_ms: int = 0) -> list[FlowRecord]:
        """Flow records (agent.dataplane.flows.FlowRecordSource): from one thread at a time."""
        if self._module is None:
            return []
        return self._flows.poll(self._module, timeout_ms)

    def flows_lost(self) -> int:
        return self.events_lost()

    def poll_events(self, timeout_ms: int = 0) -> list[DenyEvent]:
        """The denied flow records as DenyEvents (DenyEventSource); takes the allowed records
        away from poll_flows: a node uses one or the other."""
        return [
            telemetry.deny_event(r) for r in self.poll_flows(timeout_ms) if r.verdict != FlowVerdict.ALLOWED
        ]


# ---- helpers -----------------------------------------------------------------------------------


def _is_bridge_port(netns: str | None, ifindex: int) -> bool:
    try:
        with attach.netlink(netns) as sock:
            links = sock.get_links(ifindex)
    except Exception:
        return False
    return (
        bool(links)
        and links[0].get_attr("IFLA_MASTER") is not None
        and any(
            (info := link.get_attr("IFLA_LINKINFO")) is not None
            and info.get_attr("IFLA_INFO_SLAVE_KIND") == "bridge"
            for link in links
        )
    )
