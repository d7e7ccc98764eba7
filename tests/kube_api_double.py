"""Test double of the Kubernetes API server: a real HTTP server on loopback that speaks the part of
the API podfence uses, so the real `kubernetes` client (its urllib3 timeouts, its Watch) runs
against it. There is no API server on this machine; this stands in for one, and is named so.

Served:
- list and watch of Namespaces (`/api/v1/namespaces`), Pods (`/api/v1/pods`), NetworkPolicies
  (`/apis/networking.k8s.io/v1/networkpolicies`) and ClusterNetworkPolicies (404, as without
  their CRD, unless `serve_cluster_policies`), with `limit`/`continue` pagination, a global
  resourceVersion, `resourceVersion` to resume a watch, `timeoutSeconds` honoured by the server,
  and BOOKMARK-free event streams as the API server writes them (one JSON event a line);
- GET and JSON-patch of a Node (`/api/v1/nodes/NAME`), for the control service's taint removal.

Misbehaviour, scripted per kind (`script_watch`), as a real API server or the network between can:
- "silent": accept the watch (200, headers) and then send nothing and never close: the client's
  view of a half-open connection (the peer vanished without a FIN, a wedged proxy);
- "gone": a 410 Expired ERROR event, as for a compacted resourceVersion;
and `unreachable`: every request is accepted and never answered, open watches fall silent (the
API server lost); `refuse`: every request of a kind gets that HTTP error (403: RBAC removed);
`expire_continue`: the next continue tokens are refused with 410, as after their expiry.
"""

from __future__ import annotations

import base64
import copy
import json
import threading
import time
from collections import defaultdict, deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

PATHS = {
    "/api/v1/namespaces": "Namespace",
    "/api/v1/pods": "Pod",
    "/apis/networking.k8s.io/v1/networkpolicies": "NetworkPolicy",
    "/apis/policy.networking.k8s.io/v1alpha2/clusternetworkpolicies": "ClusterNetworkPolicy",
}
CLUSTER_SCOPED = {"Namespace", "ClusterNetworkPolicy", "Node"}
NODES_PATH = "/api/v1/nodes/"


def _key(kind: str, doc: dict[str, Any]) -> tuple[str, str]:
    metadata = doc["metadata"]
    return ("" if kind in CLUSTER_SCOPED else metadata.get("namespace", ""), metadata["name"])


class KubeApiDouble:
    """Start with `start()`, point a client at `url`, `close()` at the end (a context manager too)."""

    def __init__(self, serve_cluster_policies: bool = False) -> None:
        self.serve_cluster_policies = serve_cluster_policies
        self._cond = threading.Condition()
        self._version = 1000
        self.objects: dict[str, dict[tuple[str, str], dict[str, Any]]] = defaultdict(dict)
        self._history: dict[str, list[tuple[int, str, dict[str, Any]]]] = defaultdict(list)
        self.compacted_below = 0  # a watch from an older resourceVersion gets 410
        self._scripts: dict[str, deque[str]] = defaultdict(deque)
        self.unreachable = threading.Event()
        self.expire_continue = 0  # the next N continue tokens are refused
        self.refuse: dict[str, int] = {}  # kind -> HTTP status every request of it gets (403, 500)
        self.requests: list[dict[str, Any]] = []  # {"method", "kind", "watch", "query"} of each request
        self.patches: list[tuple[str, list[dict[str, Any]]]] = []  # (node, JSON patch) applied
        self._closing = threading.Event()
        self._key_cache: dict[str, tuple[int, list[tuple[str, str]]]] = {}
        self._server: ThreadingHTTPServer | None = None

    # --- the cluster's state ---------------------------------------------------------------------

    def upsert(self, kind: str, doc: dict[str, Any]) -> int:
        with self._cond:
            self._version += 1
            stored = copy.deepcopy(doc)
            stored.setdefault("metadata", {})["resourceVersion"] = str(self._version)
            key = _key(kind, stored)
            event = "MODIFIED" if key in self.objects[kind] else "ADDED"
            self.objects[kind][key] = stored
            self._history[kind].append((self._version, event, stored))
            self._cond.notify_all()
            return self._version

    def delete(self, kind: str, namespace: str, name: str) -> int:
        with self._cond:
            self._version += 1
            stored = self.objects[kind].pop((namespace, name))
            stored = {**stored, "metadata": {**stored["metadata"], "resourceVersion": str(self._version)}}
            self._history[kind].append((self._version, "DELETED", stored))
            self._cond.notify_all()
            return self._version

    def compact(self) -> None:
        """Forget the event history: a watch from before the current version gets 410."""
        with self._cond:
            self.compacted_below = self._version
            self._history.clear()

    def script_watch(self, kind: str, *behaviours: str) -> None:
        """The next watches of `kind` behave so ("silent", "gone"), then normally again."""
        with self._cond:
            self._scripts[kind].extend(behaviours)

    def watches(self, kind: str) -> list[dict[str, Any]]:
        return [r for r in list(self.requests) if r["kind"] == kind and r["watch"]]

    def lists(self, kind: str) -> list[dict[str, Any]]:
        return [r for r in list(self.requests) if r["kind"] == kind and not r["watch"]]

    # --- serving ---------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> KubeApiDouble:
        double = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                double._handle(self, "GET")

            def do_PATCH(self) -> None:
                double._handle(self, "PATCH")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="kube-api-double", daemon=True).start()
        return self

    def close(self) -> None:
        self._closing.set()
        with self._cond:
            self._cond.notify_all()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def __enter__(self) -> KubeApiDouble:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _handle(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        url = urlparse(handler.path)
        query = {name: values[-1] for name, values in parse_qs(url.query).items()}
        if url.path.startswith(NODES_PATH):
            kind, watch = "Node", False
        else:
            kind, watch = PATHS.get(url.path, ""), query.get("watch") in ("true", "1")
        self.requests.append({"method": method, "kind": kind, "watch": watch, "query": query})
        if self.unreachable.is_set():
            self._hold(handler)  # accepted, never answered
            return
        if kind in self.refuse:
            self._status(handler, self.refuse[kind], "Forbidden", f"{kind} refused by the test")
        elif kind == "Node":
            self._node(handler, method, url.path[len(NODES_PATH):])
        elif not kind or (kind == "ClusterNetworkPolicy" and not self.serve_cluster_policies):
            self._status(handler, 404, "NotFound", f"the server could not find the resource {url.path}")
        elif watch:
            self._watch(handler, kind, query)
        else:
            self._list(handler, kind, query)

    def _hold(self, handler: BaseHTTPRequestHandler) -> None:
        while not self._closing.wait(0.05):
            pass

    def _send_json(self, handler: BaseHTTPRequestHandler, code: int, body: dict[str, Any]) -> None:
        send_json(handler, code, body)

    def _status(self, handler: BaseHTTPRequestHandler, code: int, reason: str, message: str) -> None:
        self._send_json(handler, code, _status_object(code, reason, message))

    def _list(self, handler: BaseHTTPRequestHandler, kind: str, query: dict[str, str]) -> None:
        token = query.get("continue")
        limit = int(query.get("limit", "0") or 0)
        with self._cond:
            if token is not None:
                if self.expire_continue > 0:
                    self.expire_continue -= 1
                    self._status(handler, 410, "Expired", "The provided continue parameter is too old")
                    return
                version, offset = json.loads(base64.b64decode(token))
            else:
                version, offset = self._version, 0
            keys = self._sorted_keys(kind)
            chosen = keys[offset:offset + limit] if limit else keys[offset:]
            page = [self.objects[kind][key] for key in chosen]
        metadata: dict[str, Any] = {"resourceVersion": str(version)}
        if limit and offset + limit < len(keys):
            metadata["continue"] = base64.b64encode(json.dumps([version, offset + limit]).encode()).decode()
        self._send_json(handler, 200, {"kind": f"{kind}List", "apiVersion": "v1", "metadata": metadata,
                                       "items": page})

    def _sorted_keys(self, kind: str) -> list[tuple[str, str]]:
        """The list order (sorted once per change: a 100,000-pod list is 200 pages)."""
        cached = self._key_cache.get(kind)
        if cached is None or cached[0] != self._version:
            cached = (self._version, sorted(self.objects[kind]))
            self._key_cache[kind] = cached
        return cached[1]

    def _watch(self, handler: BaseHTTPRequestHandler, kind: str, query: dict[str, str]) -> None:
        with self._cond:
            behaviour = self._scripts[kind].popleft() if self._scripts[kind] else "normal"
        since = int(query.get("resourceVersion") or 0)
        deadline = time.monotonic() + float(query.get("timeoutSeconds") or 3600)
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.end_headers()  # no length: the stream ends when the connection closes (HTTP/1.0)
        handler.wfile.flush()
        if behaviour == "silent":
            self._hold(handler)
            return
        if behaviour == "gone" or since < self.compacted_below:
            gone = _status_object(410, "Expired", f"too old resource version: {since}")
            self._write_event(handler, "ERROR", gone)
            return
        while time.monotonic() < deadline and not self._closing.is_set():
            if self.unreachable.is_set():
                self._hold(handler)  # the API server is gone: the open watch falls silent
                return
            with self._cond:
                pending = [(v, t, o) for v, t, o in self._history[kind] if v > since]
                if not pending:
                    self._cond.wait(min(0.05, max(0.0, deadline - time.monotonic())))
                    continue
            for version, event, obj in pending:
                self._write_event(handler, event, obj)
                since = version
        # timeoutSeconds reached: the server ends the watch cleanly, as the API server does

    def _write_event(self, handler: BaseHTTPRequestHandler, event: str, obj: dict[str, Any]) -> None:
        handler.wfile.write(json.dumps({"type": event, "object": obj}).encode() + b"\n")
        handler.wfile.flush()

    def _node(self, handler: BaseHTTPRequestHandler, method: str, name: str) -> None:
        with self._cond:
            node = self.objects["Node"].get(("", name))
            if node is None:
                self._status(handler, 404, "NotFound", f'nodes "{name}" not found')
                return
            if method == "PATCH":
                length = int(handler.headers.get("Content-Length") or 0)
                patch = json.loads(handler.rfile.read(length))
                error = _apply_json_patch(node, patch)
                if error is not None:
                    self._status(handler, 422 if "test" not in error else 409, "Invalid", error)
                    return
                self.patches.append((name, patch))
                self._version += 1
                node["metadata"]["resourceVersion"] = str(self._version)
            self._send_json(handler, 200, node)


def send_json(handler: BaseHTTPRequestHandler, code: int, body: dict[str, Any]) -> None:
    """One JSON response with its length, as the API server answers every non-watch request."""
    data = json.dumps(body).encode()
    handler.send_response(code)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


def _status_object(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


def _apply_json_patch(doc: dict[str, Any], patch: list[dict[str, Any]]) -> str | None:
    """RFC 6902 `test`, `remove` and `replace` on /a/b/0 paths (what a taint removal sends); all or
    nothing, as the API server applies it. Returns an error, or None once applied."""
    work = copy.deepcopy(doc)
    for op in patch:
        *parents, last = [part.replace("~1", "/").replace("~0", "~") for part in op["path"].split("/")[1:]]
        target: Any = work
        try:
            for part in parents:
                target = target[int(part)] if isinstance(target, list) else target[part]
            index: Any = int(last) if isinstance(target, list) else last
            if op["op"] == "test":
                if target[index] != op["value"]:
                    return f"test failed at {op['path']}"
            elif op["op"] == "remove":
                del target[index]
            elif op["op"] == "replace":
                target[index] = op["value"]
            else:
                return f"unsupported op {op['op']}"
        except (KeyError, IndexError, ValueError, TypeError):
            return f"no such path {op['path']}"
    doc.clear()
    doc.update(work)
    return None
