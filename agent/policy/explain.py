"""`podfence explain`: judge one connection with the reference evaluator and say why.

Reads the same folder the control service reads, so "why is this blocked?" is answered from the
exact objects being enforced. Invalid objects are reported as warnings and left out, as the
control service does; the verdict uses every valid object.

Each direction says which tier decided (Admin or Baseline ClusterNetworkPolicy, NetworkPolicy, or
none: allowed by default), and for a ClusterNetworkPolicy the policy, its priority and the rule
(index and name), plus any Pass rule that handed over to a later tier. Both dataplanes enforce
the same order (docs/semantics.md). With policies in audit (`podfence.io/mode: audit`, or
`--audit-all` as the agent's switch) the audit view's verdict follows the enforced one
(agent.policy.audit).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from agent.model.load import LoadResult, load_file, load_folder
from agent.model.objects import Pod, Protocol
from agent.policy.audit import StagedVerdict, evaluate_staged
from agent.policy.evaluator import DirectionVerdict, Endpoint, Verdict, parse_endpoint
from agent.policy.state import ClusterState
from agent.policy.tiers import ClusterRuleMatch

EXIT_OK, EXIT_USAGE = 0, 2


class _BadInput(Exception):
    """Input the user must fix; reported on stderr with exit code 2."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--source", required=True, help="folder (or file) of Namespace/Pod/(Cluster)NetworkPolicy YAML"
    )
    parser.add_argument("--from", required=True, metavar="NS/POD|IP", help="client pod or IP address")
    parser.add_argument("--to", required=True, metavar="NS/POD|IP", help="server pod or IP address")
    parser.add_argument("--port", required=True, help="destination port, 1-65535")
    parser.add_argument(
        "--protocol", default="TCP", type=str.upper, choices=[p.value for p in Protocol], help="default TCP"
    )
    parser.add_argument(
        "--audit-all",
        action="store_true",
        help="judge as a node running `podfence agent --audit-all` enforces: every policy in audit",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _load(source: str) -> LoadResult:
    path = Path(source)
    if path.is_dir():
        return load_folder(path)
    if path.is_file():
        return load_file(path)
    raise _BadInput(f"--source {source!r}: no such file or directory")


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise _BadInput(f"--port {text!r}: not a number") from None
    if not 1 <= port <= 65535:
        raise _BadInput(f"--port {port}: must be between 1 and 65535")
    return port


def _describe(endpoint: Endpoint) -> str:
    if isinstance(endpoint, Pod):
        ips = ", ".join(str(ip) for ip in endpoint.ips) or "no IP"
        return f"{endpoint.key} ({ips})"
    return str(endpoint)


def _rule_json(match: ClusterRuleMatch) -> dict[str, Any]:
    return {
        "kind": "ClusterNetworkPolicy",
        "policy": match.policy,
        "tier": match.tier.value,
        "priority": match.priority,
        "index": match.index,
        "name": match.name,
        "action": match.action.value,
    }


def _direction_json(verdict: DirectionVerdict) -> dict[str, Any]:
    return {
        "isolated": verdict.isolated,
        "allowed": verdict.allowed,
        "policies": list(verdict.policies),
        "allowed_by": [{"policy": m.policy, "rule": m.index} for m in verdict.allowing],
        "isolated_by": list(verdict.isolating),
        "tier": verdict.tier,
        "rule": None if verdict.rule is None else _rule_json(verdict.rule),
        "passed": [_rule_json(m) for m in verdict.passed],
    }


def _direction_text(name: str, subject: Endpoint, verdict: DirectionVerdict) -> str:
    where = f"{name:7} on {_describe(subject)}"
    if not isinstance(subject, Pod):
        return f"  {where}: a bare IP has no {name} policy -> allowed"
    passed = "".join(f"{m.describe(name)}; " for m in verdict.passed)
    if verdict.rule is not None:
        outcome = "allowed" if verdict.allowed else "denied"
        return f"  {where}: {passed}{verdict.rule.describe(name)} -> {outcome}"
    if not verdict.isolated:
        if passed:
            return f"  {where}: {passed}no later tier decides -> allowed"
        return f"  {where}: no policy selects it for {name} -> allowed"
    isolating = ", ".join(verdict.isolating)
    if verdict.allowed:
        rules = ", ".join(f"{m.policy} {name} rule #{m.index}" for m in verdict.allowing)
        return f"  {where}: {passed}isolated by {isolating}; allowed by {rules}"
    return f"  {where}: {passed}isolated by {isolating}; no {name} rule of these policies matches -> denied"


def _verdict_lines(src: Endpoint, dst: Endpoint, verdict: Verdict) -> list[str]:
    return [_direction_text("egress", src, verdict.egress), _direction_text("ingress", dst, verdict.ingress)]


def render_text(src: Endpoint, dst: Endpoint, protocol: Protocol, port: int, staged: StagedVerdict) -> str:
    """The enforced verdict (the packet's fate) and, when a policy is in audit, the audit one."""
    verdict = staged.enforced
    outcome = "ALLOWED" if verdict.allowed else "DENIED"
    if staged.audit_denied:
        outcome += " (AUDIT-DENIED: the policies in audit would deny it)"
    lines = [f"{_describe(src)} -> {_describe(dst)} {protocol.value}/{port}: {outcome}"]
    lines += _verdict_lines(src, dst, verdict)
    if staged.audit is not None:
        audit_outcome = "allowed" if staged.audit.allowed else "denied"
        lines.append(f"with the policies in audit enforced: {audit_outcome}")
        lines += _verdict_lines(src, dst, staged.audit)
    return "\n".join(lines)


def _verdict_json(verdict: Verdict) -> dict[str, Any]:
    return {
        "allowed": verdict.allowed,
        "egress": _direction_json(verdict.egress),
        "ingress": _direction_json(verdict.ingress),
    }


def render_json(src: Endpoint, dst: Endpoint, protocol: Protocol, port: int, staged: StagedVerdict) -> str:
    """`allowed`, `egress`, `ingress`: the enforced verdict; `audit`: the audit view's verdict
    (null when no policy is in audit); `verdict`: allowed, denied or audit-denied."""
    verdict = staged.enforced
    name = "audit-denied" if staged.audit_denied else ("allowed" if verdict.allowed else "denied")
    return json.dumps(
        {
            "allowed": verdict.allowed,
            "verdict": name,
            "from": src.key if isinstance(src, Pod) else str(src),
            "to": dst.key if isinstance(dst, Pod) else str(dst),
            "protocol": protocol.value,
            "port": port,
            "egress": _direction_json(verdict.egress),
            "ingress": _direction_json(verdict.ingress),
            "audit": None if staged.audit is None else _verdict_json(staged.audit),
        }
    )


def run(args: argparse.Namespace) -> int:
    try:
        port = _port(args.port)
        result = _load(args.source)
        for error in result.errors:
            print(f"warning: ignored invalid object: {error}", file=sys.stderr)
        state = ClusterState.from_objects(result.objects)
        finished = {obj.key for obj in result.objects if isinstance(obj, Pod) and obj.terminated}
        for given in (getattr(args, "from"), args.to):
            if given in finished and given not in state.pods:
                raise _BadInput(f"pod {given} has terminated (phase Succeeded or Failed): it takes no "
                                "part in policy, and its IPs may be another pod's by now")
        try:
            src = parse_endpoint(state, getattr(args, "from"))
            dst = parse_endpoint(state, args.to)
        except ValueError as exc:
            raise _BadInput(str(exc)) from None
    except _BadInput as exc:
        print(f"podfence explain: {exc}", file=sys.stderr)
        return EXIT_USAGE
    protocol = Protocol(args.protocol)
    verdict = evaluate_staged(state, src, dst, protocol, port, audit_all=args.audit_all)
    render = render_json if args.json else render_text
    print(render(src, dst, protocol, port, verdict))
    return EXIT_OK
