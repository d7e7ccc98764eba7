"""`podfence agent`: the node agent — gRPC stream in, kernel filters out.

Wiring, in start order: the dataplane (adopting what a previous run pinned, so enforcement never
pauses), interface discovery and the reconcile loop, the netlink monitor, the metrics server,
the sync client, and the flow feed (flow records to the deny log and podfence_flows_total).
SIGTERM/SIGINT stop the threads and release user-space resources; the kernel keeps enforcing the
last programmed state (a restart or upgrade adopts it).

Exit codes: 0 after a clean stop, 1 on a runtime failure (e.g. BPF unavailable: the message says
which capability is missing), 2 on bad usage.
"""

from __future__ import annotations

import argparse
import gc
import logging
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from prometheus_client import CollectorRegistry

from agent.dataplane.base import (
    Adopting,
    ConntrackReleasing,
    DataplaneError,
    DenyEventSource,
    EgressHookReporting,
    HookRepairing,
)
from agent.dataplane.flows import FlowRecordSource
from agent.dataplane.iptables.flowrecords import DEFAULT_NFLOG_GROUP
from agent.dataplane.types import NodeState, audit_everything_state
from agent.metrics_http import start_metrics_server
from agent.node.build import BPF_MAP_SIZE_FLAGS, bpffs_mount_of, build_dataplane, generation_file
from agent.node.ctrelease import ConntrackReleaser
from agent.node.flowbuffer import DEFAULT_CAPACITY as DEFAULT_FLOW_BUFFER
from agent.node.flowbuffer import FlowBuffer
from agent.node.flowfeed import FLOW_METRICS_MODES, FlowFeed
from agent.node.flowlog import FlowLogger
from agent.node.hookguard import DEFAULT_INTERVAL_S as DEFAULT_HOOK_CHECK_S
from agent.node.hookguard import HookGuard
from agent.node.interfaces import InterfaceDiscovery
from agent.node.kubeproxy import warn_if_ipvs
from agent.node.metrics import register_agent_metrics
from agent.node.monitor import NetlinkMonitor
from agent.node.reconcile import Reconciler
from agent.node.repair import DEFAULT_INTERVAL_S as DEFAULT_STATE_CHECK_S
from agent.node.repair import StateGuard, StateRepairing
from agent.node.sync import SyncClient

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
THREAD_STOP_S = 10  # how long a stopping agent waits for each worker thread

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--node", required=True, help="this node's name (pods with spec.nodeName == NODE)")
    parser.add_argument(
        "--control",
        required=True,
        metavar="HOST:PORT",
        help="the control service; several replicas as HOST:PORT,HOST:PORT (tried in turn)",
    )
    parser.add_argument("--dataplane", choices=["bpf", "iptables"], default="bpf")
    parser.add_argument(
        "--unknown-endpoints",
        choices=["drop", "allow"],
        default="drop",
        help="traffic of pod interfaces no known pod claims yet (default: drop, fail-closed)",
    )
    parser.add_argument(
        "--established-on-change",
        choices=["keep", "reset"],
        default="keep",
        help="whether connections opened under a previous policy survive a policy change",
    )
    parser.add_argument(
        "--egress-hook",
        choices=["auto", "netfilter", "iptables"],
        default="auto",
        help="bpf: where the egress verdict runs after DNAT: netfilter links (Linux 6.4+), an iptables "
        "xt_bpf rule, or auto (links where the kernel can)",
    )
    parser.add_argument("--pin-dir", default="/sys/fs/bpf/podfence", help="bpffs directory of pinned state")
    parser.add_argument("--metrics-listen", default="0.0.0.0:9301", metavar="HOST:PORT")
    parser.add_argument(
        "--per-pod-metrics", choices=["on", "off"], default="on",
        help="series per pod (namespace, pod labels); off leaves only the node's totals",
    )
    parser.add_argument(
        "--flow-metrics",
        choices=list(FLOW_METRICS_MODES),
        default="verdict",
        help="podfence_flows_total labels: verdict (and direction), policy (also the deciding policy), none",
    )
    parser.add_argument("--tls-cert", help="client certificate (PEM), names this node")
    parser.add_argument("--tls-key", help="client private key (PEM)")
    parser.add_argument("--tls-ca", help="CA bundle that signed the control service's certificate")
    parser.add_argument(
        "--token-file", metavar="FILE",
        help="token identity: this pod's projected service-account token (audience podfence), re-read "
        "for every stream; needs --tls-ca, --tls-cert/--tls-key only if the control service asks for them",
    )
    parser.add_argument(
        "--insecure", action="store_true", help="plaintext gRPC (only on a trusted network, for tests)"
    )
    parser.add_argument(
        "--audit-all",
        action="store_true",
        help="enforce no policy on this node: judge every policy in audit, counting what it would deny "
        "(a trial before enforcing; not fail-closed)",
    )
    parser.add_argument(
        "--uplink",
        action="append",
        default=[],
        metavar="IFNAME",
        help="an extra interface never treated as a pod interface (the default-route one never is)",
    )
    for flag in BPF_MAP_SIZE_FLAGS:
        parser.add_argument(
            f"--map-size-{flag}",
            type=int,
            default=None,
            metavar="N",
            help=f"bpf {flag} map capacity (entries)",
        )
    parser.add_argument(
        "--flows-per-pod",
        type=int,
        default=None,
        metavar="N",
        help="conntrack entries one pod may hold; its new flows beyond are dropped (0: no bound; "
        "default: a quarter of the bpf conntrack map, 16384 connections per address on iptables)",
    )
    parser.add_argument(
        "--event-rate",
        type=int,
        default=None,
        metavar="N",
        help="bpf flow records per second per CPU at most",
    )
    parser.add_argument(
        "--nflog-group",
        type=int,
        default=DEFAULT_NFLOG_GROUP,
        metavar="N",
        help="iptables: the NFLOG group flow records are logged to and read from (1..65535; 0: no "
        "flow records, and no deny log)",
    )
    parser.add_argument(
        "--hook-check-interval",
        type=float,
        default=DEFAULT_HOOK_CHECK_S,
        metavar="SECONDS",
        help="how often the netfilter hooks are checked (and put back first) after other tools' changes",
    )
    parser.add_argument(
        "--generation-file",
        default=None,
        metavar="PATH",
        help="where the enforced source generation survives restarts (default: beside the bpf state "
        "file, /run/podfence/<pin dir name>.enforced-generation; iptables: "
        "/run/podfence/iptables-<node>.enforced-generation)",
    )
    parser.add_argument(
        "--state-check-interval",
        type=float,
        default=DEFAULT_STATE_CHECK_S,
        metavar="SECONDS",
        help="how often the rest of podfence's kernel state (tc filters and qdiscs, pins, chains, "
        "ipsets) is verified and repaired; bpf also checks on every tc change notification",
    )
    parser.add_argument(
        "--flow-buffer", type=int, default=DEFAULT_FLOW_BUFFER, metavar="N",
        help="flow records kept for the control service while they wait for the stream (the newest N; "
        "older ones are dropped and counted)",
    )


class UsageError(Exception):
    pass


def channel_credentials(args: argparse.Namespace) -> grpc.ChannelCredentials | None:
    """TLS credentials, or None for --insecure. Never a silent plaintext fallback.

    Certificate identity needs all three --tls-* files. With --token-file the token names the
    node, and a client certificate is only needed if the control service asks for one."""
    tls = [args.tls_cert, args.tls_key, args.tls_ca]
    token_file = getattr(args, "token_file", None)
    if args.insecure:
        if any(tls):
            raise UsageError("--insecure and --tls-* exclude each other")
        if token_file:
            raise UsageError("--token-file sends a service-account token: it needs --tls-ca, not --insecure")
        return None
    if token_file:
        if not args.tls_ca or bool(args.tls_cert) != bool(args.tls_key):
            raise UsageError("--token-file needs --tls-ca (and --tls-cert with --tls-key, or neither)")
        try:
            Path(token_file).read_text()
        except OSError as exc:
            raise UsageError(f"cannot read --token-file: {exc}") from exc
    elif not all(tls):
        raise UsageError("give --tls-cert, --tls-key and --tls-ca (mutual TLS), or --insecure")
    try:
        return grpc.ssl_channel_credentials(
            root_certificates=Path(args.tls_ca).read_bytes(),
            private_key=Path(args.tls_key).read_bytes() if args.tls_key else None,
            certificate_chain=Path(args.tls_cert).read_bytes() if args.tls_cert else None,
        )
    except OSError as exc:
        raise UsageError(f"cannot read TLS material: {exc}") from exc


def reloading_credentials(
    args: argparse.Namespace, initial: grpc.ChannelCredentials | None
) -> Callable[[], grpc.ChannelCredentials] | None:
    """Reads the TLS files again for each new channel (a rotated Secret); on a read failure (a
    rotation half done) the previous credentials serve, and the next reconnect tries again."""
    if initial is None:
        return None
    current = [initial]

    def load() -> grpc.ChannelCredentials:
        try:
            fresh = channel_credentials(args)
        except UsageError as exc:
            log.warning("cannot re-read the TLS files (%s); using the previous ones", exc)
        else:
            if fresh is not None:
                current[0] = fresh
        return current[0]

    return load


def _audit_all(apply: Callable[[NodeState], None]) -> Callable[[NodeState], None]:
    """`apply` of every state with every policy in audit (agent.dataplane.types.audit_everything)."""

    def apply_in_audit(state: NodeState) -> None:
        apply(audit_everything_state(state))

    return apply_in_audit


def _thread(
    name: str, target: Callable[[], None], failed: threading.Event, stop: threading.Event
) -> threading.Thread:
    """A worker whose crash stops the whole agent (exit 1) instead of leaving it half alive."""

    def guarded() -> None:
        try:
            target()
        except Exception:
            log.exception("%s failed; stopping the agent", name)
            failed.set()
            stop.set()

    thread = threading.Thread(target=guarded, name=name, daemon=True)
    thread.start()
    return thread


def run(args: argparse.Namespace) -> int:
    try:
        credentials = channel_credentials(args)
        if not args.node.strip():
            raise UsageError("--node must not be empty")
        targets = [t.strip() for t in args.control.split(",")]
        if not all(":" in target for target in targets):
            raise UsageError(f"--control must be HOST:PORT or HOST:PORT,HOST:PORT,..., not {args.control!r}")
        if ":" not in args.metrics_listen:
            raise UsageError(f"--metrics-listen must be HOST:PORT, not {args.metrics_listen!r}")
        if not 0.1 <= args.hook_check_interval <= 3600:  # also refuses nan
            interval = args.hook_check_interval
            raise UsageError(f"--hook-check-interval must be 0.1 to 3600 seconds, not {interval}")
        if not 0.1 <= args.state_check_interval <= 3600:
            interval = args.state_check_interval
            raise UsageError(f"--state-check-interval must be 0.1 to 3600 seconds, not {interval}")
        if args.flow_buffer < 1:
            raise UsageError(f"--flow-buffer must be at least 1, not {args.flow_buffer}")
        if not 0 <= args.nflog_group <= 0xFFFF:
            raise UsageError(f"--nflog-group must be 0 (off) to 65535, not {args.nflog_group}")
        if args.flows_per_pod is not None and args.flows_per_pod < 0:
            raise UsageError(f"--flows-per-pod must be 0 (no bound) or more, not {args.flows_per_pod}")
    except UsageError as exc:
        print(f"podfence agent: {exc}", file=sys.stderr)
        return EXIT_USAGE

    if args.dataplane == "bpf" and bpffs_mount_of(args.pin_dir) is None:
        print(
            f"podfence agent: --pin-dir {args.pin_dir} is not on a bpf filesystem; mount bpffs"
            " (mount -t bpf bpf /sys/fs/bpf; in a pod: a hostPath with bidirectional propagation),"
            " or use --dataplane iptables",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    try:
        dataplane = build_dataplane(args)
        dataplane.start()
    except (DataplaneError, ImportError, OSError, ValueError) as exc:  # ValueError: --flows-per-pod > ct map
        print(f"podfence agent: cannot start the {args.dataplane} dataplane: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    # Everything allocated so far (BCC, pyroute2, gRPC, the loaded program) lives as long as the
    # process; frozen, a full collection no longer walks it, which kept the GIL for tens of
    # milliseconds in the middle of programming a policy version.
    gc.collect()
    gc.freeze()

    stop = threading.Event()
    failed = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("received %s; stopping (kernel enforcement stays in place)", signal.Signals(signum).name)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    discovery: InterfaceDiscovery | None = None
    reconciler: Reconciler | None = None
    server = None
    threads: list[threading.Thread] = []
    try:
        # From PODFENCE_UPLINK the list arrives as one comma-separated string.
        uplinks = args.uplink.split(",") if isinstance(args.uplink, str) else args.uplink
        discovery = InterfaceDiscovery(excluded_names=[name.strip() for name in uplinks if name.strip()])
        # The NetlinkMonitor below feeds interfaces_changed, so policy versions may reuse a scan.
        reconciler = Reconciler(dataplane, discovery, reuse_views=True)
        if isinstance(dataplane, Adopting) and dataplane.adopted:
            reconciler.mark_adopted()
            log.info("adopted the kernel state of a previous run; it stays enforced until the first snapshot")
        token_file = args.token_file
        apply: Callable[[NodeState], None] = reconciler.apply
        if args.audit_all:
            log.warning("--audit-all: no policy is enforced on this node, every policy is in audit")
            apply = _audit_all(reconciler.apply)
        sync = SyncClient(args.node, targets, apply, credentials=credentials,
                          token=(lambda: Path(token_file).read_text()) if token_file else None,
                          credentials_factory=reloading_credentials(args, credentials),
                          generation_file=generation_file(args, dataplane),
                          rejections=reconciler.rejected_policy_messages)
        reconciler.on_recovered(sync.applied_late)
        # The flow feed's sink (issue 24): records wait here, bounded, for the Sync stream.
        flow_buffer = FlowBuffer(sync.offer_flows, args.flow_buffer)
        hook_guard = (
            HookGuard(dataplane, args.hook_check_interval) if isinstance(dataplane, HookRepairing) else None
        )
        state_interval = args.state_check_interval
        state_guard = StateGuard(dataplane, state_interval) if isinstance(dataplane, StateRepairing) else None
        registry = CollectorRegistry()
        collector = register_agent_metrics(registry, dataplane, reconciler, sync, hook_guard,
                                           per_pod=args.per_pod_metrics == "on", state_guard=state_guard,
                                           flow_metrics=args.flow_metrics)
        server, port = start_metrics_server(
            args.metrics_listen,
            registry,
            ready=reconciler.ready,
            not_ready="no policy version applied and no pinned state adopted yet",
        )
        monitor = NetlinkMonitor(reconciler.interfaces_changed)
        threads.append(_thread("netlink-monitor", lambda: monitor.run(stop), failed, stop))
        threads.append(_thread("reconcile", lambda: reconciler.run(stop), failed, stop))
        threads.append(_thread("sync", lambda: sync.run(stop), failed, stop))
        threads.append(_thread("flow-buffer", lambda: flow_buffer.run(stop), failed, stop))
        if hook_guard is not None:
            guard = hook_guard
            threads.append(_thread("hook-guard", lambda: guard.run(stop), failed, stop))
        if state_guard is not None:
            checker = state_guard
            checker.on_repair(lambda: sync.report_repairs(checker.repairs, checker.last))
            threads.append(_thread("state-check", lambda: checker.run(stop), failed, stop))
            if dataplane.name == "bpf":  # tc notifications wake the check (pod interfaces' filters)
                threads.append(_thread("state-check-tc", lambda: checker.watch_tc(stop), failed, stop))
        if isinstance(dataplane, ConntrackReleasing):
            releaser = ConntrackReleaser(dataplane)
            threads.append(_thread("conntrack-release", lambda: releaser.run(stop), failed, stop))
        if isinstance(dataplane, FlowRecordSource):
            # one reader of the dataplane's records, many sinks (flowfeed.py)
            feed = FlowFeed(dataplane, [FlowLogger().handle_record, flow_buffer.sink])
            if collector.flows is not None:  # exposed whatever the dataplane, empty without flows
                feed.add_sink(collector.flows)
            threads.append(_thread("flow-feed", lambda: feed.run(stop), failed, stop))
        elif isinstance(dataplane, DenyEventSource):
            flows = FlowLogger(dataplane)
            threads.append(_thread("flow-log", lambda: flows.run(stop), failed, stop))
        egress_hook = dataplane.egress_hook_in_use if isinstance(dataplane, EgressHookReporting) else ""
        warn_if_ipvs()
        log.info(
            "agent for node %s running: %s dataplane%s, control %s, metrics on port %d",
            args.node,
            dataplane.name,
            f" (egress verdict on {egress_hook} hooks)" if egress_hook else "",
            args.control,
            port,
            extra={
                "node": args.node,
                "dataplane": dataplane.name,
                "control": args.control,
                "egress_hook": egress_hook,
            },
        )
        while not stop.wait(0.5):
            pass
    except (DataplaneError, OSError) as exc:
        print(f"podfence agent: {exc}", file=sys.stderr)
        failed.set()
    finally:
        stop.set()
        if reconciler is not None:
            reconciler.wake()  # it waits for interface changes, not for `stop`
        for thread in threads:
            thread.join(timeout=THREAD_STOP_S)
            if thread.is_alive():  # a loop that does not watch `stop`: exiting would wait for it
                log.warning("the %s thread did not stop within %d s; exiting without it", thread.name,
                            THREAD_STOP_S)
        if server is not None:
            server.shutdown()
            server.server_close()
        if discovery is not None:
            discovery.close()
        dataplane.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return EXIT_FAILURE if failed.is_set() else EXIT_OK
