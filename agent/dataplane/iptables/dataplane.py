"""IptablesDataplane: the `Dataplane` protocol on iptables (legacy x_tables) + ipset.

For nodes where eBPF cannot be used. Same semantics as the eBPF dataplane: per-endpoint chains
dispatched on the pod's host interface in FORWARD (after DNAT, before SNAT) and INPUT, peer
identities as shared ipsets, replies through conntrack, anti-spoofing, silent drops.

One `apply` = read the kernel, compile the desired state (compiler.py, pure), then write in
dependency order: sets (created, or swapped with a filled temporary copy), then one
iptables-restore commit per family that creates the changed endpoint chains, rewrites the
dispatch to point at them and deletes the chains nothing points at any more, then the sets
nothing references. Each commit is one atomic table swap, so there is no allow-all or
deny-all window, per endpoint or otherwise. A family in which the change alters nothing (the
kernel still holds what the last commit wrote) gets no commit at all.

The traffic from the node to its pods (OUTPUT) is never filtered: the node's own traffic is
always allowed, and the node's IPs are in every ingress chain for traffic it forwards.
"""

from __future__ import annotations

import ipaddress
import logging
import shutil
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

from agent.dataplane import bridge_netfilter
from agent.dataplane.base import (
    EndpointCounters,
    PermanentDataplaneError,
    TemporaryDataplaneError,
)
from agent.dataplane.fit import Rejection, report_rejections
from agent.dataplane.flow_reset import FlowReset
from agent.dataplane.flows import FlowRecord
from agent.dataplane.iptables import kernel, verify
from agent.dataplane.iptables.chain_memo import ChainMemo
from agent.dataplane.iptables.compiler import compile_state
from agent.dataplane.iptables.counters import Tally, audit_denials, endpoint_chain_owners, tally_chains
from agent.dataplane.iptables.fitting import fit_sets
from agent.dataplane.iptables.flowrecords import UNLOGGED, RuleName
from agent.dataplane.iptables.flowsource import FlowSource, flow_view
from agent.dataplane.iptables.ipsets import DEFAULT_VERIFY_INTERVAL_S, SetsView, moved_members, sets_script
from agent.dataplane.iptables.layer2 import Layer2
from agent.dataplane.iptables.layout import (
    CHAIN_PREFIX,
    EGRESS,
    FAMILIES,
    FIXED_CHAINS,
    FORWARD_CHAIN,
    FROM_POD_CHAIN,
    HOOKS,
    INGRESS,
    TO_POD_CHAIN,
    DesiredState,
    Interface,
)
from agent.dataplane.iptables.nflog import RECEIVE_BUFFER
from agent.dataplane.linkdump import dump_links
from agent.dataplane.types import NodeState

log = logging.getLogger(__name__)

DEFAULT_IPSET_MAXELEM = 65536


class IptablesDataplane:
    name = "iptables"

    def __init__(
        self,
        unknown_endpoints: str = "drop",
        established_on_change: str = "keep",
        ipset_maxelem: int = DEFAULT_IPSET_MAXELEM,
        sets_verify_interval_s: float = DEFAULT_VERIFY_INTERVAL_S,
        flows_per_pod: int = 16384,
        flow_group: int = 0,
        denied_flow_interval_s: float = 5.0,
        flow_receive_buffer: int = RECEIVE_BUFFER,
    ) -> None:
        """unknown_endpoints: "drop" (default) or "allow" the traffic of pod interfaces that no
        endpoint claims.

        established_on_change, what a policy change does to flows conntrack already knows:
        - "keep" (default): they continue until they end or time out, whatever the new policy
          says; only new flows are judged by it.
        - "reset": after the new chains and sets are committed, the conntrack entries of every
          protocol (TCP, UDP, SCTP, ICMP, others) are deleted for the addresses of each endpoint
          whose chain changed and of each peer address that joined or left a set (an identity
          change), on the original and the reply tuple (so flows through a ClusterIP count).
          The next packet of such a flow is judged as new: dropped if the policy now denies it,
          re-admitted if it still allows it. TCP is stricter: a new TCP flow must start with a
          SYN (conntrack's mid-stream pickup would otherwise let the peer's next segment rebuild
          the flow the other way round), so every TCP connection of an affected endpoint or
          peer ends, allowed or not, and clients reconnect under the new policy. The bpf
          dataplane behaves the same way (its `established_on_change`). An endpoint whose
          single-port allows sit in one hash:net,port set keeps its chain when only that set's
          entries change: then the peers that entered or left the set are the ones reset.

        sets_verify_interval_s: how often apply reads the ipsets back from the kernel instead of
        trusting its own view of what it wrote (ipsets.py); also read at start and after a failure.

        flows_per_pod: the most connections one pod address may hold in the kernel's conntrack
        table, per direction (connlimit in its chains); its new connections beyond are dropped
        and counted as its denials. 0: no bound. Issue 21, item 10: the table is the node's.

        flow_group: the NFLOG group of flow records (flowrecords.py): the deciding rules log a new
        flow's first packet and denied packets there, and poll_flows reads them. 0: no flow
        records (and no log chains). denied_flow_interval_s: how often the denied packets of a
        flow that keeps sending are reported (summed) after its first record."""
        if unknown_endpoints not in ("drop", "allow"):
            raise ValueError(f"unknown_endpoints must be 'drop' or 'allow', not {unknown_endpoints!r}")
        if established_on_change not in ("keep", "reset"):
            raise ValueError(
                f"established_on_change must be 'keep' or 'reset', not {established_on_change!r}"
            )
        if not 0 <= flow_group <= 0xFFFF:
            raise ValueError(f"flow_group must be an NFLOG group 1..65535 (0: off), not {flow_group}")
        if flows_per_pod < 0:
            raise ValueError(f"flows_per_pod must be 0 (no bound) or more, not {flows_per_pod}")
        if established_on_change == "reset" and shutil.which("conntrack") is None:
            raise PermanentDataplaneError("established_on_change='reset' needs the conntrack tool")
        self.unknown_endpoints = unknown_endpoints
        self.established_on_change = established_on_change
        self.ipset_maxelem = ipset_maxelem
        self._sets_view = SetsView(sets_verify_interval_s)
        self.flows_per_pod = flows_per_pod
        self.adopted = False  # start() found endpoint chains left by a previous run
        # policies the last apply left out because their sets exceed maxelem (read by the node layer)
        self.rejected_policies: dict[str, Rejection] = {}
        self._started = False
        # Counters of endpoint chains replaced since start (rule counters die with their chain).
        self._retired: dict[tuple[str, str], Tally] = {}
        self._retired_audit: dict[tuple[str, str], int] = {}  # audit denials of replaced chains
        # What the last commit wrote into the fixed chains, per family: an apply that changes
        # nothing in a family (e.g. the IPv6 half of an IPv4-only change) writes nothing there.
        self._committed: dict[int, dict[str, tuple[str, ...]]] = {}
        self._layer2 = Layer2()  # bridged pods' layer-2 rules (layer2.py)
        self._desired: DesiredState | None = None  # what the last apply committed (repair_state)
        # apply() runs on the reconcile thread; counters() (scrapes) and repair_hooks() (the
        # agent's hook check) on others. A scrape between "old chain counted into _retired" and
        # "old chain deleted" would count it twice, and the next scrape would go down.
        self._lock = threading.Lock()
        self.flow_group = flow_group
        self._flows = None
        if flow_group:
            self._flows = FlowSource(flow_group, denied_flow_interval_s, flow_receive_buffer)
        self._rule_names: dict[int, RuleName] = {}  # of the last apply, for the flow view
        self._chain_memo = ChainMemo()  # the last compile's endpoint chains (chain_memo.py)
        # False only while every commit since start wrote no audit chain (no endpoint has an
        # audit view): then the kernel holds no AUDIT_DENY rule of ours and audit_denied need
        # not read the table. True from start: adopted chains may hold some.
        self._audit_chains_possible = True

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Adopt what a previous run left: its chains keep enforcing, untouched, until the first
        apply replaces what changed. Creates the fixed chains and hooks if missing, and sweeps
        what nothing uses any more (chains nothing jumps to, sets no rule matches)."""
        referenced_sets: set[str] = set()
        for family in FAMILIES:
            table = kernel.read_filter_table(family)
            missing = [c for c in FIXED_CHAINS if c not in table.chains]
            jumped_to = {r.target for r in table.rules}
            orphans = sorted(
                c
                for c in table.chains
                if c.startswith(CHAIN_PREFIX) and c not in FIXED_CHAINS and c not in jumped_to
            )
            if missing or orphans:
                script = ["*filter", *(f":{c} - [0:0]" for c in (*missing, *orphans))]
                if FORWARD_CHAIN in missing:
                    script += [
                        f"-A {FORWARD_CHAIN} -j {FROM_POD_CHAIN}",
                        f"-A {FORWARD_CHAIN} -j {TO_POD_CHAIN}",
                    ]
                script += [f"-X {c}" for c in orphans]
                kernel.restore_filter_table(family, "\n".join([*script, "COMMIT", ""]))
            kernel.ensure_hooks(family, HOOKS)
            if endpoint_chain_owners(table):
                self.adopted = True
            referenced_sets |= {
                name for r in table.rules if r.chain not in orphans for name in kernel.matched_sets(r.spec)
            }
        kernel.destroy_sets(sorted(set(kernel.read_sets()) - referenced_sets))
        self._sets_view.forget()
        self._committed = {}
        self._audit_chains_possible = True  # adopted chains may hold audit rules
        self._started = True
        log.info("iptables dataplane started", extra={"adopted": self.adopted})

    def close(self) -> None:
        """Only the flow records' socket is held in user space: the kernel keeps enforcing."""
        if self._flows is not None:
            self._flows.close()

    def teardown(self) -> None:
        for family in FAMILIES:
            kernel.remove_hooks(family)
            table = kernel.read_filter_table(family)
            ours = sorted(c for c in table.chains if c.startswith(CHAIN_PREFIX))
            if ours:
                script = ["*filter", *(f":{c} - [0:0]" for c in ours), *(f"-X {c}" for c in ours), "COMMIT"]
                kernel.restore_filter_table(family, "\n".join(script) + "\n")
        kernel.destroy_sets(sorted(kernel.read_sets()))
        self._sets_view.forget()
        self._layer2.teardown()
        self._committed = {}
        self._desired = None
        self._started = False
        self.close()

    # -- programming --------------------------------------------------------------------------

    def apply(self, state: NodeState) -> None:
        with self._lock:
            self._apply_locked(state)

    def repair_hooks(self) -> list[str]:
        """Make podfence's jumps the first rules of FORWARD and INPUT again (both families), and
        of the bridge family's PREROUTING where bridged pods have layer-2 chains, if another
        tool inserted rules above them or removed them; returns what was repaired. Cheap when
        all is in place: one iptables-save of the filter table per family (and one
        ebtables-nft-save of the nat table on bridged nodes)."""
        if not self._started:
            return []
        with self._lock:
            return self._repair_hooks_locked()

    def _repair_hooks_locked(self) -> list[str]:
        repaired = []
        for family in FAMILIES:
            repaired += self._move_hooks_first(family, kernel.read_filter_table(family))
        return repaired + self._layer2.repair()

    def repair_state(self) -> list[verify.Drift]:
        """Put back the ipsets, chains and layer-2 chains of the last apply where someone emptied or
        edited them (verify.py; the hooks are repair_hooks'); returns what was found."""
        if not self._started or self._desired is None:
            return []
        with self._lock:
            desired = self._desired
            sets_now = kernel.read_sets()
            drift = verify.drifted_sets({n: spec.members for n, spec in desired.sets.items()}, sets_now)
            if drift:  # first: a rewritten chain may match a set that was destroyed
                self._sets_view.forget()  # until the restore is known to have worked
                kernel.restore_sets(sets_script(desired.sets, sets_now, self.ipset_maxelem))
                self._sets_view.wrote(desired.sets, self.ipset_maxelem)
            for family in FAMILIES:
                found, script = verify.chain_repair(
                    kernel.read_filter_table(family), desired.chains[family], "chain", f"ipv{family} ",
                    "filter", "- [0:0]",
                )
                if script:
                    kernel.restore_filter_table(family, script)
                drift += found
            return drift + self._layer2.repair_chains(desired.bridge)

    @staticmethod
    def _move_hooks_first(family: int, table: kernel.FilterTable) -> list[str]:
        script = kernel.hooks_first_script(table, HOOKS)
        if not script:
            return []
        kernel.restore_filter_table(family, script)
        return [f"ipv{family} {line.split()[1]}" for line in script.splitlines() if line.startswith("-I ")]

    def _publish_flow_view(self, state: NodeState, desired: DesiredState, interfaces: set[int]) -> None:
        if self._flows is None:
            return
        endpoints = {key: (e.ifindex, e.ips) for key, e in state.endpoints.items()}
        tiered = {
            (key, direction, view is not policy): view.tiered
            for key, e in state.endpoints.items()
            for direction, policy in (("ingress", e.ingress), ("egress", e.egress))
            for view in (policy, policy.audit)
            if view is not None and view.tiered
        }
        self._flows.view = flow_view(
            endpoints, interfaces, desired.rule_names, self._rule_names, tiered, state.identities
        )

    def _apply_locked(self, state: NodeState) -> None:
        if not self._started:
            self.start()
        # The sets and the first family's table are read (by subprocesses) while the state
        # compiles: an edit is enforced for IPv4 ~15 ms sooner. The other family is read after
        # the first commit, so that it does not compete for the CPUs on the first one's path.
        first = FAMILIES[0]
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="iptables-read") as reads:
            first_table = reads.submit(kernel.read_filter_table, first)
            sets_read = reads.submit(kernel.read_sets) if self._sets_view.needs_read() else None
            desired, rejected, interfaces = self._compile(state)
            tables = {first: first_table.result()}
            sets_now = self._sets_view.read(sets_read.result()) if sets_read else self._sets_view.current()
        # The records' view before the rules it names are in the kernel: a packet those rules log
        # at once is named by their rule, not dropped as an unknown one (the control refuses a
        # record without a direction). It keeps the last apply's names for packets logged before.
        self._publish_flow_view(state, desired, interfaces)

        audits = any(
            e.ingress.audit is not None or e.egress.audit is not None for e in state.endpoints.values()
        )
        self._audit_chains_possible |= audits  # before the first commit that may write one
        moved_peers = moved_members(desired.sets, sets_now)
        self._sets_view.forget()  # until the sets are known to be what desired says
        kernel.restore_sets(sets_script(desired.sets, sets_now, self.ipset_maxelem))
        changed: set[tuple[str, str]] = set()
        repaired: list[str] = []
        for family in FAMILIES:
            table = tables[family] if family in tables else kernel.read_filter_table(family)
            changed |= self._commit_family(family, desired, table)
            # After the commit, which (re)creates podfence's chains: someone may have flushed
            # FORWARD/INPUT or inserted rules above the hooks since the last apply. The commit
            # left the built-in chains alone, so the table read before it still shows them.
            repaired += self._move_hooks_first(family, table)
        if repaired:
            log.warning("podfence hooks were not first; moved back to the top: %s", ", ".join(repaired))
        # After the IP rules: if the layer-2 commit fails, the policy itself is in force already.
        self._layer2.commit(desired.bridge, self._retired)
        stale_sets = sorted(set(sets_now) - set(desired.sets))
        kernel.destroy_sets(stale_sets)
        self.rejected_policies = report_rejections(self.rejected_policies, rejected)
        self._desired = desired
        self._audit_chains_possible = audits  # every family committed: the kernel holds `desired`
        if self._flows is not None:
            self._rule_names = desired.rule_names
        # (a stale set still referenced survives destroy_sets; the next read finds it again)
        self._sets_view.wrote(desired.sets, self.ipset_maxelem)

        if self.established_on_change == "reset" and (changed or moved_peers):
            keys = {key for key, _ in changed}
            endpoint_ips = {key: endpoint.ips for key, endpoint in state.endpoints.items()}
            moved = [ipaddress.ip_network(peer, strict=False) for peer in moved_peers]
            log.info(
                "resetting connections of endpoints whose policy changed and of peers that moved",
                extra={"endpoints": sorted(keys), "peers": sorted(moved_peers)},
            )
            kernel.forget_connections(FlowReset.of(keys, endpoint_ips, moved).texts())

    def _compile(self, state: NodeState) -> tuple[DesiredState, dict[str, Rejection], set[int]]:
        """The chains and sets of `state`, less the policies whose sets exceed maxelem (fitting.py)."""
        interfaces = self._interfaces(
            {e.ifindex for e in state.endpoints.values() if e.ifindex is not None} | set(state.pod_interfaces)
        )
        desired, rejected = fit_sets(
            state,
            lambda fitted: compile_state(
                fitted,
                interfaces,
                self.unknown_endpoints,
                tcp_needs_syn=self.established_on_change == "reset",
                set_limit=self.ipset_maxelem,
                flows_per_pod=self.flows_per_pod,
                flow_group=self.flow_group or None,
                memo=self._chain_memo,
            ),
            self.ipset_maxelem,
        )
        if desired.uses_bridges:
            bridge_netfilter.enable()
        return desired, rejected, set(interfaces)

    def _interfaces(self, ifindexes: Iterable[int]) -> dict[int, Interface]:
        wanted = set(ifindexes)
        if not wanted:
            return {}
        try:
            links = {link.index: link for link in dump_links()}  # lean: ~10x pyroute2's decode
        except OSError as exc:
            raise TemporaryDataplaneError("cannot list the node's interfaces") from exc
        found: dict[int, Interface] = {}
        for ifindex in wanted:
            link = links.get(ifindex)
            if link is None:
                # Vanished with its pod: there is nothing left to filter for it.
                log.debug("pod interface %d is gone", ifindex)
                continue
            master = links.get(link.master) if link.master is not None else None
            bridge = master.name if master is not None and master.kind == "bridge" else None
            found[ifindex] = Interface(ifindex, link.name, bridge)
        return found

    def _commit_family(
        self, family: int, desired: DesiredState, table: kernel.FilterTable
    ) -> set[tuple[str, str]]:
        """One atomic commit for this family; returns the (key, direction)s whose chain changed."""
        chains = desired.chains[family]
        owners_before = endpoint_chain_owners(table)
        stale = sorted(
            c
            for c in table.chains
            if c.startswith(CHAIN_PREFIX) and c not in chains and c not in FIXED_CHAINS
        )
        new = [c for c in chains if c not in table.chains and c not in FIXED_CHAINS]
        fixed = {c: tuple(chains[c]) for c in FIXED_CHAINS}
        if (
            not new
            and not stale
            and self._committed.get(family) == fixed
            and all(c in table.chains and len(table.chain_rules(c)) == len(fixed[c]) for c in FIXED_CHAINS)
        ):
            return set()  # the kernel holds what the last commit wrote: one restore saved

        # Keep what the replaced chains counted (read in this apply, before the commit that
        # deletes them; what they count in between is lost).
        # (PF-FROM's own drops are written back with its rules above: not retired, or they would
        # count twice)
        counted = endpoint_chain_owners(table, neighbour=True)
        for owner, tally in tally_chains(
            table, {c: o for c, o in counted.items() if c in stale}, from_pod_drops=False
        ).items():
            self._retired.setdefault(owner, Tally()).add(tally)
        for owner, count in audit_denials(table, set(stale)).items():
            self._retired_audit[owner] = self._retired_audit.get(owner, 0) + count
        for owner in [o for o in self._retired_audit if o not in desired.endpoint_chains]:
            del self._retired_audit[owner]  # the endpoint is gone: nothing reports it any more
        kernel.restore_filter_table(family, kernel.commit_script(table, chains, new, stale))
        self._committed[family] = fixed

        changed = set()
        for chain, owner in owners_before.items():
            now = desired.endpoint_chains.get(owner, {}).get(family)
            if now is not None and now != chain:
                changed.add(owner)
        if new or stale:
            log.info(
                "ipv%d: %d endpoint chains built, %d removed",
                family,
                len(new),
                len(stale),
                extra={"family": family, "built": len(new), "removed": len(stale)},
            )
        return changed

    # -- observation --------------------------------------------------------------------------

    def audit_denied(self) -> dict[tuple[str, str], int]:
        """New flows each endpoint direction admitted that its audit view would deny (the
        AUDIT_DENY rules of its audit chains, and of the chains they replaced)."""
        with self._lock:
            totals = dict(self._retired_audit)
            if not self._audit_chains_possible:
                return totals  # nothing in the kernel counts them: no table read (a scrape's half)
            for family in FAMILIES:
                for owner, count in audit_denials(kernel.read_filter_table(family)).items():
                    totals[owner] = totals.get(owner, 0) + count
        return totals

    def counters(self) -> list[EndpointCounters]:
        totals: dict[tuple[str, str], Tally] = {}
        with self._lock:  # the kernel's chains and _retired from the same moment
            for family in FAMILIES:
                table = kernel.read_filter_table(family)
                for owner, tally in tally_chains(table, endpoint_chain_owners(table, neighbour=True)).items():
                    totals.setdefault(owner, Tally()).add(tally)
            # frames dropped at layer 2 count as the endpoint's egress drops
            for key, (packets, byte_count) in self._layer2.drops().items():
                tally = totals.setdefault((key, EGRESS), Tally())
                tally.denied_packets += packets
                tally.denied_bytes += byte_count
            for owner, tally in self._retired.items():
                if owner in totals:
                    totals[owner].add(tally)
        return [
            EndpointCounters(
                key, direction, t.allowed_packets, t.allowed_bytes, t.denied_packets, t.denied_bytes
            )
            for (key, direction), t in sorted(totals.items())
        ]

    # -- flow records (FlowRecordSource) ----------------------------------------------------------

    def poll_flows(self, timeout_ms: int) -> list[FlowRecord]:
        if self._flows is None:  # records off: a poller loop waits instead of spinning
            time.sleep(max(timeout_ms, 0) / 1000)
            return []
        return self._flows.poll_flows(timeout_ms)

    def flows_lost(self) -> int:
        """Records the kernel could not queue to the reader (counted from the gap in sequence
        numbers the next record shows), and records dropped because poll_flows did not come
        for them in time."""
        return self._flows.lost() if self._flows is not None else 0

    def events_lost(self) -> int:
        """podfence_events_lost_total: the flow records lost."""
        return self.flows_lost()

    def denied_unlogged(self) -> int:
        """Denied packets not logged because their flow exceeded the per-flow log rate (they
        were dropped all the same, and counted as their endpoint's denials)."""
        if self._flows is None:
            return 0
        return sum(
            rule.packets
            for family in FAMILIES
            for rule in kernel.read_filter_table(family).rules
            if rule.comment == UNLOGGED
        )


__all__ = ["EGRESS", "INGRESS", "IptablesDataplane"]
