"""FlowObserver.Observe: the control service's flow relay, for authorised readers only.

Flow records name who talks to whom across every tenant, so a reader must prove who it is and be
on the allow list: with mutual TLS, a client certificate whose CN is one of `allowed_names`; in
token mode, a service-account token (checked by TokenReview) whose user is one of `allowed_users`.
The status admins (`--admin-cn`, `--admin-users`) are allowed too. A node's certificate or an agent's
token is not: an agent sees its own flows already. Without TLS there is no caller identity, and
Observe is refused unless the service was started with `allow_unauthenticated` (the node lab on
loopback, where anyone who can reach the port can subscribe as any node anyway).
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable, Iterator

import grpc

from agent.api import podfence_pb2 as pb
from agent.api import podfence_pb2_grpc as pb_grpc
from agent.control.flow_relay import FilterError, FlowFilter, FlowRelay, TooManyReaders
from agent.control.identity import IdentityError, TokenAuthenticator, bearer_token, service_account_user

log = logging.getLogger(__name__)

OBSERVE_SERVICE = "podfence.v1.FlowObserver"
_POLL_S = 1.0  # how often a quiet follow stream checks that its caller is still there


def observe_users(names: Iterable[str]) -> frozenset[str]:
    """Allow-list entries as TokenReview usernames: "NAMESPACE/NAME" is a service account (ValueError
    when malformed), anything else a username as it is."""
    return frozenset(service_account_user(name) if "/" in name and ":" not in name else name
                     for name in names)


class FlowObserverService(pb_grpc.FlowObserverServicer):
    def __init__(self, relay: FlowRelay, tls: bool = False, allowed_names: Collection[str] = (),
                 authenticator: TokenAuthenticator | None = None, allowed_users: Collection[str] = (),
                 allow_unauthenticated: bool = False) -> None:
        self._relay = relay
        self._tls = tls
        self._allowed_names = frozenset(allowed_names)
        self._authenticator = authenticator
        self._allowed_users = observe_users(allowed_users)
        self._allow_unauthenticated = allow_unauthenticated

    def Observe(self, request: pb.ObserveRequest, context: grpc.ServicerContext) -> Iterator[pb.FlowRecord]:
        refusal = self._refusal(context)
        if refusal is not None:
            log.warning("refused an Observe call from %s: %s", context.peer(), refusal[1])
            context.abort(*refusal)
        try:
            flow_filter = FlowFilter.from_request(request)
        except FilterError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if not request.since_seconds >= 0:  # also refuses nan
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "since_seconds must be >= 0")
        try:
            backlog, reader = self._relay.subscribe(flow_filter, request.since_seconds, request.last,
                                                    request.follow)
        except TooManyReaders as exc:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        if reader is not None:
            following = reader
            context.add_callback(lambda: self._relay.unsubscribe(following))
        try:
            yield from backlog
            self._relay.sent(len(backlog))
            while reader is not None and context.is_active() and not reader.closed:
                fresh = reader.next(timeout=_POLL_S)
                if fresh is not None:
                    yield fresh
                    self._relay.sent()
        finally:
            if reader is not None:
                self._relay.unsubscribe(reader)

    def _refusal(self, context: grpc.ServicerContext) -> tuple[grpc.StatusCode, str] | None:
        """Why the caller may not observe; None when it may."""
        if not self._tls and self._authenticator is None:
            if self._allow_unauthenticated:
                return None
            return (grpc.StatusCode.UNAUTHENTICATED,
                    "observe needs an authenticated caller: this control service runs without TLS")
        names = {v.decode(errors="replace") for v in context.auth_context().get("x509_common_name", [])}
        if self._tls and names & self._allowed_names:
            return None
        if self._authenticator is not None:
            try:
                caller = self._authenticator.caller(bearer_token(context.invocation_metadata()))
            except IdentityError as failure:
                return failure.code, failure.message
            if caller.admin or caller.user in self._allowed_users:
                return None
            return grpc.StatusCode.PERMISSION_DENIED, f"{caller.user} may not observe flows"
        return (grpc.StatusCode.PERMISSION_DENIED,
                f"client certificate for {sorted(names) or 'no name'} may not observe flows")
