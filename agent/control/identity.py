"""Node identity from Kubernetes service-account tokens: which node may a Sync stream speak for?

Copying a client certificate onto every node does not survive autoscaling. In token mode
(`--identity token`) the agent sends its pod's projected service-account token (audience
`podfence`) as the call's `authorization: Bearer` metadata, and the control service:

1. asks the API server whether the token is valid (a TokenReview, with the audience; any
   failure to ask fails closed: the stream is refused with UNAVAILABLE and says why);
2. accepts only the agents' service account (`system:serviceaccount:<ns>:<name>`): a token of
   any other pod is refused, however valid;
3. takes the pod the token is bound to from the review's user extra (`pod-name`, `pod-uid`,
   set by the API server for projected tokens only: a legacy token names no pod and is refused);
4. looks that pod up in its own pod cache (the policy source's pods) and binds the stream to
   the pod's `spec.nodeName` there, never to anything the agent says. A pod the cache does not
   hold (yet), or holds under another uid (a deleted pod's token), is refused.

So a token stolen from node A's agent can subscribe as node A only: it never reads node B's
policy. A stream is checked when it opens; a reconnect presents the (rotated) token again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import grpc

from agent.model.objects import Pod

log = logging.getLogger(__name__)

TOKEN_AUDIENCE = "podfence"
DEFAULT_AGENT_SERVICE_ACCOUNT = "podfence-system/podfence-agent"
DEFAULT_REVIEW_TIMEOUT_S = 5.0
POD_NAME_EXTRA = "authentication.kubernetes.io/pod-name"
POD_UID_EXTRA = "authentication.kubernetes.io/pod-uid"
TOKENREVIEW_PATH = "/apis/authentication.k8s.io/v1/tokenreviews"
AUTHORIZATION = "authorization"  # gRPC metadata keys are lower case


class IdentityError(Exception):
    """The caller cannot be given a node; `code` is the gRPC status to end the call with."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class ReviewedToken:
    """What the API server says about a valid token."""

    username: str
    groups: tuple[str, ...]
    pod_name: str | None  # the pod a projected token is bound to
    pod_uid: str | None


@dataclass(frozen=True)
class Caller:
    """An authenticated caller: `node` is the node it may sync as (None: not an agent)."""

    user: str
    node: str | None
    admin: bool = False


def bearer_token(metadata: Any) -> str | None:
    """The token of an `authorization: Bearer <token>` entry of a call's metadata, if any."""
    for key, value in metadata or ():
        if key.lower() == AUTHORIZATION and isinstance(value, str):
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


def service_account_user(namespace_name: str) -> str:
    """"ns/name" -> the username the API server gives that service account's tokens."""
    namespace, sep, name = namespace_name.partition("/")
    if not sep or not namespace or not name or "/" in name:
        raise ValueError(f"expected NAMESPACE/NAME of a service account, not {namespace_name!r}")
    return f"system:serviceaccount:{namespace}:{name}"


class TokenReviewer:
    """Checks tokens with the API server's TokenReview, through a kubernetes ApiClient (which
    carries the control service's own credentials: it needs `create` on `tokenreviews`)."""

    def __init__(self, api_client: Any, audience: str = TOKEN_AUDIENCE,
                 timeout_s: float = DEFAULT_REVIEW_TIMEOUT_S) -> None:
        from kubernetes import client

        self._api = client.AuthenticationV1Api(api_client)
        self._client = client
        self._audience = audience
        self._timeout = timeout_s
        self._where = getattr(getattr(api_client, "configuration", None), "host", "the API server")

    def review(self, token: str) -> ReviewedToken:
        """The token's user; IdentityError when it is not valid for our audience or cannot be checked."""
        from kubernetes.client.rest import ApiException

        body = self._client.V1TokenReview(
            api_version="authentication.k8s.io/v1", kind="TokenReview",
            spec=self._client.V1TokenReviewSpec(token=token, audiences=[self._audience]),
        )
        try:
            answer = self._api.create_token_review(body, _request_timeout=self._timeout)
        except ApiException as exc:
            hint = " (may the control service's account create tokenreviews?)" if exc.status in (
                401, 403) else ""
            raise IdentityError(
                grpc.StatusCode.UNAVAILABLE,
                f"cannot check the token: TokenReview at {self._where} answered HTTP {exc.status} "
                f"{exc.reason}{hint}",
            ) from exc
        except Exception as exc:  # connection refused, TLS, timeout: fail closed, say why
            raise IdentityError(
                grpc.StatusCode.UNAVAILABLE,
                f"cannot check the token: TokenReview at {self._where} failed: {_short(exc)}",
            ) from exc
        status = getattr(answer, "status", None)
        if status is None or not status.authenticated:
            why = (getattr(status, "error", None) or "not authenticated") if status else "no status"
            raise IdentityError(grpc.StatusCode.UNAUTHENTICATED, f"token rejected by the API server: {why}")
        if self._audience not in (status.audiences or ()):
            raise IdentityError(grpc.StatusCode.UNAUTHENTICATED,
                                f"token is not valid for the audience {self._audience!r}")
        user = status.user
        extra = (user.extra if user is not None else None) or {}
        return ReviewedToken(
            username=(user.username if user is not None else None) or "",
            groups=tuple((user.groups if user is not None else None) or ()),
            pod_name=_single(extra.get(POD_NAME_EXTRA)),
            pod_uid=_single(extra.get(POD_UID_EXTRA)),
        )


class TokenAuthenticator:
    """Turns a bearer token into a Caller: an agent pod's token gives the node of that pod in
    `find_pod` (the control service's own pod cache)."""

    def __init__(
        self,
        reviewer: TokenReviewer,
        find_pod: Callable[[str, str], Pod | None],
        agent_service_account: str = DEFAULT_AGENT_SERVICE_ACCOUNT,
        admin_users: Collection[str] = (),
    ) -> None:
        self._reviewer = reviewer
        self._find_pod = find_pod
        self._agent_user = service_account_user(agent_service_account)
        self._agent_namespace = agent_service_account.partition("/")[0]
        self._admin_users = frozenset(admin_users)

    def caller(self, token: str | None) -> Caller:
        """Who presents `token`; IdentityError when nobody (or the token cannot be checked)."""
        if not token:
            raise IdentityError(grpc.StatusCode.UNAUTHENTICATED,
                                "no service-account token (metadata 'authorization: Bearer <token>')")
        reviewed = self._reviewer.review(token)
        if reviewed.username in self._admin_users:
            return Caller(reviewed.username, None, admin=True)
        if reviewed.username != self._agent_user:
            return Caller(reviewed.username, None)
        return Caller(reviewed.username, self._agent_node(reviewed))

    def agent_node(self, token: str | None) -> str:
        """The node an agent's `token` may sync as; IdentityError for any other token."""
        caller = self.caller(token)
        if caller.node is None:
            raise IdentityError(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{caller.user} is not the podfence agents' service account {self._agent_user}",
            )
        return caller.node

    def _agent_node(self, reviewed: ReviewedToken) -> str:
        if not reviewed.pod_name:
            raise IdentityError(grpc.StatusCode.PERMISSION_DENIED,
                                "the token is bound to no pod: mount a projected service-account token")
        where = f"{self._agent_namespace}/{reviewed.pod_name}"
        pod = self._find_pod(self._agent_namespace, reviewed.pod_name)
        if pod is None:
            raise IdentityError(grpc.StatusCode.PERMISSION_DENIED,
                                f"agent pod {where} is not in this control service's pod cache (yet)")
        if reviewed.pod_uid and pod.uid and reviewed.pod_uid != pod.uid:
            raise IdentityError(grpc.StatusCode.PERMISSION_DENIED,
                                f"the token belongs to an earlier pod named {where} (uid {reviewed.pod_uid})")
        if not pod.node_name:
            raise IdentityError(grpc.StatusCode.PERMISSION_DENIED, f"agent pod {where} is on no node")
        return pod.node_name


def _single(values: Any) -> str | None:
    if isinstance(values, list | tuple) and len(values) == 1 and isinstance(values[0], str):
        return values[0]
    return None


def _short(exc: Exception) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:300]
