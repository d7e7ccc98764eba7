"""`podfence observe`: the flows of every node, relayed by the control service (FlowObserver).

Like `hubble observe`: without --follow it prints the stored records asked for (--since, or the
newest --last, 20 by default) and ends; with --follow it then prints each new record until
interrupted. Filters take comma-separated values (any matches); different filters must all match.

Output (-o), the contract in docs/design.md: `table` for people, `jsonl` one JSON object per flow
per line, `json` one JSON array of them (not with --follow). Each object holds "time" (RFC 3339,
UTC), "time_ns", "node", "protocol" (name, or the number as text), "source" and "destination"
(each {"namespace", "pod", "ip", "port"}; namespace and pod null when no pod holds the address),
"direction", "verdict" (allowed|denied|audit-denied), "tier", "policy", "rule" (the deciding
ones; null when unknown), "reason" (the drop reason, null for an allowed flow), "endpoint",
"packets" and "bytes". Records a slow reader lost are reported on stderr. Exit 1 when the control
service is unreachable or refuses the caller; 2 on bad usage.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

import grpc

from agent.api import podfence_pb2 as pb
from agent.api import podfence_pb2_grpc as pb_grpc
from agent.control.status import add_connection_arguments, client_credentials, read_token

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
DEFAULT_LAST = 20
PROTOCOLS = {"tcp": 6, "udp": 17, "sctp": 132, "icmp": 1, "icmpv6": 58}
PROTOCOL_NAMES = {number: name.upper().replace("V6", "v6") for name, number in PROTOCOLS.items()}
VERDICTS = ("allowed", "denied", "audit-denied")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


class UsageError(ValueError):
    pass


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_connection_arguments(parser, cert_help="client certificate (PEM); its CN must be allowed to observe",
                             timeout_help="seconds to reach the control service")
    parser.add_argument("--from", dest="from_peers", metavar="PEERS",
                        help="source: NAMESPACE/POD, NAMESPACE/ (any pod of it) or an IP (comma-separated)")
    parser.add_argument("--to", dest="to_peers", metavar="PEERS", help="destination, the same forms")
    parser.add_argument("--namespace", metavar="NAMES", help="source or destination pod in these namespaces")
    parser.add_argument("--pod", metavar="NAMESPACE/POD", help="source or destination pod")
    parser.add_argument("--verdict", metavar="VERDICTS", help="allowed, denied, audit-denied")
    parser.add_argument("--protocol", metavar="PROTOCOLS", help="TCP, UDP, SCTP, ICMP, ICMPv6 or a number")
    parser.add_argument("--port", metavar="PORTS", help="source or destination port")
    parser.add_argument("--policy", metavar="POLICIES", help="the deciding policy (NAMESPACE/NAME or a "
                        "ClusterNetworkPolicy's NAME)")
    parser.add_argument("--node", metavar="NODES", help="flows seen on these nodes")
    parser.add_argument("--since", metavar="DURATION", help="stored flows this recent first (30s, 5m, 2h)")
    parser.add_argument("--last", type=int, default=None, metavar="N",
                        help=f"without --since: the newest N stored flows first (default {DEFAULT_LAST}, "
                        "0 with --follow)")
    parser.add_argument("--follow", "-f", action="store_true", help="then print new flows until interrupted")
    parser.add_argument("-o", "--output", choices=["table", "json", "jsonl"], default="table")


def parse_duration(text: str) -> float:
    """"5m" -> 300.0 seconds (units ms, s, m, h, d; a bare number is seconds)."""
    match = _DURATION.match(text)
    if match is None:
        raise UsageError(f"--since {text!r}: expected a duration such as 30s, 5m, 2h or 1d")
    return float(match.group(1)) * _UNIT_S[match.group(2) or "s"]


def _items(text: str | None) -> list[str]:
    return [item.strip() for item in (text or "").split(",") if item.strip()]


def _protocol(text: str) -> int:
    number = PROTOCOLS.get(text.lower())
    if number is None and text.isdigit() and int(text) <= 255:
        number = int(text)
    if number is None:
        raise UsageError(f"--protocol {text!r}: expected TCP, UDP, SCTP, ICMP, ICMPv6 or 0..255")
    return number


def _port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) <= 65535:
        raise UsageError(f"--port {text!r}: expected 1..65535")
    return int(text)


def build_request(args: argparse.Namespace) -> pb.ObserveRequest:
    verdicts = _items(args.verdict)
    for verdict in verdicts:
        if verdict not in VERDICTS:
            raise UsageError(f"--verdict {verdict!r}: expected one of {', '.join(VERDICTS)}")
    for pod in _items(args.pod):
        if pod.count("/") != 1 or pod.startswith("/") or pod.endswith("/"):
            raise UsageError(f"--pod {pod!r}: expected NAMESPACE/POD")
    since = parse_duration(args.since) if args.since else 0.0
    last = args.last if args.last is not None else (0 if args.follow or since else DEFAULT_LAST)
    if last < 0:
        raise UsageError(f"--last must be 0 or more, not {last}")
    if args.follow and args.output == "json":
        raise UsageError("-o json prints one array and cannot --follow; use -o jsonl")
    return pb.ObserveRequest(
        from_peers=_items(args.from_peers), to_peers=_items(args.to_peers),
        namespaces=_items(args.namespace), pods=_items(args.pod), verdicts=verdicts,
        protocols=[_protocol(p) for p in _items(args.protocol)], ports=[_port(p) for p in _items(args.port)],
        policies=_items(args.policy), nodes=_items(args.node), since_seconds=since,
        follow=args.follow, last=last,
    )


def _side(ip: str, pod: str, port: int, protocol: int) -> dict[str, Any]:
    namespace, _, name = pod.partition("/")
    return {
        "namespace": namespace or None,
        "pod": name or None,
        "ip": ip,
        # ICMP carries type and code there, not ports
        "port": port if protocol not in (1, 58) else None,
    }


def record_to_dict(record: pb.FlowRecord) -> dict[str, Any]:
    when = datetime.datetime.fromtimestamp(record.time_ns / 1e9, datetime.UTC)
    flow: dict[str, Any] = {
        "time": when.isoformat(timespec="microseconds").replace("+00:00", "Z"),
        "time_ns": int(record.time_ns),
        "node": record.node,
        "protocol": PROTOCOL_NAMES.get(record.protocol, str(record.protocol)),
        "source": _side(record.source, record.source_pod, record.source_port, record.protocol),
        "destination": _side(record.destination, record.destination_pod, record.destination_port,
                             record.protocol),
        "direction": record.direction,
        "verdict": record.verdict,
        "tier": record.tier or None,
        "policy": record.policy or None,
        "rule": record.rule or None,
        "reason": record.reason or None,
        "endpoint": record.endpoint or None,
        "packets": int(record.packets),
        "bytes": int(record.bytes),
    }
    if record.protocol in (1, 58):
        flow["icmp"] = {"type": int(record.source_port), "code": int(record.destination_port)}
    return flow


def _where(side: dict[str, Any]) -> str:
    ip = side["ip"]
    address = f"[{ip}]" if side["port"] is not None and ":" in ip else ip
    port = f":{side['port']}" if side["port"] is not None else ""
    if side["pod"]:
        return f"{side['namespace']}/{side['pod']}{port}"
    return f"{address}{port}"


TABLE_HEADER = ("TIME", "NODE", "SOURCE", "", "DESTINATION", "PROTO", "VERDICT", "DECIDED BY")
_WIDTHS = (15, 12, 30, 2, 30, 6, 12)


def table_row(flow: dict[str, Any]) -> str:
    when = datetime.datetime.fromisoformat(flow["time"].replace("Z", "+00:00"))
    decided = "/".join(part for part in (flow["tier"], flow["policy"], flow["rule"]) if part) or "-"
    if flow["reason"] and flow["reason"] != "policy":
        decided += f" ({flow['reason']})"
    cells = (when.strftime("%H:%M:%S.%f")[:-3], flow["node"], _where(flow["source"]), "->",
             _where(flow["destination"]), flow["protocol"], flow["verdict"], decided)
    return _line(cells)


def _line(cells: Iterable[str]) -> str:
    *padded, free = list(cells)
    return "  ".join(cell.ljust(width) for cell, width in zip(padded, _WIDTHS, strict=True)) + "  " + free


def _note_lost(record: pb.FlowRecord, err: TextIO) -> None:
    if record.lost_before:
        print(f"podfence observe: {record.lost_before} flow record(s) lost: this reader was too slow",
              file=err, flush=True)


def _records(stub: pb_grpc.FlowObserverStub, request: pb.ObserveRequest, metadata: Any,
             timeout: float | None, calls: list[Any]) -> Iterator[pb.FlowRecord]:
    """The records of ObserveBatches (many per message), or of Observe from a control service
    older than it (UNIMPLEMENTED, which comes before any record). `calls` collects the calls
    for the caller to cancel."""
    call = stub.ObserveBatches(request, metadata=metadata, timeout=timeout)
    calls.append(call)
    try:
        for batch in call:
            yield from batch.records
        return
    except grpc.RpcError as exc:
        if not (isinstance(exc, grpc.Call) and exc.code() is grpc.StatusCode.UNIMPLEMENTED):
            raise
    call = stub.Observe(request, metadata=metadata, timeout=timeout)
    calls.append(call)
    yield from call


def observe(stub: pb_grpc.FlowObserverStub, request: pb.ObserveRequest, output: str, timeout: float,
            token: str | None, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Runs one Observe call and prints what it brings (to stdout and stderr unless given);
    returns the exit code."""
    out = out or sys.stdout
    err = err or sys.stderr
    metadata = [("authorization", f"Bearer {token}")] if token else None
    calls: list[Any] = []
    collected: list[dict[str, Any]] = []
    if output == "table":
        print(_line(TABLE_HEADER), file=out, flush=True)
    try:
        for record in _records(stub, request, metadata, None if request.follow else timeout, calls):
            _note_lost(record, err)
            flow = record_to_dict(record)
            if output == "json":
                collected.append(flow)
            elif output == "jsonl":
                print(json.dumps(flow), file=out, flush=True)
            else:
                print(table_row(flow), file=out, flush=True)
    except grpc.RpcError as exc:
        code = exc.code() if isinstance(exc, grpc.Call) else None
        details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
        print(f"podfence observe: {code.name if code else 'error'}: {details}", file=err)
        return EXIT_USAGE if code is grpc.StatusCode.INVALID_ARGUMENT else EXIT_FAILURE
    finally:
        for call in calls:
            call.cancel()
    if output == "json":
        print(json.dumps(collected), file=out)
    return EXIT_OK


def run(args: argparse.Namespace) -> int:
    try:
        request = build_request(args)
        credentials, usage_error = client_credentials(args)
        if usage_error:
            raise UsageError(usage_error)
        token = read_token(args)
    except (UsageError, OSError) as exc:
        print(f"podfence observe: {exc}", file=sys.stderr)
        return EXIT_USAGE
    target = args.control.split(",")[0].strip()
    channel = (grpc.secure_channel(target, credentials) if credentials is not None
               else grpc.insecure_channel(target))
    with channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=args.timeout)
        except grpc.FutureTimeoutError:
            print(f"podfence observe: control service {target} unreachable", file=sys.stderr)
            return EXIT_FAILURE
        return observe(pb_grpc.FlowObserverStub(channel), request, args.output, args.timeout, token)
