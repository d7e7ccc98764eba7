"""`podfence status`: the control service's view of every node (ControlStatus.GetStatus).

With --json it prints exactly one object, the contract in docs/design.md:
{"version": <int>, "nodes": {"<node>": {"applied_version": <int>, "connected": <bool>,
"last_error": <str|null>}}}, plus extra fields: per node that has some, "rejected_policies":
[<str>], the policies it left out because its maps cannot hold them ("namespace/name: why"), per
node whose agent put back kernel state someone removed, "state_repairs": <int> and "last_repair":
<str> (the last finding), and
"source_errors": [{"object": <str|null>, "source": <str>, "error": <str>,
"last_valid_in_force": <bool>}], the invalid objects and unreadable files of the policy source,
and (source "control") every ClusterNetworkPolicy the source holds that the dataplanes do not
enforce yet, and "source_freshness": {"source": <str>, "seconds_since_heard": <float>, "stale":
<bool>, "stale_after_seconds": <float>} for a source read from the API server (null for a folder,
or when the caller may not see it). Without it, a table for people. Exit 1 when unreachable.

Given several control addresses, every replica is asked: the object above is the first that
answers, and "replicas" (an extra field) lists each replica's own view: [{"control": <address>,
"reachable": <bool>, "error": <str|null>, "replica": <str>, "version": <int>,
"source_generation": <int>, "source_digest": <str>, "sync_streams": <int>, "draining": <bool>,
"connected_nodes": <int>, "source_stale": <bool|null>}], so replicas that lag behind the source (a
lower generation) or lost the API server show.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import grpc

from agent.api import podfence_pb2 as pb
from agent.api import podfence_pb2_grpc as pb_grpc
from agent.control.freshness import Freshness

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_connection_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def add_connection_arguments(parser: argparse.ArgumentParser, cert_help: str = "client certificate (PEM)",
                             timeout_help: str = "seconds before giving up") -> None:
    """How a client command reaches the control service (status, observe): address, TLS, token."""
    parser.add_argument("--control", required=True, help="control service HOST:PORT")
    parser.add_argument("--insecure", action="store_true", help="plain text (the default without --tls-*)")
    parser.add_argument("--tls-cert", help=cert_help)
    parser.add_argument("--tls-key", help="client private key (PEM)")
    parser.add_argument("--tls-ca", help="CA of the control service's certificate (PEM)")
    parser.add_argument("--token-file", metavar="FILE",
                        help="token identity: a service-account token to present (needs --tls-ca)")
    parser.add_argument("--timeout", type=float, default=5.0, help=timeout_help)


def _repairs(status: pb.NodeStatus) -> dict[str, Any]:
    if not status.state_repairs:
        return {}  # the documented shape, unchanged for a node with nothing to report
    return {"state_repairs": int(status.state_repairs), "last_repair": status.last_repair}


def status_to_dict(response: pb.StatusResponse) -> dict[str, Any]:
    return {
        "version": int(response.version),
        "nodes": {node: _node_to_dict(status) for node, status in sorted(response.nodes.items())},
        "source_errors": [
            {
                "object": problem.object or None,
                "source": problem.source,
                "error": problem.error,
                "last_valid_in_force": bool(problem.last_valid_in_force),
            }
            for problem in response.source_errors
        ],
        "source_freshness": {
            "source": response.source_freshness.source,
            "seconds_since_heard": round(response.source_freshness.seconds_since_heard, 1),
            "stale": bool(response.source_freshness.stale),
            "stale_after_seconds": response.source_freshness.stale_after_seconds,
        } if response.HasField("source_freshness") else None,
    }


def _node_to_dict(status: pb.NodeStatus) -> dict[str, Any]:
    node: dict[str, Any] = {
        "applied_version": int(status.applied_version),
        "connected": bool(status.connected),
        "last_error": status.last_error or None,
    }
    if status.rejected_policies:  # only then: the contract's three fields otherwise
        node["rejected_policies"] = list(status.rejected_policies)
    node.update(_repairs(status))
    return node


def fetch_status(
    target: str, credentials: grpc.ChannelCredentials | None, timeout: float, token: str | None = None
) -> pb.StatusResponse:
    channel = (
        grpc.secure_channel(target, credentials) if credentials is not None else grpc.insecure_channel(target)
    )
    metadata = [("authorization", f"Bearer {token}")] if token else None
    with channel:
        return pb_grpc.ControlStatusStub(channel).GetStatus(pb.StatusRequest(), timeout=timeout,
                                                            metadata=metadata)


def client_credentials(args: argparse.Namespace) -> tuple[grpc.ChannelCredentials | None, str | None]:
    """The channel credentials the TLS flags ask for (None: plain text), or why they are wrong."""
    given = [f for f in (args.tls_cert, args.tls_key, args.tls_ca) if f]
    token_file = getattr(args, "token_file", None)
    if args.insecure:
        if token_file:
            return None, "--token-file needs TLS (--tls-ca), not --insecure"
        return (None, "--insecure and --tls-* exclude each other") if given else (None, None)
    if token_file:
        if not args.tls_ca or bool(args.tls_cert) != bool(args.tls_key):
            return None, "--token-file needs --tls-ca (and --tls-cert with --tls-key, or neither)"
    elif not given:
        return None, None  # docs/design.md: status is called without TLS flags: plain text then
    elif len(given) != 3:
        return None, "mutual TLS needs --tls-cert, --tls-key and --tls-ca together"
    try:
        return grpc.ssl_channel_credentials(
            _read(args.tls_ca), _read(args.tls_key), _read(args.tls_cert)
        ), None
    except OSError as exc:
        return None, f"cannot read TLS files: {exc}"


def read_token(args: argparse.Namespace) -> str | None:
    """The --token-file's token (None without one); OSError when it cannot be read."""
    token_file = getattr(args, "token_file", None)
    if not token_file:
        return None
    try:
        with open(token_file) as f:
            return f.read().strip()
    except OSError as exc:
        raise OSError(f"cannot read --token-file: {exc}") from exc


def _read(path: str | None) -> bytes | None:
    if path is None:
        return None
    with open(path, "rb") as f:
        return f.read()


def run(args: argparse.Namespace) -> int:
    credentials, usage_error = client_credentials(args)
    token = None
    if not usage_error:
        try:
            token = read_token(args)
        except OSError as exc:
            usage_error = str(exc)
    if usage_error:
        print(f"podfence status: {usage_error}", file=sys.stderr)
        return EXIT_USAGE
    # PODFENCE_CONTROL may hold the agents' list of replicas: each is asked, the first that
    # answers gives the main view.
    targets = [t.strip() for t in args.control.split(",") if t.strip()]
    answers: dict[str, pb.StatusResponse | str] = {}
    for target in targets:
        try:
            answers[target] = fetch_status(target, credentials, args.timeout, token)
        except grpc.RpcError as exc:
            answers[target] = str(exc.details() if isinstance(exc, grpc.Call) else exc)
    responses = [answer for answer in answers.values() if isinstance(answer, pb.StatusResponse)]
    if not responses:
        failures = "; ".join(f"{target}: {answer}" for target, answer in answers.items())
        print(f"podfence status: control service {args.control} unreachable: {failures}", file=sys.stderr)
        return EXIT_FAILURE
    status = status_to_dict(responses[0])
    if len(targets) > 1:
        status["replicas"] = [_replica_view(target, answer) for target, answer in answers.items()]
    if args.json:
        print(json.dumps(status))
        return EXIT_OK
    _print_replicas(status.get("replicas", []))
    print(f"policy version {status['version']}")
    fresh = status["source_freshness"]
    if fresh is not None:
        print("source " + Freshness(**fresh).describe())
    rows = [("NODE", "APPLIED", "CONNECTED", "LAST ERROR")]
    for node, entry in status["nodes"].items():
        lag = status["version"] - entry["applied_version"]
        applied = f"{entry['applied_version']}" + (f" (-{lag})" if lag else "")
        rows.append((node, applied, "yes" if entry["connected"] else "no", entry["last_error"] or "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:3])) + "  " + row[3])
    for node, entry in status["nodes"].items():
        for rejection in entry.get("rejected_policies", ()):
            print(f"  {node}: policy {rejection}")
    repaired = {node: entry for node, entry in status["nodes"].items() if entry.get("state_repairs")}
    if repaired:
        print(f"{len(repaired)} node(s) put back kernel state someone removed:")
    for node, entry in repaired.items():
        print(f"  {node}: {entry['state_repairs']} repair(s), last {entry['last_repair']}")
    if status["source_errors"]:
        print(f"{len(status['source_errors'])} source error(s):")
    for problem in status["source_errors"]:
        effect = "last valid form in force" if problem["last_valid_in_force"] else "not applied"
        print(f"  {problem['source']}: {problem['error']} ({effect})")
    return EXIT_OK


def _replica_view(target: str, answer: pb.StatusResponse | str) -> dict[str, Any]:
    if isinstance(answer, str):
        return {"control": target, "reachable": False, "error": answer}
    return {
        "control": target,
        "reachable": True,
        "error": None,
        "replica": answer.source.replica,
        "version": int(answer.version),
        "source_generation": int(answer.source.generation),
        "source_digest": answer.source.digest,
        "sync_streams": int(answer.sync_streams),
        "draining": bool(answer.draining),
        "connected_nodes": sum(1 for node in answer.nodes.values() if node.connected),
        # a replica that lost the API server serves its last state: say which one
        "source_stale": bool(answer.source_freshness.stale) if answer.HasField("source_freshness") else None,
    }


def _print_replicas(replicas: list[dict[str, Any]]) -> None:
    if not replicas:
        return
    newest = max((r["source_generation"] for r in replicas if r["reachable"]), default=0)
    rows = [("CONTROL", "REPLICA", "GENERATION", "STREAMS", "STATE")]
    for r in replicas:
        if not r["reachable"]:
            rows.append((r["control"], "-", "-", "-", f"unreachable: {r['error']}"))
            continue
        state = "draining" if r["draining"] else "serving"
        if r["source_generation"] < newest:
            state += " (behind the newest source generation)"
        if r.get("source_stale"):
            state += " (STALE: lost the API server)"
        generation, streams = str(r["source_generation"]), str(r["sync_streams"])
        rows.append((r["control"], r["replica"] or "-", generation, streams, state))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:4])) + "  " + row[4])
