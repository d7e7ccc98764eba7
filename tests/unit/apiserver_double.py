"""TEST DOUBLE of the Kubernetes API server's TokenReview API (no API server can run here).

A real HTTPS server on loopback answering POST /apis/authentication.k8s.io/v1/tokenreviews the
way kube-apiserver does for projected service-account tokens: HTTP 201 with `status.authenticated`,
the user (`system:serviceaccount:<ns>:<name>`, groups, and the `authentication.kubernetes.io/pod-name`
and `pod-uid` extra of a token bound to a pod), and the audiences the token is valid for among
the requested ones; an unknown, expired or wrong-audience token is `authenticated: false` with an
error. The caller's own bearer credential is checked (401 without it), so the control service's
real kubernetes client, TLS verification and request encoding are exercised end to end.
"""

from __future__ import annotations

import json
import ssl
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.kube_api_double import send_json
from tests.unit.control_helpers import TestCA

TOKENREVIEW_PATH = "/apis/authentication.k8s.io/v1/tokenreviews"


@dataclass(frozen=True)
class IssuedToken:
    username: str
    audiences: tuple[str, ...]
    pod_name: str | None = None
    pod_uid: str | None = None
    expired: bool = False


class TokenReviewApiDouble:
    """Stands in for kube-apiserver's TokenReview; `tokens` maps token text to what it means."""

    __test__ = False

    def __init__(self, ca: TestCA, workdir: Path, caller_token: str = "control-credential") -> None:
        self.ca = ca
        self.caller_token = caller_token
        self.tokens: dict[str, IssuedToken] = {}
        self.reviews: list[dict[str, Any]] = []  # request bodies received
        self._workdir = workdir
        self._server: ThreadingHTTPServer | None = None
        self.port = 0

    def issue_pod_token(self, token: str, namespace: str, service_account: str, pod_name: str,
                        pod_uid: str, audiences: tuple[str, ...] = ("podfence",),
                        expired: bool = False) -> str:
        self.tokens[token] = IssuedToken(f"system:serviceaccount:{namespace}:{service_account}", audiences,
                                         pod_name, pod_uid, expired)
        return token

    def issue_user_token(self, token: str, username: str, audiences: tuple[str, ...] = ("podfence",)) -> str:
        self.tokens[token] = IssuedToken(username, audiences)
        return token

    # --- the server ------------------------------------------------------------------------------

    def start(self, port: int = 0) -> TokenReviewApiDouble:
        double = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                if self.path.split("?")[0] != TOKENREVIEW_PATH:
                    return self._reply(404, {"kind": "Status", "status": "Failure", "code": 404})
                if self.headers.get("Authorization") != f"Bearer {double.caller_token}":
                    return self._reply(401, {"kind": "Status", "status": "Failure", "code": 401,
                                             "reason": "Unauthorized"})
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                double.reviews.append(body)
                self._reply(201, double.answer(body))

            def _reply(self, code: int, payload: dict[str, Any]) -> None:
                send_json(self, code, payload)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        issued = self.ca.issue("kube-apiserver", server=True)
        cert, key = self._workdir / "apiserver.crt", self._workdir / "apiserver.key"
        cert.write_bytes(issued.cert)
        key.write_bytes(issued.key)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        server.daemon_threads = True
        server.socket = context.wrap_socket(server.socket, server_side=True)
        self._server = server
        self.port = server.server_address[1]
        threading.Thread(target=server.serve_forever, name="apiserver-double", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def answer(self, review: dict[str, Any]) -> dict[str, Any]:
        """The TokenReview kube-apiserver would return for `review`."""
        spec = review.get("spec") or {}
        wanted = tuple(spec.get("audiences") or ())
        issued = self.tokens.get(spec.get("token", ""))
        status: dict[str, Any]
        if issued is None:
            status = {"authenticated": False, "error": "[invalid bearer token, unknown token]"}
        elif issued.expired:
            status = {"authenticated": False,
                      "error": "[invalid bearer token, service account token has expired]"}
        elif wanted and not set(wanted) & set(issued.audiences):
            status = {"authenticated": False,
                      "error": "[invalid bearer token, token audiences is invalid for the target audiences]"}
        else:
            extra = {}
            if issued.pod_name:
                extra = {"authentication.kubernetes.io/pod-name": [issued.pod_name],
                         "authentication.kubernetes.io/pod-uid": [issued.pod_uid]}
            status = {
                "authenticated": True,
                "user": {"username": issued.username, "uid": "sa-uid",
                         "groups": ["system:serviceaccounts", "system:authenticated"], "extra": extra},
                "audiences": [a for a in wanted if a in issued.audiences] or list(issued.audiences),
            }
        return {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                "metadata": {"creationTimestamp": None}, "spec": spec, "status": status}

    def api_client(self, caller_token: str | None = None) -> Any:
        """A real kubernetes ApiClient pointed at this server, trusting its CA."""
        from kubernetes import client

        ca_file = self._workdir / "apiserver-ca.crt"
        ca_file.write_bytes(self.ca.pem)
        configuration = client.Configuration()
        configuration.host = f"https://127.0.0.1:{self.port}"
        configuration.ssl_ca_cert = str(ca_file)
        configuration.api_key = {"authorization": caller_token or self.caller_token}
        configuration.api_key_prefix = {"authorization": "Bearer"}
        configuration.retries = 0  # a down API server is reported at once, not after retries
        return client.ApiClient(configuration)
