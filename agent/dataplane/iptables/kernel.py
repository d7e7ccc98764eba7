"""The iptables dataplane's kernel I/O: read back what is programmed, write it in batches.

Reads use `iptables-legacy-save -c` / `ipset save`, whose text is exactly what the kernel holds
(restart adopts it: the kernel is the truth). Writes of podfence's own chains go through
`iptables-legacy-restore --noflush`: one commit replaces the whole legacy table in a single
setsockopt, so every chain built and every jump swapped in it becomes visible at once, and
other software's rules in the table are carried over untouched. The two hook rules podfence puts
into built-in chains are inserted and removed one by one with python-iptables (libiptc), the
library built for exactly that. Sets are written with `ipset restore` (create a temporary set,
fill it, `swap`), so a set's members change in one step too.

python-iptables and the *-legacy tools both drive x_tables (not nf_tables): `iptables-legacy-save`
shows podfence's rules; Debian's default `iptables` (nft) does not.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field

from agent.dataplane import xtables
from agent.dataplane.base import PermanentDataplaneError, TemporaryDataplaneError
from agent.dataplane.iptables.bridge import ARP_GUARD_TABLE
from agent.dataplane.iptables.layout import (
    CHAIN_PREFIX,
    COMMENT_PREFIX,
    FIXED_CHAINS,
    FROM_POD_CHAIN,
    FROM_POD_DROPS,
    HOOK,
    SET_PREFIX,
    canonical_member,
)

log = logging.getLogger(__name__)

_BRIDGE_SAVE = "ebtables-nft-save"  # not -legacy: see bridge.py
_BRIDGE_RESTORE = "ebtables-nft-restore"
_TEMPORARY_HINTS = ("Resource temporarily unavailable", "Another app is currently holding the xtables lock")
_COMMENT = re.compile(r'--comment (?:"((?:[^"\\]|\\.)*)"|(\S+))')
_TARGET = re.compile(r"\s-[gj] (\S+)")
_MATCH_SET = re.compile(r"--match-set (\S+)")


@dataclass(frozen=True)
class Rule:
    chain: str
    spec: str  # the text after "-A <chain> "
    packets: int
    bytes: int

    @functools.cached_property  # asked for every rule by several passes of one apply
    def comment(self) -> str:
        match = _COMMENT.search(self.spec)
        if match is None:
            return ""
        return match.group(1) if match.group(1) is not None else match.group(2)

    @functools.cached_property
    def target(self) -> str:
        match = _TARGET.search(" " + self.spec)
        return match.group(1) if match else ""


def matched_sets(spec: str) -> list[str]:
    """The ipsets a rule spec matches against."""
    return _MATCH_SET.findall(spec)


@dataclass
class SavedTable:
    """One table as its *-save tool prints it: chains, and rules with their counters."""

    chains: set[str] = field(default_factory=set)
    rules: list[Rule] = field(default_factory=list)
    # The rules by chain, built on the first chain_rules after `rules` grew: the state check
    # asks for every endpoint chain's rules, and a scan of the whole table per chain made it
    # quadratic (10,000 chains: ~10 s of CPU, the dataplane's lock held all along).
    _by_chain: dict[str, list[Rule]] = field(default_factory=dict, init=False, repr=False, compare=False)
    _indexed: int = field(default=0, init=False, repr=False, compare=False)

    def chain_rules(self, chain: str) -> list[Rule]:
        if self._indexed != len(self.rules):
            by_chain: dict[str, list[Rule]] = {}
            for rule in self.rules:
                by_chain.setdefault(rule.chain, []).append(rule)
            self._by_chain, self._indexed = by_chain, len(self.rules)
        return list(self._by_chain.get(chain, ()))

    def read(self, saved: str, name: str) -> None:
        """Take the chains and rules of table `name` from `saved` (the tool run with -c)."""
        in_table = False
        for line in saved.splitlines():
            if line.startswith("*"):
                in_table = line == f"*{name}"
            elif not in_table or line.startswith("#") or line == "COMMIT":
                continue
            elif line.startswith(":"):
                self.chains.add(line[1:].split(" ", 1)[0])
            elif line.startswith("["):
                counters, _, rest = line.partition("] ")
                packets, _, byte_count = counters[1:].partition(":")
                _, chain, spec = (rest + " ").split(" ", 2)  # "-A <chain> <spec>"
                self.rules.append(Rule(chain, spec.strip(), int(packets), int(byte_count)))


class BridgeTable(SavedTable):
    """The bridge family's nat table (ebtables-nft-save), where podfence's layer-2 chains live."""


class FilterTable(SavedTable):
    """The filter table of one family as the kernel holds it."""


@dataclass(frozen=True)
class KernelSet:
    name: str
    kind: str
    family: int
    maxelem: int
    members: frozenset[str]


def _run(argv: list[str], stdin: str | None = None) -> str:
    try:
        done = subprocess.run(argv, input=stdin, capture_output=True, text=True, check=False, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise TemporaryDataplaneError(f"{argv[0]} could not run: {exc}") from exc
    if done.returncode != 0:
        message = f"{shlex.join(argv)} failed ({done.returncode}): {done.stderr.strip()}"
        if any(hint in done.stderr for hint in _TEMPORARY_HINTS):
            raise TemporaryDataplaneError(message)
        raise PermanentDataplaneError(message)
    return done.stdout


def read_filter_table(family: int) -> FilterTable:
    table = FilterTable()
    table.read(_run([xtables.SAVE[family], "-c", "-t", "filter"]), "filter")
    return table


def restore_filter_table(family: int, script: str) -> None:
    """Commit `script` (a "*filter ... COMMIT" block) into the kernel in one atomic table swap."""
    log.debug("restore ipv%d:\n%s", family, script)
    _run([xtables.RESTORE[family], "--noflush", "--wait", "--counters"], stdin=script)


def commit_script(table: FilterTable, chains: dict[str, list[str]], new: list[str], stale: list[str]) -> str:
    """The `iptables-restore --noflush` script of one family's commit: the fixed chains rewritten
    from `chains`, the `new` endpoint chains built, the `stale` ones deleted, in one table swap."""
    # Flushing PF-FROM would zero its drop counters: write them back with the rules.
    drop_counters = {
        r.comment: (r.packets, r.bytes)
        for r in table.chain_rules(FROM_POD_CHAIN)
        if r.comment.startswith(FROM_POD_DROPS)
    }
    lines = ["*filter", *(f":{c} - [0:0]" for c in (*FIXED_CHAINS, *new, *stale))]
    for chain in (*FIXED_CHAINS, *new):
        for spec in chains[chain]:
            prefix = ""
            if chain == FROM_POD_CHAIN and any(f'"{p} ' in spec for p in FROM_POD_DROPS):
                comment = spec.split('--comment "', 1)[1].split('"', 1)[0]
                packets, byte_count = drop_counters.get(comment, (0, 0))
                prefix = f"[{packets}:{byte_count}] "
            lines.append(f"{prefix}-A {chain} {spec}")
    lines += [f"-X {c}" for c in stale]
    return "\n".join([*lines, "COMMIT", ""])


def read_sets() -> dict[str, KernelSet]:
    """podfence's ipsets (by their prefix); other software's sets are not even parsed."""
    headers: dict[str, tuple[str, int, int]] = {}
    members: dict[str, set[str]] = {}
    for line in _run(["ipset", "save"]).splitlines():
        words = line.split()
        if len(words) < 3 or not words[1].startswith(SET_PREFIX):
            continue
        if words[0] == "create":
            options = dict(zip(words[3::2], words[4::2], strict=False))
            family = 6 if options.get("family") == "inet6" else 4
            headers[words[1]] = (words[2], family, int(options.get("maxelem", "65536")))
            members.setdefault(words[1], set())
        elif words[0] == "add":
            members.setdefault(words[1], set()).add(canonical_member(" ".join(words[2:])))
    return {
        name: KernelSet(name, kind, family, maxelem, frozenset(members.get(name, ())))
        for name, (kind, family, maxelem) in headers.items()
    }


def restore_sets(script: str) -> None:
    if script:
        log.debug("ipset restore:\n%s", script)
        _run(["ipset", "restore"], stdin=script)


def destroy_sets(names: list[str]) -> None:
    for name in names:
        if not name.startswith(SET_PREFIX):
            raise ValueError(f"refusing to destroy a set podfence does not own: {name}")
        try:
            _run(["ipset", "destroy", name])
        except PermanentDataplaneError as exc:
            # Still referenced (by a rule another process added): leave it for the next sweep.
            log.warning("could not destroy ipset %s: %s", name, exc)


# -- hooks into built-in chains (python-iptables) ------------------------------------------------


def _iptc_tables() -> dict[int, object]:
    # Imported here: loading libxtables is only worth it on a node using this dataplane.
    os.environ.setdefault("XTABLES_LIBDIR", "/usr/lib/x86_64-linux-gnu/xtables")
    import iptc  # type: ignore[import-untyped]

    return {4: iptc.Table(iptc.Table.FILTER), 6: iptc.Table6(iptc.Table6.FILTER)}


def _is_hook(rule: object) -> bool:
    return any(
        m.name == "comment" and str(m.comment).startswith(COMMENT_PREFIX)
        for m in rule.matches  # type: ignore[attr-defined]
    )


def ensure_hooks(family: int, hooks: dict[str, str]) -> None:
    """First rule of each built-in chain: jump to podfence's chain (inserted once, kept after)."""
    import iptc

    table = _iptc_tables()[family]
    try:
        table.refresh()  # type: ignore[attr-defined]
        for builtin, target in hooks.items():
            chain = iptc.Chain(table, builtin)
            if any(_is_hook(r) and r.target.name == target for r in chain.rules):
                continue
            rule = iptc.Rule6() if family == 6 else iptc.Rule()
            rule.create_match("comment").comment = HOOK
            rule.target = iptc.Target(rule, target)
            chain.insert_rule(rule)
    except iptc.IPTCError as exc:
        raise TemporaryDataplaneError(f"cannot hook podfence into the ipv{family} filter table") from exc


def hooks_first_script(table: FilterTable, hooks: dict[str, str]) -> str:
    """The iptables-restore script that makes each hook the FIRST rule of its built-in chain
    again ("" when every hook is first already). A rule another tool inserted above ours would
    decide for pods' packets before podfence does (an ACCEPT lets them escape policy).

    Ours are deleted by their exact spec and one is inserted at the top in the same commit, so
    there is no moment without the hook, and no other rule is touched. Should a hook vanish
    between the read and the commit, the delete fails and the whole commit with it."""
    lines: list[str] = []
    for builtin, target in hooks.items():
        rules = table.chain_rules(builtin)
        ours = [i for i, r in enumerate(rules) if r.comment == HOOK and r.target == target]
        if ours == [0]:
            continue
        spec = f'-m comment --comment "{HOOK}" -j {target}'
        lines += [f"-D {builtin} {spec}" for _ in ours]
        lines.append(f"-I {builtin} 1 {spec}")
    return "\n".join(["*filter", *lines, "COMMIT", ""]) if lines else ""


def remove_hooks(family: int) -> None:
    import iptc

    table = _iptc_tables()[family]
    try:
        table.refresh()  # type: ignore[attr-defined]
        for builtin in ("INPUT", "FORWARD", "OUTPUT"):
            chain = iptc.Chain(table, builtin)
            for rule in list(chain.rules):
                if _is_hook(rule) or rule.target.name.startswith(CHAIN_PREFIX):
                    chain.delete_rule(rule)
    except iptc.IPTCError as exc:
        raise TemporaryDataplaneError(f"cannot unhook podfence from the ipv{family} filter table") from exc


# -- other kernel knobs ------------------------------------------------------------------------------


def forget_connections(addresses: list[str]) -> None:
    """Delete the conntrack entries of every protocol from or to these addresses or networks
    ("10.1.0.7", "fd00::/64"), so the next packet of each flow is judged as new.

    A host address is matched on both tuples: the reply tuple is where a pod reached through a
    ClusterIP (DNAT: the original destination is the service address) or a NodePort appears.
    conntrack takes CIDR notation for the original tuple only, so a network is matched there."""
    for address in addresses:
        network = ipaddress.ip_network(address, strict=False)
        family = f"ipv{network.version}"
        flags: tuple[str, ...]
        if network.prefixlen == network.max_prefixlen:
            text = str(network.network_address)
            flags = ("--orig-src", "--orig-dst", "--reply-src", "--reply-dst")
        else:
            text, flags = str(network), ("--orig-src", "--orig-dst")
        for flag in flags:
            argv = ["conntrack", "-D", "-f", family, flag, text]
            try:
                # Exit status 1 means "nothing matched": not an error here.
                subprocess.run(argv, capture_output=True, check=False, timeout=30)
            except (OSError, subprocess.TimeoutExpired) as exc:
                # The policy is in place already; only old connections outlive it. Say so loudly.
                log.error("could not reset connections of %s: %s", address, exc)


def bridge_tool_available() -> bool:
    return shutil.which(_BRIDGE_SAVE) is not None and shutil.which(_BRIDGE_RESTORE) is not None


def read_bridge_table() -> BridgeTable:
    table = BridgeTable()
    table.read(_run([_BRIDGE_SAVE, "-c", "-t", "nat"]), "nat")
    return table


def restore_bridge_table(script: str) -> None:
    """Commit `script` (a "*nat ... COMMIT" block) into the bridge family: one nf_tables transaction."""
    log.debug("restore bridge:\n%s", script)
    _run([_BRIDGE_RESTORE, "--noflush"], stdin=script)


_NFT = "nft"  # Debian's nftables package: podfence's ARP guard table (bridge.ARP_GUARD)


def nft_available() -> bool:
    return shutil.which(_NFT) is not None


def arp_guard_present() -> bool:
    """Is podfence's ARP guard table there (as it was written: nobody else edits it)?"""
    done = subprocess.run(
        [_NFT, "list", "table", "bridge", ARP_GUARD_TABLE],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    return done.returncode == 0 and "chain arp-length" in done.stdout


def write_arp_guard(script: str) -> None:
    """Replace podfence's ARP guard table by `script` (bridge.ARP_GUARD): one nf_tables transaction."""
    table = f"table bridge {ARP_GUARD_TABLE}"
    _run([_NFT, "-f", "-"], stdin=f"{table}\ndelete {table}\n{script}")


def delete_arp_guard() -> None:
    if nft_available() and arp_guard_present():
        _run([_NFT, "delete", "table", "bridge", ARP_GUARD_TABLE])
