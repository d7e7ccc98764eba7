"""`podfence control`: a policy source (folder or Kubernetes) feeding per-node gRPC streams.

Stateless by design: everything it serves is derived from the source, so several replicas can run
side by side and agents fail over between them (a reconnecting agent always gets a snapshot).
"""

from __future__ import annotations

import argparse
import logging
import signal
import ssl
import sys
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

from prometheus_client import CollectorRegistry

from agent.control.balance import StreamBalancer
from agent.control.flow_relay import DEFAULT_RING_SIZE
from agent.control.freshness import Freshness
from agent.control.hub import DEFAULT_FORGET_AFTER_S, DEFAULT_MAX_PENDING, PolicyHub
from agent.control.identity import (
    DEFAULT_AGENT_SERVICE_ACCOUNT,
    DEFAULT_REVIEW_TIMEOUT_S,
    TOKEN_AUDIENCE,
    TokenAuthenticator,
    TokenReviewer,
    service_account_user,
)
from agent.control.metrics import ControlMetrics
from agent.control.observe_service import ObserveSettings, observe_users
from agent.control.server import (
    DEFAULT_ADMIN_NAME,
    ServerSettings,
    create_server,
    stop_server,
)
from agent.control.source_kubernetes import (
    DEFAULT_PAGE_SIZE,
    DEFAULT_REQUEST_TIMEOUT_S,
    DEFAULT_WATCH_TIMEOUT_S,
)
from agent.control.taint import NOT_READY_TAINT, TaintRemover
from agent.control.tls_files import ReloadingTlsFiles
from agent.metrics_http import split_host_port, start_metrics_server

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", required=True, help="a folder of YAML/JSON objects, or 'kubernetes'")
    parser.add_argument("--listen", default="0.0.0.0:9400", help="gRPC HOST:PORT (default %(default)s)")
    parser.add_argument("--insecure", action="store_true", help="serve without TLS (must be asked for)")
    parser.add_argument("--tls-cert", help="server certificate (PEM)")
    parser.add_argument("--tls-key", help="server private key (PEM)")
    parser.add_argument("--tls-ca", help="CA that signs agents' client certificates (PEM)")
    parser.add_argument(
        "--identity", choices=["certificate", "token"], default="certificate",
        help="how an agent proves its node: its client certificate's CN, or its pod's service-account "
        "token checked by TokenReview",
    )
    parser.add_argument("--token-audience", default=TOKEN_AUDIENCE,
                        help="token identity: the audience the agents' tokens are for")
    parser.add_argument(
        "--agent-service-account", default=DEFAULT_AGENT_SERVICE_ACCOUNT, metavar="NAMESPACE/NAME",
        help="token identity: the service account of the agent pods (any other token is refused)",
    )
    parser.add_argument(
        "--admin-users", default=None, metavar="NAMES",
        help="token identity: TokenReview usernames (comma-separated) that see every node in podfence status",
    )
    parser.add_argument(
        "--tokenreview-timeout", type=float, default=DEFAULT_REVIEW_TIMEOUT_S, metavar="SECONDS",
        help="token identity: give up on a TokenReview (and refuse the stream) after this long",
    )
    parser.add_argument(
        "--admin-cn",
        default=DEFAULT_ADMIN_NAME,
        metavar="NAMES",
        help="mutual TLS: client certificate CNs (comma-separated) that see every node in podfence status",
    )
    parser.add_argument(
        "--observe-allow", default=None, metavar="NAMES",
        help="who may read flow records (podfence observe) besides the status admins: client "
        "certificate CNs, or with token identity TokenReview usernames or NAMESPACE/NAME service "
        "accounts (comma-separated)",
    )
    parser.add_argument(
        "--observe-without-identity", action="store_true",
        help="with --insecure: let anyone who reaches the port observe flows (a lab on loopback only)",
    )
    parser.add_argument(
        "--flow-ring", type=int, default=DEFAULT_RING_SIZE, metavar="N",
        help="flow records kept per node for late podfence observe readers (--since, --last)",
    )
    parser.add_argument("--kubeconfig", help="with --source kubernetes: kubeconfig instead of in-cluster")
    parser.add_argument(
        "--watch-timeout", type=int, default=DEFAULT_WATCH_TIMEOUT_S, metavar="SECONDS",
        help="with --source kubernetes: each watch lasts a random SECONDS..2xSECONDS (default %(default)s)",
    )
    parser.add_argument(
        "--api-timeout", type=float, default=DEFAULT_REQUEST_TIMEOUT_S, metavar="SECONDS",
        help="with --source kubernetes: a list request, or a watch silent past its own timeout, "
             "gives up after SECONDS (default %(default)s)",
    )
    parser.add_argument(
        "--not-ready-taint", default=NOT_READY_TAINT, metavar="KEY",
        help="with --source kubernetes: remove this NoSchedule taint from a node once its agent "
             "applied a first version ('' turns it off; default %(default)s)",
    )
    parser.add_argument(
        "--list-page-size", type=int, default=DEFAULT_PAGE_SIZE, metavar="N",
        help="with --source kubernetes: objects per list page (default %(default)s)",
    )
    parser.add_argument(
        "--metrics-listen", default="0.0.0.0:9300", help="/metrics, /healthz HOST:PORT (default %(default)s)"
    )
    parser.add_argument(
        "--poll-interval",
        type=float,
        default=0.2,
        help="folder poll period in seconds (file-system events are sooner)",
    )
    parser.add_argument(
        "--max-message-bytes", type=int, default=64 * 1024 * 1024, help="largest message sent to an agent"
    )
    parser.add_argument(
        "--max-pending", type=int, default=DEFAULT_MAX_PENDING,
        help="versions queued per stream before it is reset to a snapshot",
    )
    parser.add_argument(
        "--forget-disconnected-after",
        type=float,
        default=DEFAULT_FORGET_AFTER_S,
        metavar="SECONDS",
        help="drop a node from status and metrics once disconnected this long",
    )
    parser.add_argument("--shutdown-grace", type=float, default=5.0, help="seconds to drain on SIGTERM")
    parser.add_argument(
        "--replicas", type=int, default=1, metavar="N",
        help="control replicas serving the cluster: above its share of the streams a replica moves "
        "one agent per second to another replica (1: never)",
    )


def _tls_from_args(args: argparse.Namespace) -> tuple[ReloadingTlsFiles | None, str | None]:
    """(credentials, usage error). The files are re-read when they change (tls_files.py)."""
    given = [f for f in (args.tls_cert, args.tls_key, args.tls_ca) if f]
    token = args.identity == "token"
    if args.insecure:
        if given:
            return None, "--insecure and --tls-* exclude each other"
        if token:
            return None, "--identity token sends service-account tokens: it needs TLS, not --insecure"
        return None, None
    if token and not (args.tls_cert and args.tls_key):
        return None, "--identity token needs --tls-cert and --tls-key (and --tls-ca for mutual TLS)"
    if not token and len(given) != 3:
        return None, "mutual TLS needs --tls-cert, --tls-key and --tls-ca (or pass --insecure explicitly)"
    try:
        return ReloadingTlsFiles(args.tls_cert, args.tls_key, args.tls_ca), None
    except (OSError, ssl.SSLError) as exc:
        return None, f"cannot read TLS files: {exc}"


def _authenticator(args: argparse.Namespace, hub: PolicyHub) -> TokenAuthenticator:
    """Token identity: TokenReview through the same API configuration as a Kubernetes source."""
    from agent.control.source_kubernetes import load_api_client

    if not args.tokenreview_timeout > 0:
        raise ValueError(f"--tokenreview-timeout must be > 0 seconds, not {args.tokenreview_timeout}")
    try:
        api_client = load_api_client(args.kubeconfig)
    except Exception as exc:
        raise ValueError(f"--identity token needs the Kubernetes API (TokenReview): {exc}") from exc
    reviewer = TokenReviewer(api_client, args.token_audience, args.tokenreview_timeout)
    admin_users = [name.strip() for name in (args.admin_users or "").split(",") if name.strip()]
    return TokenAuthenticator(reviewer, hub.find_pod, args.agent_service_account, admin_users)


def _make_resolver() -> Any:
    from agent.policy.staged import StagedResolver

    return StagedResolver()


def run(args: argparse.Namespace) -> int:
    credentials, usage_error = _tls_from_args(args)
    if usage_error:
        print(f"podfence control: {usage_error}", file=sys.stderr)
        return EXIT_USAGE
    try:
        split_host_port(args.listen)
        split_host_port(args.metrics_listen)
        horizon = args.forget_disconnected_after
        if not horizon > 0:  # also refuses nan
            raise ValueError(f"--forget-disconnected-after must be > 0 seconds, not {horizon}")
        service_account_user(args.agent_service_account)
        if args.replicas < 1:
            raise ValueError(f"--replicas must be at least 1, not {args.replicas}")
        if args.flow_ring < 1:
            raise ValueError(f"--flow-ring must be at least 1, not {args.flow_ring}")
        observe_users(name.strip() for name in (args.observe_allow or "").split(",") if name.strip())
        if args.observe_without_identity and credentials is not None:
            raise ValueError("--observe-without-identity is for --insecure only (with TLS: --observe-allow)")
    except ValueError as exc:
        print(f"podfence control: {exc}", file=sys.stderr)
        return EXIT_USAGE

    registry = CollectorRegistry()
    hub = PolicyHub(
        _make_resolver(),
        ControlMetrics(registry),
        max_pending=args.max_pending,
        forget_after_s=args.forget_disconnected_after,
    )
    authenticator = None
    if args.identity == "token":
        try:
            authenticator = _authenticator(args, hub)
        except ValueError as exc:
            print(f"podfence control: {exc}", file=sys.stderr)
            return EXIT_USAGE
    stop = threading.Event()
    source_thread: threading.Thread
    freshness: Callable[[], Freshness] | None = None
    # Set once the source has been read completely: before that a snapshot would tell agents to
    # enforce an empty cluster, so no Sync stream is served until then.
    synced = threading.Event()
    if args.source == "kubernetes":
        from agent.control.source_kubernetes import KubernetesSource, load_api_client

        try:
            api_client = load_api_client(args.kubeconfig)
        except Exception as exc:
            print(f"podfence control: no Kubernetes configuration: {exc}", file=sys.stderr)
            return EXIT_USAGE
        try:
            k8s = KubernetesSource(
                hub, api_client, watch_timeout_seconds=args.watch_timeout,
                request_timeout_seconds=args.api_timeout, page_size=args.list_page_size,
            )
        except ValueError as exc:
            print(f"podfence control: {exc}", file=sys.stderr)
            return EXIT_USAGE
        hub.set_freshness(k8s.freshness.read)
        if args.not_ready_taint:
            taints = TaintRemover(api_client, hub.metrics, key=args.not_ready_taint,
                                  request_timeout_seconds=args.api_timeout)
            hub.on_node_applied = taints.node_applied
            threading.Thread(target=taints.run, args=(stop,), name="taints", daemon=True).start()
        freshness = k8s.freshness.read
        synced = k8s.synced
        source_thread = threading.Thread(target=k8s.run, args=(stop,), name="source", daemon=True)
        log.info("source: Kubernetes API (%s)", args.kubeconfig or "in-cluster")
    else:
        from pathlib import Path

        from agent.control.source_folder import FolderSource

        if not Path(args.source).is_dir():
            print(f"podfence control: --source {args.source!r} is not a folder (nor 'kubernetes')",
                  file=sys.stderr)
            return EXIT_USAGE
        folder = FolderSource(args.source, hub, poll_interval=args.poll_interval)
        folder.scan()
        synced.set()
        source_thread = threading.Thread(target=folder.run, args=(stop,), name="source", daemon=True)
        log.info(
            "source: folder %s (file-system events, polled every %.0f ms)",
            args.source,
            args.poll_interval * 1000,
        )

    healthy = threading.Event()
    try:
        # A replica whose source went stale stays healthy (200): restarting it would only trade
        # the last state read for none. Its /healthz body says so, as do the metrics.
        httpd, _ = start_metrics_server(
            args.metrics_listen, registry, healthy=healthy.is_set,
            health_detail=None if freshness is None else lambda: "source " + freshness().describe(),
        )
        admin_names = [name.strip() for name in args.admin_cn.split(",") if name.strip()]
        observe = ObserveSettings(
            allowed=tuple(name.strip() for name in (args.observe_allow or "").split(",") if name.strip()),
            allow_unauthenticated=args.observe_without_identity,
            ring_size=args.flow_ring,
        )
        server, port, health_servicer = create_server(
            args.listen, hub, credentials, ServerSettings(max_send_bytes=args.max_message_bytes),
            admin_names=admin_names, authenticator=authenticator, observe=observe,
        )
    except (OSError, RuntimeError) as exc:
        print(f"podfence control: cannot listen: {exc}", file=sys.stderr)
        return EXIT_FAILURE

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("received %s; shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    source_thread.start()
    if not synced.is_set():
        log.info("waiting for the first full list of the source before serving agents")
    while not synced.wait(1.0):
        if stop.is_set():
            log.info("stopped before the source was read")
            httpd.shutdown()
            return EXIT_OK
    server.start()
    healthy.set()
    if args.replicas > 1:
        balancer = StreamBalancer(hub, args.replicas)
        threading.Thread(target=balancer.run, args=(stop,), name="balance", daemon=True).start()
    log.info("control service listening on %s (port %d, %s), metrics on %s", args.listen, port,
             _transport(credentials, args.identity), args.metrics_listen)
    while not stop.wait(1.0):  # a timed wait lets the signal handler run promptly
        pass
    stop_server(server, hub, health_servicer, grace=args.shutdown_grace)
    httpd.shutdown()
    httpd.server_close()
    log.info("control service stopped")
    return EXIT_OK


def _transport(credentials: ReloadingTlsFiles | None, identity: str) -> str:
    if credentials is None:
        return "insecure"
    tls = "mutual TLS" if credentials.require_client_auth else "TLS"
    return f"{tls}, node identity by {'service-account token' if identity == 'token' else 'certificate'}"
