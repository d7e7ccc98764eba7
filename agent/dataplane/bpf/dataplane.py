"""BpfDataplane: makes the pinned BPF maps match a NodeState, in dependency order.

One apply: compile (compiler.py, pure), check every map's capacity against old+new entries
before touching anything, execute the ordered plan (plan.py, pure: add policies and peers, flip
endpoints, remove old), then with established_on_change="reset" forget the conntrack entries of
endpoints whose policy changed and of peers whose identity or CIDR class changed.

established_on_change: "keep" (default) lets flows the conntrack map already admitted continue
whatever the new policy says. "reset" deletes those flows' entries (every protocol) after the
flips, so their next packet is judged as new: dropped if now denied, re-admitted if still allowed;
TCP must then restart with a SYN (the program is built with -DPF_TCP_NEEDS_SYN=1), so every TCP
connection of an affected endpoint or peer ends. The iptables dataplane's modes behave the same.
Every intermediate state answers each packet as the old or the new state would, so no
allow-all or deny-all window opens. Ids and their content survive restarts in a small JSON state
file beside the pins (in /run, the same lifetime as bpffs).

egress_hook: where the egress verdict (after DNAT) runs. "netfilter": netfilter links
(netfilter.py, kernel >= 6.4); "iptables": an xt_bpf rule first in FORWARD and INPUT; "auto"
(default): links where the kernel can, else the rule. Switching either way installs the new hook
before removing the old one.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import ipaddress
import json
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.dataplane.base import (
    CapacityError,
    DataplaneError,
    EndpointCounters,
    PermanentDataplaneError,
    TemporaryDataplaneError,
)
from agent.dataplane.bpf import attach, loader, netfilter, verify
from agent.dataplane.bpf.compiler import (
    Allocation,
    CidrPrefix,
    Desired,
    EndpointEntry,
    PolicyEntry,
)
from agent.dataplane.bpf.plan import (
    PUT,
    CidrKey,
    IpcacheKey,
    Op,
    compile_and_plan,
    is_exact,
    is_host,
    peak_sizes,
    peer_view,
)
from agent.dataplane.bpf.structs import (
    GENERATION_PREFIX,
    HOST_PREFIX,
    POLICY_PREFIX_FULL,
    REASON_MAX,
    DenyEventStruct,
    Direction,
    Reason,
    address_from_bytes,
    make_addr,
)
from agent.dataplane.bpf.transition import with_union
from agent.dataplane.types import CidrPeer, IdentityPeer, NodeState

log = logging.getLogger(__name__)

NF_PROGRAM_PIN = "nf_egress"
EGRESS_HOOKS = ("auto", "netfilter", "iptables")


@dataclass(frozen=True)
class DenyEvent:
    endpoint: str  # endpoint key, "" when the interface has no endpoint
    direction: str
    protocol: int
    source: str
    destination: str
    source_port: int
    destination_port: int
    reason: str


@dataclass
class _Live:
    """What this process believes the kernel holds (read back from the maps on start)."""

    endpoints: dict[int, EndpointEntry] = field(default_factory=dict)
    endpoint_ips: dict[bytes, int] = field(default_factory=dict)
    node_ips: set[bytes] = field(default_factory=set)
    ipcache: dict[IpcacheKey, int] = field(default_factory=dict)
    cidr: dict[CidrKey, int] = field(default_factory=dict)
    policy: set[PolicyEntry] = field(default_factory=set)
    interfaces: set[int] = field(default_factory=set)
    allocation: Allocation | None = None


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

    def __init__(
        self,
        pin_dir: str = "/sys/fs/bpf/podfence",
        unknown_endpoints: str = "drop",
        established_on_change: str = "keep",
        ct_max: int = 65536,
        policy_max: int = 65536,
        ipcache_max: int = 65536,
        cidr_max: int = 16384,
        endpoints_max: int = 1024,
        node_ips_max: int = 64,
        frag_max: int = 8192,
        event_rate: int = 100,
        netns: str | None = None,
        state_file: str | None = None,
        egress_hook: str = "auto",
        bench_defines: tuple[str, ...] = (),
    ) -> None:
        if egress_hook not in EGRESS_HOOKS:
            raise ValueError(f"egress_hook must be one of {', '.join(EGRESS_HOOKS)}")
        if unknown_endpoints not in ("drop", "allow"):
            raise ValueError("unknown_endpoints must be 'drop' or 'allow'")
        if established_on_change not in ("keep", "reset"):
            raise ValueError("established_on_change must be 'keep' or 'reset'")
        self.pin_dir = pin_dir.rstrip("/")
        self.established_on_change = established_on_change
        self.netns = netns  # where the pod interfaces live (None: the agent's namespace)
        self.knobs = loader.BuildKnobs(
            pin_dir=self.pin_dir,
            unknown_allow=unknown_endpoints == "allow",
            ct_max=ct_max,
            policy_max=policy_max,
            ipcache_max=ipcache_max,
            cidr_max=cidr_max,
            endpoints_max=endpoints_max,
            node_ips_max=node_ips_max,
            frag_max=frag_max,
            event_rate=event_rate,
            tcp_needs_syn=established_on_change == "reset",
            bench_defines=bench_defines,  # benchmark builds only (loader.BENCH_DEFINES)
        )
        self.state_file = Path(state_file or f"/run/podfence/{Path(self.pin_dir).name}.bpf-state.json")
        self._module: Any = None
        self._programs: dict[str, Any] = {}
        self._live = _Live()
        self._events: list[DenyEvent] = []
        self.egress_hook = egress_hook
        self.egress_hook_in_use = ""  # "netfilter" or "iptables" once started
        self._iptables = attach.Iptables(netns)
        self._links = netfilter.NetfilterLinks(self.pin_dir, netns)
        # apply() runs on the reconcile thread while metrics and flow logs read from others
        self._lock = threading.Lock()
        self._endpoint_names: dict[int, str] = {}  # endpoint_id -> key, replaced whole after apply
        self._bridge_netfilter_enabled = False
        self._nf_pin = ""  # bpffs path of the egress program the iptables rule runs
        self._capacity: dict[str, int] = {}  # real max_entries of the pinned maps (a pin keeps its size)
        # True once start() found state of a previous run in the pinned maps (read by the node layer)
        self.adopted = False

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
        self._endpoint_names = {e.endpoint_id: e.endpoint_key for e in self._live.endpoints.values()}
        self._install_egress_hook()
        with attach.netlink(self.netns) as sock:
            for ifindex in sorted(self._live.interfaces):
                with contextlib.suppress(TemporaryDataplaneError):  # vanished: swept on apply
                    self._attach(sock, ifindex)
        self._move_exact_policy_entries()
        self._move_host_prefixes()
        try:
            self._module[b"pf_events"].open_ring_buffer(self._on_event)
        except Exception as error:
            raise PermanentDataplaneError(f"cannot open the deny-event ring buffer: {error}") from error

    def _move_exact_policy_entries(self) -> None:
        """A version before pf_policy_exact kept single-port entries in the LPM trie: copy each
        into the hash, then delete it from the trie, so the writer finds every entry where it
        looks (a stale copy would keep allowing after its rule is gone). The allow is in one map
        or both at every moment; this runs once the programs, which read both, are in place."""
        trie, exact = self._module[b"pf_policy"], self._module[b"pf_policy_exact"]
        # the trie's own keys: a lookup there would answer with the longest match, maybe another
        stranded = [(key, trie[key]) for key in list(trie.keys()) if key.prefixlen == POLICY_PREFIX_FULL]
        for key, value in stranded:
            entry = (
                key.prefixlen,
                key.policy_id,
                key.peer_class,
                key.peer_kind,
                key.protocol,
                _ntohs(key.dport_be),
            )
            exact[_policy_key(exact, entry)] = exact.Leaf(value.rule_count, 0)
            _delete(trie, key)
        if stranded:
            log.info(
                "moved %d single-port policy entries from the LPM trie to pf_policy_exact", len(stranded)
            )

    def _move_host_prefixes(self) -> None:
        """A version before pf_cidr_host kept host prefixes in the LPM trie: copy each into the
        hash, then delete it from the trie (the programs, in place by now, read the hash first
        and find the same class in either), so the writer finds every entry where it looks."""
        trie, host = self._module[b"pf_cidr"], self._module[b"pf_cidr_host"]
        stranded = [(key, trie[key]) for key in list(trie.keys())
                    if key.prefixlen == GENERATION_PREFIX + HOST_PREFIX]  # fmt: skip
        for key, value in stranded:
            cidr_key = (key.generation, HOST_PREFIX, bytes(key.addr.bytes))
            host[_cidr_host_key(host, cidr_key)] = host.Leaf(value.class_id, 0)
            _delete(trie, key)
        if stranded:
            log.info("moved %d host prefixes from the CIDR LPM trie to pf_cidr_host", len(stranded))

    def close(self) -> None:
        """Drop user-space handles. Pinned maps, pinned program and attached filters stay."""
        if self._module is not None:
            with contextlib.suppress(Exception):
                self._module.cleanup()
        self._module = None
        self._programs = {}
        self._links.close()

    def teardown(self) -> None:
        """Remove every filter, rule, pin and file podfence created (started or not: also our tc
        filters on interfaces no record names, e.g. after the state file was lost)."""
        interfaces = set(self._live.interfaces) | set(self._live.endpoints)
        interfaces |= set(self._read_state_file().get("interfaces", []))
        with attach.netlink(self.netns) as sock:
            for link in sock.get_links():
                if link["index"] not in interfaces and attach.has_our_filters(sock, link["index"]):
                    interfaces.add(link["index"])
            for ifindex in interfaces:
                attach.detach_tc(sock, ifindex)
        self._links.remove()
        if self._iptables.available():
            self._iptables.remove()
        self.close()
        shutil.rmtree(self.pin_dir, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            self.state_file.unlink()
        self._live = _Live()

    # ---- apply -------------------------------------------------------------------------------

    def apply(self, state: NodeState) -> None:
        if self._module is None:
            raise PermanentDataplaneError("BpfDataplane.apply() before start()")
        old_allocation = self._live.allocation
        with self._lock:
            try:
                desired, ops, union = compile_and_plan(self._live, state, old_allocation)
            except ValueError as error:
                raise PermanentDataplaneError(f"cannot compile node state: {error}") from error
            allocation = with_union(desired.allocation, union)
            self._check_capacity(desired, ops)
            # O(peers): only "reset" needs it (10,000 peers: ~30 ms of every apply)
            changes = self._semantic_changes(desired) if self.established_on_change == "reset" else _Changes()
            try:
                self._write(ops)
            except Exception as error:
                # Half written: ids of both allocations may be live in the maps now. Remember
                # both, so the retry never hands a live id to different content.
                self._live.allocation = _merge_allocations(old_allocation, allocation)
                self._save_state_file()
                if isinstance(error, DataplaneError):
                    raise
                # BCC map errors are bare Exceptions / KeyErrors
                raise TemporaryDataplaneError(f"writing BPF maps failed: {error}") from error
            finally:
                self._endpoint_names = {e.endpoint_id: e.endpoint_key for e in self._live.endpoints.values()}
            self._live.allocation = allocation
            self._save_state_file()
            self._repair_egress_hook()  # self-heal (iptables reloads and reordering, unpinned links)
        if changes and self.established_on_change == "reset":
            self._reset_conntrack(changes)

    def repair_hooks(self) -> list[str]:
        """Put the egress hook back where it must be if something moved or removed it (the xt_bpf
        rule first in FORWARD and INPUT running the current program; every netfilter link pinned);
        returns what was repaired."""
        if self._module is None or not self.egress_hook_in_use:
            return []
        with self._lock:
            return self._repair_egress_hook()

    def repair_state(self) -> list[verify.Drift]:
        """Put back the clsact qdiscs, tc filters and bpffs pins someone removed (verify.py; the
        egress hook is repair_hooks'); returns what was found."""
        if self._module is None:
            return []
        with self._lock:
            pins = verify.pins_of(self._module, self.pin_dir)
            if self._nf_pin and self.egress_hook_in_use == "iptables":  # the path in the xt_bpf rule
                pins[self._nf_pin] = self._programs[loader.PROGRAM_NF_EGRESS].fd
            with attach.netlink(self.netns) as sock:
                drift = verify.repair_tc(sock, self._live.interfaces, self._programs)
            return drift + verify.repair_pins(pins)

    def _repair_egress_hook(self) -> list[str]:
        if self.egress_hook_in_use == "netfilter":
            return self._links.repair()
        return self._iptables.install(self._nf_pin)

    def _check_capacity(self, desired: Desired, ops: list[Op]) -> None:
        peaks = peak_sizes(self._live, ops)
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

        def capacity(name: str) -> int:
            return min(requested[name], self._capacity.get(name, requested[name]))

        checks = [(f"pf_{table}", size, capacity(f"pf_{table}")) for table, size in peaks.items()]
        slots = desired.allocation.endpoint_slots.values()
        if slots and (max(slots) + 1) * 2 > capacity("pf_counters"):
            checks.append(("pf_counters", (max(slots) + 1) * 2, capacity("pf_counters")))
        for name, needed, room in checks:
            if needed > room:
                raise CapacityError(
                    f"BPF map {name} would need {needed} entries during this update but holds {room}; "
                    "nothing was changed (raise the map size)"
                )

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
            attach.enable_bridge_netfilter(self.netns)
            self._bridge_netfilter_enabled = True
        with attach.netlink(self.netns) as sock:
            for op in ops:
                self._execute(op, sock)

    def _execute(self, op: Op, sock: Any) -> None:
        module, live = self._module, self._live
        put = op.action == PUT
        if op.table == "policy":
            table = module[b"pf_policy_exact" if is_exact(op.key) else b"pf_policy"]
            if put:
                table[_policy_key(table, op.key)] = table.Leaf(op.value, 0)
                live.policy.add(op.key)
            else:
                _delete(table, _policy_key(table, op.key))
                live.policy.discard(op.key)
        elif op.table == "ipcache":
            table = module[b"pf_ipcache"]
            key = table.Key()
            key.generation = op.key[0]
            ctypes.memmove(key.addr.bytes, op.key[1], 16)
            if put:
                table[key] = table.Leaf(op.value, 0)
                live.ipcache[op.key] = op.value
            else:
                _delete(table, key)
                live.ipcache.pop(op.key, None)
        elif op.table == "endpoint_ips":
            table = module[b"pf_endpoint_ips"]
            if put:
                table[make_addr(op.key)] = table.Leaf(op.value, 0)
                live.endpoint_ips[op.key] = op.value
            else:
                _delete(table, make_addr(op.key))
                live.endpoint_ips.pop(op.key, None)
        elif op.table == "cidr":
            if is_host(op.key):
                table = module[b"pf_cidr_host"]
                key = _cidr_host_key(table, op.key)
            else:
                table = module[b"pf_cidr"]
                key = _cidr_key(table, op.key)
            if put:
                table[key] = table.Leaf(op.value, 0)
                live.cidr[op.key] = op.value
            else:
                _delete(table, key)
                live.cidr.pop(op.key, None)
        elif op.table == "node_ips":
            table = module[b"pf_node_ips"]
            if put:
                table[make_addr(op.key)] = table.Leaf(1, 0)
                live.node_ips.add(op.key)
            else:
                _delete(table, make_addr(op.key))
                live.node_ips.discard(op.key)
        elif op.table == "counters":
            self._zero_counters(module[b"pf_counters"], op.key)
        elif op.table == "endpoints":
            table = module[b"pf_endpoints"]
            if put:
                entry: EndpointEntry = op.value
                leaf = table.Leaf(
                    entry.endpoint_id, entry.ingress_policy_id, entry.egress_policy_id, entry.generation
                )
                ctypes.memmove(leaf.mac, entry.mac, 6)
                table[table.Key(op.key)] = leaf
                live.endpoints[op.key] = entry
            else:
                _delete(table, table.Key(op.key))
                live.endpoints.pop(op.key, None)
        elif op.table == "tc":
            if put:
                try:
                    self._attach(sock, op.key)
                except attach.InterfaceVanished:
                    # nothing left to guard; the node layer drops it from the next snapshot
                    log.info("pod interface %d vanished before it could be guarded", op.key)
                    return
                live.interfaces.add(op.key)
            else:
                attach.detach_tc(sock, op.key)
                live.interfaces.discard(op.key)
        else:  # pragma: no cover - plan.py and this executor are written together
            raise PermanentDataplaneError(f"unknown plan operation {op}")

    def _attach(self, sock: Any, ifindex: int) -> None:
        attach.attach_tc(
            sock,
            ifindex,
            self._programs[loader.PROGRAM_FROM_POD].fd,
            self._programs[loader.PROGRAM_TO_POD].fd,
        )

    def _zero_counters(self, counters: Any, endpoint_id: int) -> None:
        """A reused slot must not inherit the previous endpoint's numbers."""
        for direction in Direction:
            per_cpu = counters.Leaf(*[counters.sLeaf() for _ in range(counters.total_cpu)])
            counters[counters.Key(endpoint_id * 2 + direction)] = per_cpu

    def _reset_conntrack(self, changes: _Changes) -> None:
        """Forget flows whose verdict may differ now: endpoints with new policy ids, peers whose
        identity class changed, addresses under a changed CIDR prefix. Their next packet is
        judged afresh against the new policy."""
        addresses = set(changes.peer_addresses) | {
            address
            for address, ifindex in self._live.endpoint_ips.items()
            if ifindex in self._live.endpoints
            and self._live.endpoints[ifindex].endpoint_key in changes.endpoint_keys
        }
        # removed endpoints are no longer in endpoint_ips; their flows die with the interface
        prefixes = [(plen, int.from_bytes(raw, "big") >> (128 - plen)) for plen, raw in changes.prefixes]

        def under_changed_prefix(raw: bytes) -> bool:
            value = int.from_bytes(raw, "big")
            return any(value >> (128 - length) == network for length, network in prefixes)

        ct = self._module[b"pf_ct"]
        for key in list(ct):
            for side in (bytes(key.addr_a.bytes), bytes(key.addr_b.bytes)):
                if side in addresses or (prefixes and under_changed_prefix(side)):
                    _delete(ct, key)
                    break

    # ---- adoption and the state file ---------------------------------------------------------------

    def _adopt(self) -> None:
        """Read what a previous run left in the pinned maps so the next apply is a diff."""
        module, live = self._module, _Live()
        saved = self._read_state_file()
        slot_of_key: dict[int, str] = {v: k for k, v in saved.get("endpoint_slots", {}).items()}
        for key, value in module[b"pf_endpoints"].items():
            endpoint_key = slot_of_key.get(value.endpoint_id, f"adopted/{key.ifindex}")
            live.endpoints[key.ifindex] = EndpointEntry(
                endpoint_key,
                value.endpoint_id,
                value.ingress_policy_id,
                value.egress_policy_id,
                value.generation,
                bytes(value.mac),
            )
        for key, value in module[b"pf_endpoint_ips"].items():
            live.endpoint_ips[bytes(key.bytes)] = value.ifindex
        live.node_ips = {bytes(key.bytes) for key in module[b"pf_node_ips"]}
        live.ipcache = {
            (k.generation, bytes(k.addr.bytes)): v.class_id for k, v in module[b"pf_ipcache"].items()
        }
        live.cidr = {
            (k.generation, k.prefixlen - GENERATION_PREFIX, bytes(k.addr.bytes)): v.class_id
            for k, v in module[b"pf_cidr"].items()
        }
        for k, v in module[b"pf_cidr_host"].items():
            live.cidr[(k.generation, HOST_PREFIX, bytes(k.addr.bytes))] = v.class_id
        live.policy = {
            (k.prefixlen, k.policy_id, k.peer_class, k.peer_kind, k.protocol, _ntohs(k.dport_be))
            for name in (b"pf_policy", b"pf_policy_exact")
            for k in module[name]
        }
        if not (live.endpoints or live.endpoint_ips or live.policy or live.ipcache or live.cidr):
            # Fresh pins (bpffs was emptied, e.g. reboot or an uninstall that kept /run): the state
            # file describes a kernel that no longer exists, and its ifindexes may now name other
            # interfaces. Start clean.
            saved = {}
        live.interfaces = set(saved.get("interfaces", [])) | set(live.endpoints)
        live.allocation = _allocation_from_json(saved) if saved else None
        if live.allocation is None and (live.policy or live.ipcache or live.cidr or live.endpoints):
            # No record of what the ids mean: hand out ids above everything in use (endpoints'
            # policy ids too: an isolated endpoint without allows has no policy entry) so new
            # entries never give a live id a different meaning before the flips.
            highest = max(
                [e[1] for e in live.policy]
                + [e[2] for e in live.policy]
                + list(live.ipcache.values())
                + list(live.cidr.values())
                + [e.ingress_policy_id for e in live.endpoints.values()]
                + [e.egress_policy_id for e in live.endpoints.values()]
                + [0]
            )
            live.allocation = Allocation(next_id=highest + 1)
        self._live = live
        self.adopted = bool(live.endpoints or live.endpoint_ips or live.policy or live.interfaces)

    def _read_state_file(self) -> dict[str, Any]:
        try:
            data = json.loads(self.state_file.read_text())
        except (FileNotFoundError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _save_state_file(self) -> None:
        allocation = self._live.allocation or Allocation()
        data = _allocation_to_json(allocation)
        data["interfaces"] = sorted(self._live.interfaces)
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.state_file.with_suffix(".tmp")
        temporary.write_text(json.dumps(data))
        os.replace(temporary, self.state_file)  # atomic: a crash leaves the old or the new file

    def _install_egress_hook(self) -> None:
        """Run this agent's egress program from netfilter links or the iptables rule, and only then
        remove the other kind of hook (left by an earlier run with another setting or kernel)."""
        if self.egress_hook != "iptables":
            try:
                program_fd = netfilter.load_program(self._module, loader.PROGRAM_NF_EGRESS_LINK)
                self._links.install(program_fd)
            except netfilter.NetfilterUnsupported as error:
                if self.egress_hook == "netfilter":
                    raise
                log.warning("no netfilter links, the egress verdict runs from iptables (xt_bpf): %s", error)
            else:
                self.egress_hook_in_use = "netfilter"
                if not self._links.defrag:
                    log.warning("netfilter links without IP defragmentation (Linux < 6.6): later "
                                "fragments take the verdict of their first fragment")
                if self._iptables.available():
                    self._iptables.remove()
                self._unpin_nf_programs(keep="")
                return
        self._install_nf_program()
        self.egress_hook_in_use = "iptables"
        self._links.remove()

    def _install_nf_program(self) -> None:
        """Pin the new egress program under a fresh name, point the iptables rule at it, unpin the old."""
        from bcc import libbcc

        fd = self._programs[loader.PROGRAM_NF_EGRESS].fd
        pin = f"{self.pin_dir}/{NF_PROGRAM_PIN}_{time.monotonic_ns()}"  # bpffs names allow no dots
        if libbcc.lib.bpf_obj_pin(fd, pin.encode()) != 0:
            reason = os.strerror(ctypes.get_errno())
            raise PermanentDataplaneError(f"cannot pin the egress program at {pin}: {reason}")
        self._iptables.install(pin)
        self._nf_pin = pin
        self._unpin_nf_programs(keep=pin)

    def _unpin_nf_programs(self, keep: str) -> None:
        for name in os.listdir(self.pin_dir):
            old = f"{self.pin_dir}/{name}"
            if name.startswith(f"{NF_PROGRAM_PIN}_") and old != keep:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(old)

    # ---- observability -------------------------------------------------------------------------

    def counters(self) -> list[EndpointCounters]:
        if self._module is None:
            return []
        table = self._module[b"pf_counters"]
        result = []
        with self._lock:
            entries = sorted(self._live.endpoints.values(), key=lambda e: e.endpoint_key)
        for entry in entries:
            for direction in Direction:
                per_cpu = table.getvalue(table.Key(entry.endpoint_id * 2 + direction))
                result.append(
                    EndpointCounters(
                        key=entry.endpoint_key,
                        direction=direction.name.lower(),
                        allowed_packets=sum(v.allowed_packets for v in per_cpu),
                        allowed_bytes=sum(v.allowed_bytes for v in per_cpu),
                        denied_packets=sum(v.denied_packets for v in per_cpu),
                        denied_bytes=sum(v.denied_bytes for v in per_cpu),
                    )
                )
        return result

    def drop_reason_counts(self) -> dict[str, int]:
        if self._module is None:
            return {}
        table = self._module[b"pf_drop_reasons"]
        counts = {}
        for index in range(1, REASON_MAX):
            try:
                counts[Reason(index).name.lower()] = int(sum(table.getvalue(table.Key(index))))
            except Exception:  # a map pinned by an older version with fewer reasons
                counts[Reason(index).name.lower()] = 0
        return counts

    def events_lost(self) -> int:
        if self._module is None:
            return 0
        table = self._module[b"pf_events_lost"]
        return int(sum(table.getvalue(table.Key(0))))

    def map_usage(self) -> dict[str, tuple[int, int]]:
        if self._module is None:
            return {}
        live, knobs = self._live, self.knobs
        with self._lock:
            exact = sum(1 for entry in live.policy if is_exact(entry))
            hosts = sum(1 for key in live.cidr if is_host(key))
            usage = {
                "policy": (len(live.policy) - exact, knobs.policy_max),
                "policy_exact": (exact, knobs.policy_max),
                "ipcache": (len(live.ipcache), knobs.ipcache_max),
                "cidr": (len(live.cidr) - hosts, knobs.cidr_max),
                "cidr_host": (hosts, knobs.cidr_max),
                "endpoints": (len(live.endpoints), knobs.endpoints_max),
                "endpoint_ips": (len(live.endpoint_ips), knobs.endpoints_max * 4),
                "node_ips": (len(live.node_ips), knobs.node_ips_max),
            }
        # conntrack is written by the datapath only: count what the kernel holds
        usage["ct"] = (count_entries(self._module[b"pf_ct"]), knobs.ct_max)
        return usage

    def poll_events(self, timeout_ms: int = 0) -> list[DenyEvent]:
        if self._module is None:
            return []
        self._module.ring_buffer_poll(timeout_ms)
        events, self._events = self._events, []
        return events

    def _on_event(self, _ctx: Any, data: Any, _size: int) -> None:
        raw = ctypes.cast(data, ctypes.POINTER(DenyEventStruct)).contents
        endpoint = self._endpoint_names.get(raw.endpoint_id, "")
        reason = Reason(raw.reason).name.lower() if raw.reason < REASON_MAX else str(raw.reason)
        self._events.append(
            DenyEvent(
                endpoint=endpoint,
                direction=Direction(raw.direction).name.lower(),
                protocol=raw.protocol,
                source=str(address_from_bytes(bytes(raw.saddr.bytes))),
                destination=str(address_from_bytes(bytes(raw.daddr.bytes))),
                source_port=_ntohs(raw.sport_be),
                destination_port=_ntohs(raw.dport_be),
                reason=reason,
            )
        )


# ---- helpers -----------------------------------------------------------------------------------


def _ntohs(value: int) -> int:
    return int.from_bytes(int(value).to_bytes(2, "little"), "big")


def _htons(value: int) -> int:
    return _ntohs(value)


def _policy_key(table: Any, entry: PolicyEntry) -> Any:
    prefixlen, policy_id, peer_class, peer_kind, protocol, port = entry
    return table.Key(prefixlen, policy_id, peer_class, peer_kind, protocol, _htons(port))


def _cidr_key(table: Any, cidr_key: CidrKey) -> Any:
    generation, prefixlen, address = cidr_key
    key = table.Key()
    key.prefixlen = GENERATION_PREFIX + prefixlen
    key.generation = generation
    ctypes.memmove(key.addr.bytes, address, 16)
    return key


def _cidr_host_key(table: Any, cidr_key: CidrKey) -> Any:
    generation, _prefixlen, address = cidr_key
    key = table.Key()
    key.generation = generation
    ctypes.memmove(key.addr.bytes, address, 16)
    return key


def count_entries(table: Any, chunk: int = 8192) -> int:
    """Entries of a hash map, counted with BPF_MAP_LOOKUP_BATCH: a handful of syscalls instead
    of one get_next_key per entry (a full 65,536-entry conntrack: ~250 ms iterated from Python)."""
    from bcc.libbcc import lib

    size = min(chunk, table.max_entries)
    keys, values = (table.Key * size)(), (table.Leaf * size)()
    token_in, token_out, count = ctypes.c_uint32(0), ctypes.c_uint32(0), ctypes.c_uint32(0)
    total, first = 0, True
    while True:
        count.value = size
        result = lib.bpf_lookup_batch(
            table.map_fd, None if first else ctypes.byref(token_in), ctypes.byref(token_out),
            ctypes.byref(keys), ctypes.byref(values), ctypes.byref(count),
        )  # fmt: skip
        error = ctypes.get_errno()
        total += count.value
        if result != 0:
            if error == errno.ENOENT:
                return total  # walked to the end
            raise TemporaryDataplaneError(f"counting entries: {os.strerror(error)}")
        token_in.value, first = token_out.value, False


def _delete(table: Any, key: Any) -> None:
    with contextlib.suppress(KeyError):
        del table[key]


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


def _merge_allocations(old: Allocation | None, new: Allocation) -> Allocation:
    if old is None:
        return new
    reused = set(new.policies.values())  # an id whose content changed in place: the new content
    return Allocation(
        policies={**{c: i for c, i in old.policies.items() if i not in reused}, **new.policies},
        identity_classes={**old.identity_classes, **new.identity_classes},
        cidr_classes={**old.cidr_classes, **new.cidr_classes},
        endpoint_slots={**old.endpoint_slots, **new.endpoint_slots},
        endpoint_policy_ids={**old.endpoint_policy_ids, **new.endpoint_policy_ids},
        next_id=max(old.next_id, new.next_id),
    )


@functools.lru_cache(maxsize=1 << 17)
def _peer_to_json(peer: CidrPeer | IdentityPeer) -> dict[str, Any]:
    """Cached (the state file is written on every apply; callers only serialise the result)."""
    if isinstance(peer, IdentityPeer):
        return {"identity": peer.identity}
    return {"cidr": str(peer.cidr), "excepts": [str(e) for e in peer.excepts]}


def _peer_from_json(data: dict[str, Any]) -> CidrPeer | IdentityPeer:
    if "identity" in data:
        return IdentityPeer(int(data["identity"]))
    excepts = tuple(ipaddress.ip_network(e) for e in data["excepts"])
    return CidrPeer(ipaddress.ip_network(data["cidr"]), excepts)


def _cidr_peer_from_json(data: dict[str, Any]) -> CidrPeer:
    peer = _peer_from_json(data)
    if not isinstance(peer, CidrPeer):
        raise ValueError(f"not a CIDR peer: {data}")
    return peer


def _allocation_to_json(allocation: Allocation) -> dict[str, Any]:
    return {
        "policies": [
            [policy_id, [[p, f, last, _peer_to_json(peer)] for p, f, last, peer in content]]
            for content, policy_id in allocation.policies.items()
        ],
        "identity_classes": [[cid, sorted(ids)] for ids, cid in allocation.identity_classes.items()],
        "cidr_classes": [
            [cid, [_peer_to_json(p) for p in peers]]
            for peers, cid in allocation.cidr_classes.items()
        ],
        "endpoint_slots": allocation.endpoint_slots,
        "endpoint_policy_ids": allocation.endpoint_policy_ids,
        "next_id": allocation.next_id,
    }


def _allocation_from_json(data: dict[str, Any]) -> Allocation | None:
    try:
        return Allocation(
            policies={
                frozenset(
                    (int(p), int(f), int(last), _peer_from_json(peer)) for p, f, last, peer in rules
                ): int(pid)
                for pid, rules in data["policies"]
            },
            identity_classes={
                frozenset(int(i) for i in ids): int(cid) for cid, ids in data["identity_classes"]
            },
            cidr_classes={
                frozenset(_cidr_peer_from_json(p) for p in peers): int(cid)
                for cid, peers in data["cidr_classes"]
            },
            endpoint_slots={str(k): int(v) for k, v in data["endpoint_slots"].items()},
            endpoint_policy_ids={
                str(k): (int(v[0]), int(v[1])) for k, v in data.get("endpoint_policy_ids", {}).items()
            },
            next_id=int(data["next_id"]),
        )
    except (KeyError, TypeError, ValueError) as error:
        log.warning("ignoring unreadable BPF state file: %s", error)
        return None
