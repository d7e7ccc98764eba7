"""`podfence demo`: Istio's bookinfo on the node lab, before and after a security team's policies.

The demo builds two simulated nodes with the bookinfo pods (mesh ingress, productpage, details,
reviews v1/v2/v3, ratings), a cluster DNS pod and a client standing for the outside world; starts
the control service and one agent per node; prints the TCP/UDP/ICMP reachability matrix with no
policy, applies the policies in agent/lab/bookinfo/*.yaml, and prints it again against the
application graph. It then derives the same graph's policies twice (agent.lab.demo_derive): from
bookinfo's Istio configuration (`podfence derive`), and from the connections it has just seen
succeed (`podfence suggest`); each set is checked with the reference evaluator, enforced instead,
and the matrix probed again: the same cells must hold. Then the ingress pod is "compromised":
as root in its own netns (it holds CAP_NET_ADMIN there) it flushes its iptables, tc and routes,
re-adds a route and changes its IP, and must still fail to reach ratings, because the filters sit
on the node side of its veth.

Exit 0 only if every expectation held. Everything is removed afterwards, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import importlib
import ipaddress
import os
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from types import FrameType
from typing import Any

import yaml

from agent.lab import demo_derive, demo_observe
from agent.lab.cluster import DATAPLANES, PodfenceOnLab
from agent.lab.dns import service_name
from agent.lab.machine import DEFAULT_LOCK_WAIT_S, LabError, teardown
from agent.lab.prober import Probe, TruthTable, resolve, run_probes
from agent.lab.scenarios import pods_from_file
from agent.lab.topology import CniMode, Lab, LabPod, run_in_netns
from agent.lab.wiring import GATEWAY as ROUTED_GATEWAY
from agent.model.load import parse_object
from agent.model.objects import NetworkPolicy

EXIT_OK, EXIT_FAILURE = 0, 1
PROBE_TIMEOUT = 0.8
SHORT_NAMES = {"istio-ingressgateway": "ingress"}


@dataclass(frozen=True)
class Column:
    """One matrix column: a destination pod and a port/protocol on it (port 0 for ICMP)."""

    pod: str  # short name
    port: int
    protocol: str

    @property
    def label(self) -> str:
        if self.protocol == "ICMP":
            return self.pod
        suffix = "" if self.protocol == "TCP" else "/" + self.protocol.lower()
        return f"{self.pod}:{self.port}{suffix}"


def short_name(pod: LabPod) -> str:
    return SHORT_NAMES.get(pod.spec.name, pod.spec.name)


def bookinfo_files() -> Iterator[tuple[str, str]]:
    """(file name, text) of the demo's package data: the pods and the policies, in order."""
    folder = resources.files("agent.lab").joinpath("bookinfo")
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".yaml"):
            yield entry.name, entry.read_text()


def admin_documents(name: str) -> list[dict[str, Any]]:
    """The documents of one file of the cluster administrator's story (agent/lab/admin/: beside
    bookinfo/, whose folder holds the application's own policies only)."""
    text = resources.files("agent.lab").joinpath("admin", name).read_text()
    return [d for d in yaml.safe_load_all(text) if d]


# The application graph: who must reach what once the policies are in (everything else is blocked).
APP_GRAPH = {
    ("client", "ingress:80"),
    ("client", "ingress:443"),
    ("ingress", "productpage:9080"),
    ("productpage", "details:9080"),
    *(("productpage", f"reviews-{v}:9080") for v in ("v1", "v2", "v3")),
    *((f"reviews-{v}", "ratings:9080") for v in ("v1", "v2", "v3")),
}
SOURCES = ["client", "ingress", "productpage", "details", "reviews-v1", "reviews-v2", "reviews-v3", "ratings"]
SERVICE_COLUMNS = [
    Column("ingress", 80, "TCP"),
    Column("ingress", 443, "TCP"),
    Column("ingress", 15000, "TCP"),
    Column("productpage", 9080, "TCP"),
    Column("details", 9080, "TCP"),
    *(Column(f"reviews-{v}", 9080, "TCP") for v in ("v1", "v2", "v3")),
    Column("ratings", 9080, "TCP"),
    Column("dns", 53, "UDP"),
]
ICMP_COLUMNS = [Column(name, 0, "ICMP") for name in ["ingress", "productpage", "details", "ratings", "dns"]]


def expected_table(columns: list[Column], policies_applied: bool) -> TruthTable:
    table = TruthTable(SOURCES, [c.label for c in columns])
    for source in SOURCES:
        for column in columns:
            if column.pod == source:
                table.ignored.add((source, column.label))
            allowed = (source, column.label) in APP_GRAPH or (
                column.pod == "dns" and column.protocol == "UDP"
            )
            table.cells[(source, column.label)] = allowed if policies_applied else True
    return table


class Demo:
    def __init__(
        self, mode: CniMode, dataplane: str, workdir: Path, lock_wait: float = DEFAULT_LOCK_WAIT_S
    ) -> None:
        self.lock_wait = lock_wait
        self.lab = Lab(node_count=2, mode=mode)
        self.workdir = workdir
        self.podfence = PodfenceOnLab(self.lab, dataplane, source_dir=workdir / "source", log_dir=workdir)
        self.failures: list[str] = []

    def pod(self, short: str) -> LabPod:
        return next(p for p in self.lab.pods.values() if short_name(p) == short)

    def probe(self, cells: list[tuple[str, Column]]) -> dict[tuple[str, str], bool]:
        """Whether each (source, column) connects, all probed at once: a blocked cell costs one
        probe timeout, however many there are."""
        probes = {}
        for source, column in cells:
            src, dst = self.pod(source), self.pod(column.pod)
            address = dst.ip if column.protocol == "ICMP" else dst.service_ip
            probes[(source, column.label)] = Probe(
                source, src.netns, column.label, address, column.port, column.protocol
            )
        verdicts = run_probes(list(probes.values()), timeout=PROBE_TIMEOUT)
        return {cell: verdicts[probe] for cell, probe in probes.items()}

    def observe(self, matrices: list[list[Column]], sources: list[str] = SOURCES) -> list[TruthTable]:
        """One table per list of columns, probed together."""
        cells = [(s, c) for columns in matrices for s in sources for c in columns if c.pod != s]
        verdicts = self.probe(cells)
        tables = []
        for columns in matrices:
            table = TruthTable(sources, [c.label for c in columns])
            for source in sources:
                for column in columns:
                    cell = (source, column.label)
                    table.cells[cell] = verdicts.get(cell, True)
                    if cell not in verdicts:
                        table.ignored.add(cell)
            tables.append(table)
        return tables

    def check_matrices(
        self, matrices: list[tuple[str, list[Column]]], policies_applied: bool
    ) -> list[TruthTable]:
        """Probe each (title, columns) matrix, all at once; print each and note every mismatch."""
        observed = self.observe([columns for _, columns in matrices])
        for (title, columns), table in zip(matrices, observed, strict=True):
            expected = expected_table(columns, policies_applied)
            print(table.render(f"{title} (rows: from, columns: to; . reachable, X blocked)"))
            for source, target, want, got in expected.differences(table):
                verdict = (
                    f"expected {'reachable' if want else 'blocked'}, got {'reachable' if got else 'blocked'}"
                )
                self.failures.append(f"{title}: {source} -> {target}: {verdict}")
                print(f"  MISMATCH {source} -> {target}: {verdict}")
            print()
        return observed

    def check_matrix(self, title: str, columns: list[Column], policies_applied: bool) -> TruthTable:
        return self.check_matrices([(title, columns)], policies_applied)[0]

    def expect(self, *checks: tuple[str, str, Column, bool]) -> None:
        """Each check (description, source, column, reachable?), probed at once, printed in order."""
        got = self.probe([(source, column) for _, source, column, _ in checks])
        for description, source, column, reachable in checks:
            seen = got[(source, column.label)]
            ok = seen == reachable
            print(f"  [{'ok' if ok else 'FAIL'}] {description}: {'reachable' if seen else 'blocked'}")
            if not ok:
                self.failures.append(f"{description}: expected {'reachable' if reachable else 'blocked'}")

    def build(self) -> None:
        pods_text = dict(bookinfo_files())["pods.yaml"]
        (self.workdir / "pods.yaml").write_text(pods_text)
        started = time.monotonic()
        self.lab.build(
            pods_from_file(self.workdir / "pods.yaml", node_count=2), lock_wait_seconds=self.lock_wait
        )
        print(
            f"lab: 2 nodes ({self.lab.mode.value} CNI), {len(self.lab.pods)} pods, "
            f"built in {time.monotonic() - started:.1f} s"
        )
        started = time.monotonic()
        self.podfence.start()
        print(
            f"podfence: control service on {self.podfence.control_address}, "
            f"agents on node1 and node2 ({self.podfence.dataplane} dataplane), ready in "
            f"{time.monotonic() - started:.1f} s\n"
        )

    def apply_policies(self) -> None:
        version = self.podfence.current_version()
        documents: list[dict[str, Any]] = []
        for name, text in bookinfo_files():
            if name != "pods.yaml":
                documents += [d for d in yaml.safe_load_all(text) if d]
        self.podfence.write_documents("policies.yaml", documents)
        applied = self.podfence.wait_applied(after_version=version)
        names = ", ".join(f"{d['metadata']['namespace']}/{d['metadata']['name']}" for d in documents)
        print(f"applied {len(documents)} policies (version {applied} acknowledged by every node): {names}\n")

    def hand_written(self) -> list[NetworkPolicy]:
        return [
            obj
            for name, text in bookinfo_files()
            if name != "pods.yaml"
            for doc in yaml.safe_load_all(text)
            if doc and isinstance(obj := parse_object(doc), NetworkPolicy)
        ]

    def enforce(self, what: str, documents: list[dict[str, Any]], lines: list[str], ok: bool) -> None:
        """Prints the derivation's summary and replaces the policies in force with `documents`."""
        print("\n".join(lines))
        if not ok:
            self.failures.append(f"{what} policies deny what they were derived from")
        version = self.podfence.current_version()
        self.podfence.write_documents("policies.yaml", documents)
        applied = self.podfence.wait_applied(after_version=version)
        print(f"applied the {len(documents)} {what} policies instead (version {applied})\n")

    def check_dns(self) -> None:
        """Name resolution through the DNS policy: every pod may ask the lab's cluster DNS."""
        dns_pod, details = self.pod("dns"), self.pod("details")
        name = service_name(details.spec.namespace, details.spec.name)
        for source in ("productpage", "ingress"):
            answer = resolve(self.pod(source).netns, dns_pod.service_ip, name, timeout=PROBE_TIMEOUT)
            ok = answer == [details.service_ip]
            print(f"  [{'ok' if ok else 'FAIL'}] {source} resolves {name} via DNS: {answer}")
            if not ok:
                self.failures.append(f"{source} could not resolve {name} (got {answer})")
        print()

    def admin_guardrails(self) -> None:
        """ClusterNetworkPolicy: an Admin-tier Deny that a namespace's allow-all cannot override,
        and a Baseline-tier default deny that a namespace's own NetworkPolicy opens for its pods."""
        print("namespace owners and the cluster admin (agent/lab/admin/):")
        self.change("  the owner of istio-system allows everything into the gateway",
                    {"admin-gateway.yaml": "gateway-owner.yaml"})
        self.expect(("client -> ingress:15000 (opened by the owner)", "client",
                     Column("ingress", 15000, "TCP"), True))
        self.change(
            "  Admin tier: no proxy admin port, no metadata address; Baseline: 'outside' opens nothing",
            {"admin-guardrails.yaml": "guardrails.yaml"},
        )
        self.expect(
            ("client -> ingress:15000 (the Admin Deny beats the owner's allow-all)", "client",
             Column("ingress", 15000, "TCP"), False),
            ("client -> ingress:80 (Baseline default deny for 'outside')", "client",
             Column("ingress", 80, "TCP"), False),
        )
        self.change(
            "  the owner of 'outside' allows its client's egress",
            {"admin-outside.yaml": "outside-owner.yaml"},
        )
        self.expect(
            ("client -> ingress:80 (its namespace's policy takes over from Baseline)", "client",
             Column("ingress", 80, "TCP"), True),
            ("client -> ingress:15000 still (Admin)", "client", Column("ingress", 15000, "TCP"), False),
        )
        self.change("  back to the application's policies alone",
                    dict.fromkeys(("admin-gateway.yaml", "admin-guardrails.yaml", "admin-outside.yaml")))
        print()

    def audit_rollout(self) -> None:
        """An audit (staged) policy is evaluated, not enforced: the connection it would deny still
        passes, and `podfence observe` shows it as audit-denied, naming the policy and rule."""
        print("staging a guardrail in audit mode, then reading the flows (podfence observe):")
        self.change("  Admin tier, annotated podfence.io/mode: audit: no plain HTTP from 'outside'",
                    {"admin-staged.yaml": "staged-http.yaml"})
        self.expect(("client -> ingress:80 (the staged Deny changes no fate)", "client",
                     Column("ingress", 80, "TCP"), True))
        policy = "staged-no-plain-http"
        records = demo_observe.observed(self.podfence.control_address, "--verdict", "audit-denied",
                                        "--policy", policy)
        for record in records[-2:]:
            print(f"    {demo_observe.one_line(record)}")
        ok = any(r["rule"] == "no-http-to-gateway" and r["source"]["pod"] == "client" for r in records)
        print(f"  [{'ok' if ok else 'FAIL'}] podfence observe --verdict audit-denied: client -> ingress:80 "
              f"by {policy}")
        if not ok:
            self.failures.append(f"no audit-denied flow record of client -> ingress:80 naming {policy}")
        self.change("  back to the application's policies alone", {"admin-staged.yaml": None})
        print()

    def change(self, what: str, files: dict[str, str | None]) -> None:
        """Write each source file from agent/lab/admin/ (None: remove it), then wait for every node."""
        version = self.podfence.current_version()
        for target, source in files.items():
            if source is None:
                self.podfence.remove_file(target)
            else:
                self.podfence.write_documents(target, admin_documents(source))
        print(f"{what} (version {self.podfence.wait_applied(after_version=version)})")

    def compromise_ingress(self) -> None:
        ingress = self.pod("ingress")
        node = self.lab.nodes[ingress.spec.node]
        print("compromised ingress pod: root with CAP_NET_ADMIN in its own network namespace")
        commands = [
            ["iptables", "-F"],
            ["iptables", "-t", "nat", "-F"],
            ["iptables", "-t", "mangle", "-F"],
            ["tc", "qdisc", "del", "dev", "eth0", "clsact"],
            ["tc", "qdisc", "del", "dev", "eth0", "root"],
            ["ip", "route", "flush", "table", "main"],
        ]
        if self.lab.mode is CniMode.ROUTED:
            gateway = ROUTED_GATEWAY
            commands.append(["ip", "route", "add", f"{gateway}/32", "dev", "eth0", "scope", "link"])
        else:
            gateway = str(ipaddress.ip_network(node.pod_cidr).network_address + 1)
            commands.append(["ip", "route", "add", node.pod_cidr, "dev", "eth0"])
        commands.append(["ip", "route", "add", "default", "via", gateway, "dev", "eth0"])
        for argv in commands:
            result = run_in_netns(ingress.netns, argv, check=False)
            note = "" if result.returncode == 0 else f"   ({result.stderr.strip() or 'nothing to remove'})"
            print(f"  # {' '.join(argv)}{note}")
        self.expect(
            ("ingress -> ratings:9080 after flushing its own rules", "ingress",
             Column("ratings", 9080, "TCP"), False),
            ("ingress -> productpage:9080 (its network still works)", "ingress",
             Column("productpage", 9080, "TCP"), True),
            ("ingress -> ratings ICMP", "ingress", Column("ratings", 0, "ICMP"), False),
        )
        spoofed = str(ipaddress.ip_network(node.pod_cidr).network_address + 250)
        for argv in (
            ["ip", "addr", "flush", "dev", "eth0"],
            [
                "ip",
                "addr",
                "add",
                f"{spoofed}/{32 if self.lab.mode is CniMode.ROUTED else 24}",
                "dev",
                "eth0",
            ],
            *commands[-2:],
        ):
            run_in_netns(ingress.netns, argv, check=False)
            print(f"  # {' '.join(argv)}")
        self.expect(
            (f"ingress as {spoofed} -> ratings:9080", "ingress", Column("ratings", 9080, "TCP"), False),
            ("client -> ingress:15000 (Envoy admin) still", "client", Column("ingress", 15000, "TCP"), False),
        )
        print()

    def run(self) -> int:
        self.build()
        self.check_matrices(
            [("BEFORE policies: TCP/UDP through Service ClusterIPs", SERVICE_COLUMNS),
             ("BEFORE policies: ICMP echo to pod IPs", ICMP_COLUMNS)],
            False,
        )
        self.apply_policies()
        after, _ = self.check_matrices(
            [("AFTER policies: TCP/UDP through Service ClusterIPs", SERVICE_COLUMNS),
             ("AFTER policies: ICMP echo to pod IPs", ICMP_COLUMNS)],
            True,
        )
        self.check_dns()
        self.admin_guardrails()
        self.audit_rollout()
        # The same application graph twice more: derived from bookinfo's Istio configuration, then
        # suggested from the connections just seen. TCP/UDP only: both leave kube-system to its
        # owners, so ICMP to the DNS pod, which the hand-written dns-only policy blocks, stays open.
        self.enforce("derived", *demo_derive.derived(self.hand_written()))
        self.check_matrix("AFTER derived policies: TCP/UDP through Service ClusterIPs", SERVICE_COLUMNS, True)
        columns = {c.label: (c.pod, c.port, c.protocol) for c in SERVICE_COLUMNS}
        records = demo_derive.flow_records(after, self.pod, columns)
        self.enforce("suggested", *demo_derive.suggested(records, self.podfence.source_dir))
        self.check_matrix(
            "AFTER suggested policies: TCP/UDP through Service ClusterIPs", SERVICE_COLUMNS, True
        )
        self.compromise_ingress()
        if self.failures:
            print(f"demo FAILED: {len(self.failures)} expectation(s) did not hold:")
            for failure in self.failures:
                print(f"  - {failure}")
            return EXIT_FAILURE
        print("demo passed: every expectation held")
        return EXIT_OK


def choose_dataplane(requested: str) -> str:
    if requested != "auto":
        return requested
    try:
        bpf = importlib.import_module("agent.dataplane.bpf")
        if hasattr(bpf, "BpfDataplane"):
            return "bpf"
        reason = "agent.dataplane.bpf has no BpfDataplane"
    except ImportError as err:
        reason = str(err)
    print(f"bpf dataplane not available ({reason}): using iptables")
    return "iptables"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mode", choices=[m.value for m in CniMode], default=CniMode.ROUTED.value)
    parser.add_argument(
        "--dataplane",
        choices=["auto", *DATAPLANES],
        default="auto",
        help="auto: bpf where its dataplane is available, else iptables (default %(default)s)",
    )
    parser.add_argument("--keep-logs", type=Path, help="copy control/agent logs to this folder")
    parser.add_argument(
        "--lock-wait",
        type=float,
        default=DEFAULT_LOCK_WAIT_S,
        help="seconds to wait while another process uses the lab (default %(default)s)",
    )


def run(args: argparse.Namespace) -> int:
    demo_pid = os.getpid()

    def interrupt(signum: int, frame: FrameType | None) -> None:
        if os.getpid() != demo_pid:
            # pyroute2 forks helpers to create namespaces and stops them with SIGTERM; a helper must
            # just die, never run the demo's cleanup (which would delete the lab being built).
            os._exit(128 + signum)
        raise KeyboardInterrupt  # SIGTERM cleans up the same way as Ctrl-C

    signal.signal(signal.SIGTERM, interrupt)
    started = time.monotonic()
    try:
        teardown(args.lock_wait)  # leftovers of an earlier, killed run
    except LabError as err:
        print(f"podfence demo: {err}", file=sys.stderr)
        return EXIT_FAILURE
    with tempfile.TemporaryDirectory(prefix="podfence-demo-") as workdir:
        demo = Demo(CniMode(args.mode), choose_dataplane(args.dataplane), Path(workdir), args.lock_wait)
        try:
            return demo.run()
        except LabError as err:
            print(f"podfence demo: {err}", file=sys.stderr)
            return EXIT_FAILURE
        except KeyboardInterrupt:
            print("podfence demo: interrupted, cleaning up", file=sys.stderr)
            return EXIT_FAILURE
        finally:
            if os.getpid() != demo_pid:
                os._exit(1)  # an interrupted forked helper (see `interrupt`): not ours to clean up
            demo.podfence.stop()
            if args.keep_logs:
                args.keep_logs.mkdir(parents=True, exist_ok=True)
                for log_file in Path(workdir).glob("*.log"):
                    (args.keep_logs / log_file.name).write_bytes(log_file.read_bytes())
            teardown(args.lock_wait)
            print(f"cleaned up; demo took {time.monotonic() - started:.1f} s")
