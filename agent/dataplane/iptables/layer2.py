"""Writing the layer-2 rules of bridged pods (bridge.py compiles them) into the bridge family:
one nf_tables transaction per change, the PREROUTING jump kept first, the drops of replaced
chains kept for the counters. The chains' owners are known only to the apply that built them
(ebtables rules carry no comment), so this object remembers them."""

from __future__ import annotations

from agent.dataplane.base import PermanentDataplaneError
from agent.dataplane.iptables import bridge, kernel, verify
from agent.dataplane.iptables.counters import Tally
from agent.dataplane.iptables.layout import EGRESS


class Layer2:
    def __init__(self) -> None:
        # The bridge family's endpoint chains -> endpoint key, and the dispatch last written
        # (None: not known since start; []: nothing of ours is there).
        self.owners: dict[str, str] = {}
        self.committed: list[str] | None = None

    def commit(self, desired: bridge.BridgeRules, retired: dict[tuple[str, str], Tally]) -> None:
        """Make the bridge family hold `desired` (one nf_tables transaction); what the chains it
        deletes had dropped goes into `retired` as their endpoint's egress drops."""
        if not desired.owners and not desired.chains[bridge.L2_CHAIN]:
            # No bridged pod: touch the bridge family only to remove what an earlier run left.
            if self.committed == [] or not kernel.bridge_tool_available():
                return
            table = kernel.read_bridge_table()
            script = bridge.teardown_script(table)
            if script:
                kernel.restore_bridge_table(script)
            kernel.delete_arp_guard()
            self.owners, self.committed = {}, []
            return
        if not kernel.bridge_tool_available():
            raise PermanentDataplaneError(
                "bridged pods need ebtables-nft-restore (Debian's iptables package) for their layer-2 rules"
            )
        if not kernel.nft_available():
            raise PermanentDataplaneError(
                "bridged pods need nft (Debian's nftables package) for the ARP length check of their"
                " layer-2 rules"
            )
        table = kernel.read_bridge_table()
        stale = [c for c in bridge.ours(table) if c not in desired.chains]
        if (
            not stale
            and self.committed == desired.chains[bridge.L2_CHAIN]
            and all(c in table.chains for c in desired.chains)
            and bridge.hooks_in_place(table)
            and kernel.arp_guard_present()
        ):
            return
        # The guard first: a chain dropping marked ARP is only as good as the marks.
        kernel.write_arp_guard(bridge.ARP_GUARD)
        stale_owners = {c: self.owners[c] for c in stale if c in self.owners}
        for key, (packets, byte_count) in bridge.drops(table, stale_owners).items():
            tally = retired.setdefault((key, EGRESS), Tally())
            tally.denied_packets += packets
            tally.denied_bytes += byte_count
        kernel.restore_bridge_table(bridge.commit_script(desired, table))
        self.owners = dict(desired.owners)
        self.committed = list(desired.chains[bridge.L2_CHAIN])

    def repair(self) -> list[str]:
        """The layer-2 jump first in PREROUTING again, where podfence put one."""
        if not (self.owners or self.committed):
            return []
        repaired = []
        if not kernel.arp_guard_present():
            kernel.write_arp_guard(bridge.ARP_GUARD)
            repaired.append(f"bridge {bridge.ARP_GUARD_TABLE}")
        script = bridge.hooks_script(kernel.read_bridge_table())
        if script:
            kernel.restore_bridge_table(script)
            repaired.append(f"bridge {bridge.L2_HOOKS[0]}")
        return repaired

    def repair_chains(self, desired: bridge.BridgeRules) -> list[verify.Drift]:
        """The chains of the last commit rewritten where someone emptied or edited them (the state
        check, verify.py); returns what was found."""
        if not self.committed:  # no bridged pod: nothing of ours to check
            return []
        found, script = verify.chain_repair(
            kernel.read_bridge_table(), desired.chains, "bridge_chain", "", "nat", "RETURN"
        )
        if script:
            kernel.restore_bridge_table(script)
        return found

    def drops(self) -> dict[str, tuple[int, int]]:
        """(packets, bytes) dropped at layer 2 per endpoint key."""
        if not self.owners:
            return {}
        return bridge.drops(kernel.read_bridge_table(), self.owners)

    def teardown(self) -> None:
        if kernel.bridge_tool_available():  # without the tool nothing of ours can be there
            script = bridge.teardown_script(kernel.read_bridge_table())
            if script:
                kernel.restore_bridge_table(script)
            kernel.delete_arp_guard()
        self.owners, self.committed = {}, None
