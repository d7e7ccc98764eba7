"""Where a deciding rule sends a new flow: straight to its fate, through a flow-record log chain,
or on to an audit chain. The compiler (compiler.py) asks `Targets.decided` for the target of every
rule that accepts or denies by policy, `Targets.dropped` for the drops no policy decides (a
spoofed source, IPv4 options, an unknown interface, a pod's flow bound).

Enforcement alone: an Accept RETURNs and a Deny DROPs (TARGETS). With flow records on
(`flow_group`), each deciding rule goes instead to the log chain of its verdict and rule
(flowrecords.log_chain_rules), which NFLOGs the packet to the agent and then RETURNs or DROPs; the
rule_ref in the chain's name is read back through DesiredState.rule_names.

An endpoint direction with an audit view (DirectionPolicy.audit) is compiled as enforced, but each
enforced Accept sends its new flows on to an audit chain: the audit policy compiled again, where an
Accept ends as the enforced allow would and a Deny is a counted RETURN (AUDIT_DENY, logged as
audit-denied when flow records are on). Every exit of an audit chain passes: an audit policy
changes no packet's fate.

    PF-I…/PF-E…:  head; the enforced allows -g PF-…u; DROP
    PF-…u:        the audit allows -> as the enforced allow; the rest -> auditdeny RETURN
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from agent.dataplane.flows import FlowVerdict
from agent.dataplane.iptables.flowrecords import NO_POLICY, NO_RULE, RuleName, log_chain, rule_ref
from agent.dataplane.iptables.layout import (
    ALLOW,
    AUDIT_DENY,
    DENY,
    DesiredState,
    comment,
    endpoint_chain_name,
)
from agent.dataplane.types import ACTION_ACCEPT, ACTION_DENY, DirectionPolicy, Endpoint

# What an Accept and a Deny do without flow records or an audit view.
TARGETS = {ACTION_ACCEPT: f"{comment(ALLOW)} -j RETURN", ACTION_DENY: f"{comment(DENY)} -j DROP"}

# The compiler's rules for a policy past an endpoint chain's head: (endpoint, direction, family,
# policy) -> rules. An audit chain is such rules for the audit view.
PolicyRules = Callable[[Endpoint, str, int, DirectionPolicy], list[str]]


class Targets:
    def __init__(self, out: DesiredState, flow_group: int | None, policy_rules: PolicyRules) -> None:
        self.out = out
        self.flow_group = flow_group
        self._policy_rules = policy_rules
        # while an audit chain is built (_audit_chain): (the enforced allow's target, endpoint
        # key, direction); decided() then sends Accepts there and makes Denies counted RETURNs
        self.auditing: tuple[str, str, str] | None = None
        # while an endpoint direction with an audit view is compiled (audited): what its audit
        # chains judge
        self._audit_of: tuple[Endpoint, str, DirectionPolicy] | None = None

    @property
    def plain(self) -> bool:
        """Every Accept RETURNs and every Deny DROPs: no deciding rule needs a target of its own."""
        return not self.flow_group and self.auditing is None and self._audit_of is None

    def decided(self, family: int, action: int, name: RuleName) -> str:
        """The target of a rule that decides for `name`: RETURN (Accept) or DROP (Deny), through
        the log chain of its rule_ref when flow records are on. In an audit chain: an Accept is
        the enforced allow's own target, a Deny a counted RETURN (logged as audit-denied, naming
        the audit rule, when flow records are on). With an audit view, an Accept goes on to it."""
        if self.auditing is not None:
            allow_target, key, direction = self.auditing
            if action == ACTION_ACCEPT:
                return allow_target
            counted = comment(f"{AUDIT_DENY} {direction} {key}")
            if not self.flow_group:
                return f"{counted} -j RETURN"
            return f"{counted} -g {self._log_chain(family, FlowVerdict.AUDIT_DENIED, name)}"
        if self._audit_of is not None and action == ACTION_ACCEPT:
            enforced = self._enforced(family, action, name)
            return f"{comment(ALLOW)} -g {self._audit_chain(family, enforced)}"
        return self._enforced(family, action, name)

    def dropped(self, family: int, direction: str, reason: str, why: str) -> str:
        """The target of a rule dropping for `reason` (a types.Reason name) rather than by a
        policy's rule: DROP, through a log chain naming the reason when flow records are on."""
        if not self.flow_group:
            return "-j DROP"
        return f"-g {self._log_chain(family, FlowVerdict.DENIED, RuleName(direction, '', '', why, reason))}"

    def default_allow(self, family: int, direction: str) -> str:
        """The target of the rule that admits what no policy isolates."""
        return self.decided(family, ACTION_ACCEPT, RuleName(direction, "default", "", NO_POLICY))

    def isolated_deny(self, family: int, direction: str) -> str:
        """The target of an isolated direction's last rule: no rule matched."""
        return self.decided(family, ACTION_DENY, RuleName(direction, "networkpolicy", "", NO_RULE))

    @contextmanager
    def audited(self, endpoint: Endpoint, direction: str, audit: DirectionPolicy | None) -> Iterator[None]:
        """While the enforced rules of an endpoint direction are compiled: their Accepts go on to
        the audit view `audit` (None: no audit view, the Accepts decide)."""
        self._audit_of = None if audit is None else (endpoint, direction, audit)
        try:
            yield
        finally:
            self._audit_of = None

    def _enforced(self, family: int, action: int, name: RuleName) -> str:
        if not self.flow_group:
            return TARGETS[action]
        verdict = FlowVerdict.ALLOWED if action == ACTION_ACCEPT else FlowVerdict.DENIED
        counted = comment(ALLOW if action == ACTION_ACCEPT else DENY)
        return f"{counted} -g {self._log_chain(family, verdict, name)}"

    def _log_chain(self, family: int, verdict: FlowVerdict, name: RuleName) -> str:
        """The log chain of `verdict` for the rule `name`, written once per family."""
        assert self.flow_group
        ref = rule_ref(name)
        chain, rules = log_chain(verdict, ref, self.flow_group)
        self.out.chains[family].setdefault(chain, rules)
        self.out.rule_names[ref] = name
        return chain

    def _audit_chain(self, family: int, allow_target: str) -> str:
        """The audit view of the endpoint direction being compiled, for the new flows of one
        enforced allow: its Accepts end as that allow would (`allow_target`), its Denies in a
        counted RETURN (AUDIT_DENY). Every exit passes: an audit policy changes no fate."""
        assert self._audit_of is not None
        endpoint, direction, audit = self._audit_of
        self._audit_of, self.auditing = None, (allow_target, endpoint.key, direction)
        try:
            rules = self._policy_rules(endpoint, direction, family, audit)
        finally:
            self._audit_of, self.auditing = (endpoint, direction, audit), None
        name = endpoint_chain_name(endpoint.key, direction, rules, "u")
        self.out.chains[family][name] = rules
        return name
