"""Policy source: list+watch of Namespaces, Pods, NetworkPolicies and ClusterNetworkPolicies.

One thread per kind: list (remembering the list's resourceVersion), then watch from there,
following every event's resourceVersion and the server's bookmarks. A 410 Gone (the version
was compacted away, or a list's continue token expired) re-lists from scratch, and the re-list is
diffed against what was known so deletions missed meanwhile are applied. Other errors back off
exponentially with full jitter and resume the watch from the last resourceVersion.

Lists are paginated (`limit`, `continue`: `page_size` objects a page, all pages from one snapshot)
and read as JSON without the client's model classes, so listing 100,000 pods holds one page of
raw JSON at a time (bench/k8s_list.py). Nothing is applied until the last page has arrived.

No request can hang for ever. A watch asks the server to end it after `timeout_seconds`, drawn at
random from [watch_timeout, 2 x watch_timeout) so replicas do not re-watch in step, and the client
gives up on a connection silent for that long plus `request_timeout` (urllib3's read timeout): a
half-open connection (a peer gone without a FIN, a wedged proxy) is noticed within
2 x watch_timeout + request_timeout, then the watch resumes from its resourceVersion. Every list
request has `request_timeout` too. Each answer is noted in a FreshnessTracker, so `/healthz`, the
metrics and `podfence status` tell how long ago the API server was last heard from; meanwhile the
last state read keeps being served.

An invalid object never opens anything (the API server validates objects, but podfence is
stricter in places, and may be older than the cluster): an object whose new form fails
validation keeps its previous valid form in force, on a watch event and on a re-list alike, with
its error in `podfence status` and the metrics until it is fixed or deleted. An object invalid
from its first appearance is rejected (reported, never applied); a deleted object is deleted.

ClusterNetworkPolicy (`policy.networking.k8s.io/v1alpha2`) is a CRD a cluster may not have: while
the API server answers 404 for it, the kind counts as listed and empty (so agents are served), and
the list is retried every `backoff_max` seconds (at most every watch timeout: each 404 is an answer
that keeps the source fresh), so installing the CRD later takes effect.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from agent.control.freshness import FreshnessTracker
from agent.control.hub import PolicyHub, SourceProblem
from agent.model.cluster_policy import CNP_API_VERSION
from agent.model.load import parse_object
from agent.model.objects import KubeObject

log = logging.getLogger(__name__)

ObjectKey = tuple[str, str]  # (namespace, name) within one kind
ListFunction = Callable[..., Any]

API_VERSIONS = {
    "Namespace": "v1",
    "Pod": "v1",
    "NetworkPolicy": "networking.k8s.io/v1",
    "ClusterNetworkPolicy": CNP_API_VERSION,
}
CLUSTER_SCOPED = frozenset({"Namespace", "ClusterNetworkPolicy"})
OPTIONAL_KINDS = frozenset({"ClusterNetworkPolicy"})  # a CRD: absent (404) means none

DEFAULT_WATCH_TIMEOUT_S = 120  # a watch lasts 120..240 s; client-go's 300..600 s halves freshness
DEFAULT_REQUEST_TIMEOUT_S = 30.0
DEFAULT_PAGE_SIZE = 500  # client-go's pager default
CONNECT_TIMEOUT_S = 10.0


class _Relist(Exception):
    """The watch's resourceVersion is gone (410): list again."""


def _api_list_functions(api_client: Any) -> dict[str, ListFunction]:
    from kubernetes import client

    core = client.CoreV1Api(api_client)
    networking = client.NetworkingV1Api(api_client)
    custom = client.CustomObjectsApi(api_client)
    group, version = CNP_API_VERSION.split("/")

    def list_cluster_network_policies(**kwargs: Any) -> Any:
        """Lists (or with watch=True, watches) ClusterNetworkPolicies; items are plain dicts."""
        return custom.list_cluster_custom_object(group, version, "clusternetworkpolicies", **kwargs)

    return {
        "Namespace": core.list_namespace,
        "Pod": core.list_pod_for_all_namespaces,
        "NetworkPolicy": networking.list_network_policy_for_all_namespaces,
        "ClusterNetworkPolicy": list_cluster_network_policies,
    }


def load_api_client(kubeconfig: str | None) -> Any:
    """An ApiClient from --kubeconfig, else the in-cluster service account, else ~/.kube/config."""
    from kubernetes import client, config

    if kubeconfig:
        return config.new_client_from_config(config_file=kubeconfig)
    try:
        config.load_incluster_config()
    except config.ConfigException:
        return config.new_client_from_config()
    return client.ApiClient()


class KubernetesSource:
    """Feeds a PolicyHub from the API server. `watch_factory` and `list_functions` are seams for tests."""

    def __init__(
        self,
        hub: PolicyHub,
        api_client: Any,
        list_functions: dict[str, ListFunction] | None = None,
        watch_factory: Callable[[], Any] | None = None,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        watch_timeout_seconds: int = DEFAULT_WATCH_TIMEOUT_S,
        request_timeout_seconds: float = DEFAULT_REQUEST_TIMEOUT_S,
        page_size: int = DEFAULT_PAGE_SIZE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        from kubernetes import watch

        if watch_timeout_seconds < 1 or not request_timeout_seconds > 0 or page_size < 1:
            raise ValueError("watch timeout >= 1 s, request timeout > 0 s and page size >= 1 needed")

        self._hub = hub
        self._api_client = api_client
        self._list_functions = list_functions or _api_list_functions(api_client)
        self._watch_factory = watch_factory or watch.Watch
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._watch_timeout = watch_timeout_seconds
        self._request_timeout = request_timeout_seconds
        self._page_size = page_size
        self._absent_retry = min(backoff_max, watch_timeout_seconds)
        self._known: dict[str, dict[ObjectKey, KubeObject]] = {kind: {} for kind in self._list_functions}
        self._invalid: dict[tuple[str, str, str], str] = {}
        self._lock = threading.Lock()  # guards _invalid, shared by the per-kind threads
        self.resource_versions: dict[str, str | None] = {kind: None for kind in self._list_functions}
        self.relists: dict[str, int] = {kind: 0 for kind in self._list_functions}
        self.last_error: str | None = None
        self._listed: set[str] = set()
        self.synced = threading.Event()  # every kind has been listed once
        # The longest a healthy source goes without an answer: a quiet watch of the longest
        # timeout, plus the grace of the read timeout.
        self.freshness = FreshnessTracker(
            "kubernetes", self._list_functions, 2 * watch_timeout_seconds + request_timeout_seconds, clock
        )

    # --- running ---------------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Watches every kind until `stop` is set."""
        threads = [
            threading.Thread(target=self.watch_kind, args=(kind, stop), name=f"watch-{kind}", daemon=True)
            for kind in self._list_functions
        ]
        for thread in threads:
            thread.start()
        stop.wait()
        for thread in threads:
            thread.join(timeout=1.0)

    def watch_kind(self, kind: str, stop: threading.Event, max_attempts: int | None = None) -> None:
        """List then watch one kind; `max_attempts` bounds the (re-list and) watch rounds, for replays."""
        delay = self._backoff_initial
        attempts = 0
        while not stop.is_set() and (max_attempts is None or attempts < max_attempts):
            attempts += 1
            try:
                if self.resource_versions[kind] is None:
                    self.relist(kind)
                self._watch_once(kind, stop)
                delay = self._backoff_initial
            except _Relist:
                self.resource_versions[kind] = None
                self.relists[kind] += 1
                log.info("%s watch: resourceVersion expired (410 Gone); listing again", kind)
            except Exception as exc:
                if _status(exc) == 410 or (_status(exc) == 404 and kind in OPTIONAL_KINDS):
                    self.freshness.heard(kind)  # routine answers; a 403 or 500 brings no news
                if _status(exc) == 410:
                    self.resource_versions[kind] = None
                    self.relists[kind] += 1
                    log.info("%s watch: 410 Gone; listing again", kind)
                    continue
                if _status(exc) == 404 and kind in OPTIONAL_KINDS:
                    self._absent(kind)
                    stop.wait(self._absent_retry)
                    continue
                self.last_error = f"{kind} watch: {exc}"
                self._hub.metrics.source_errors_total.inc()
                pause = random.uniform(0, delay)
                log.warning("%s watch failed (%s); retrying in %.1fs", kind, exc, pause)
                stop.wait(pause)
                delay = min(self._backoff_max, delay * 2)

    def _absent(self, kind: str) -> None:
        """The API server does not serve `kind` (its CRD is not installed): none exist."""
        self.resource_versions[kind] = None
        if kind in self._listed and not self._known[kind]:
            return  # still absent: nothing changed, no new version
        log.info("%s: not served by the API server (CRD not installed); retrying every %.0f s",
                 kind, self._absent_retry)
        self._apply_listing(kind, {}, set())
        self._report()

    def relist(self, kind: str) -> None:
        """Lists `kind`, page by page, and makes the resolver hold exactly the listed objects."""
        listed: dict[ObjectKey, KubeObject] = {}
        known = self._known[kind]
        present: set[ObjectKey] = set()
        token: str | None = None
        version: str | None = None
        pages = 0
        while True:
            page = self._list_page(kind, token)
            pages += 1
            for data in page.get("items") or []:
                data = self._to_dict(data)
                obj = self._parse(kind, data)
                key = _identity(kind, data)
                present.add(key)
                if obj is not None:
                    listed[(getattr(obj, "namespace", ""), obj.name)] = obj
                elif key in known:  # listed but invalid now: its last valid form stays in force
                    listed[key] = known[key]
            metadata = page.get("metadata") or {}
            version = metadata.get("resourceVersion") or version  # every page: the one snapshot
            token = metadata.get("continue") or None
            if token is None:
                break
        self._apply_listing(kind, listed, present, version)
        self.resource_versions[kind] = version or "0"
        self._report()
        log.info("listed %d %s object(s) in %d page(s) at resourceVersion %s", len(listed), kind, pages,
                 self.resource_versions[kind])

    def _list_page(self, kind: str, token: str | None) -> dict[str, Any]:
        """One page as a JSON dict. A 410 for an expired `token` propagates: the caller re-lists."""
        arguments: dict[str, Any] = {
            "limit": self._page_size,
            "_request_timeout": (min(CONNECT_TIMEOUT_S, self._request_timeout), self._request_timeout),
            "_preload_content": False,  # raw JSON: the typed models would triple the memory
        }
        if token is not None:
            arguments["_continue"] = token
        result = self._list_functions[kind](**arguments)
        self.freshness.heard(kind)
        if isinstance(result, dict):
            return result
        body = getattr(result, "data", None)
        if isinstance(body, bytes):  # the raw urllib3 response
            try:
                page = json.loads(body)
            finally:
                release = getattr(result, "release_conn", None)
                if callable(release):
                    release()
            if not isinstance(page, dict):
                raise ValueError(f"{kind} list: expected a JSON object, got {type(page).__name__}")
            return page
        return self._to_dict(result)  # a model object (test doubles of the typed client)

    def _apply_listing(self, kind: str, listed: dict[ObjectKey, KubeObject], present: set[ObjectKey],
                       version: str | None = None) -> None:
        """Makes the resolver hold exactly `listed` of `kind`; `present` = every listed key, valid or not."""
        known = self._known[kind]
        with self._lock:  # objects deleted while unwatched: their errors go with them
            for invalid in [k for k in self._invalid if k[0] == kind and k[1:] not in present]:
                del self._invalid[invalid]
        removed = [key for key in known if key not in listed]
        changed = [obj for key, obj in listed.items() if known.get(key) != obj]
        if removed or changed or not known:
            with self._hub.change() as resolver:
                self._note_source(kind, version)
                for namespace, name in removed:
                    resolver.delete(kind, namespace, name)
                for obj in changed:
                    resolver.upsert(obj)
        self._known[kind] = listed
        self._listed.add(kind)
        if self._listed >= set(self._list_functions):
            self.synced.set()

    def _watch_once(self, kind: str, stop: threading.Event) -> None:
        # Randomised so replicas (and kinds) do not all re-watch in the same second.
        timeout = random.randint(self._watch_timeout, 2 * self._watch_timeout - 1) \
            if self._watch_timeout > 1 else 1
        list_function = self._list_functions[kind]

        def accepted(**kwargs: Any) -> Any:
            """The list function, noting the server's answer to the watch request itself. (Its
            return annotation names no client model, so Watch leaves events as plain dicts.)"""
            response = list_function(**kwargs)
            self.freshness.heard(kind)
            return response

        watcher = self._watch_factory()
        stream = watcher.stream(
            accepted,
            resource_version=self.resource_versions[kind],
            timeout_seconds=timeout,
            allow_watch_bookmarks=True,
            # urllib3's read timeout: a connection silent past the server's own timeout is dead.
            _request_timeout=(min(CONNECT_TIMEOUT_S, self._request_timeout), timeout + self._request_timeout),
        )
        for event in stream:
            self.freshness.heard(kind)
            if stop.is_set():
                watcher.stop()
                return
            self._handle_event(kind, event)
        self.freshness.heard(kind)  # the server ended the watch at its timeout: it is alive

    # --- events ----------------------------------------------------------------------------------

    def _handle_event(self, kind: str, event: dict[str, Any]) -> None:
        event_type = event.get("type")
        raw = event.get("raw_object")
        if raw is None:
            raw = self._to_dict(event.get("object"))
        if event_type == "ERROR":
            if raw.get("code") == 410:
                raise _Relist()
            raise RuntimeError(f"watch error event: {raw.get('message', raw)}")
        version = (raw.get("metadata") or {}).get("resourceVersion")
        if event_type == "BOOKMARK":
            self.resource_versions[kind] = version or self.resource_versions[kind]
            return
        namespace = (raw.get("metadata") or {}).get("namespace", "") if kind not in CLUSTER_SCOPED else ""
        name = (raw.get("metadata") or {}).get("name", "")
        known = self._known[kind]
        if event_type == "DELETED":
            if known.pop((namespace, name), None) is not None:
                with self._hub.change() as resolver:
                    self._note_source(kind, version)
                    resolver.delete(kind, namespace, name)
            self._set_invalid(kind, namespace, name, None)
        elif event_type in ("ADDED", "MODIFIED"):
            obj = self._parse(kind, raw)
            if obj is not None and known.get((namespace, name)) != obj:
                known[(namespace, name)] = obj
                with self._hub.change() as resolver:
                    self._note_source(kind, version)
                    resolver.upsert(obj)
        else:
            log.debug("%s watch: ignoring event type %s", kind, event_type)
        if version:
            self.resource_versions[kind] = version
        self._report()

    def _note_source(self, kind: str, pending: str | None) -> None:
        """Hands the hub the source state of the version being published: the oldest of the
        kinds' resourceVersions (etcd revisions: every kind is known at least up to it)."""
        versions = dict(self.resource_versions)
        if pending:
            versions[kind] = pending
        known = {k: v for k, v in versions.items() if v and v != "0"}
        numbers = [int(v) for v in known.values() if v.isdigit()]
        digest = hashlib.sha256(",".join(f"{k}={v}" for k, v in sorted(known.items())).encode()).hexdigest()
        self._hub.note_source(min(numbers) if numbers else 0, "rv:" + digest[:16])

    def _to_dict(self, obj: Any) -> dict[str, Any]:
        if isinstance(obj, dict):
            return obj
        data = self._api_client.sanitize_for_serialization(obj)
        return data if isinstance(data, dict) else {}

    def _parse(self, kind: str, data: dict[str, Any]) -> KubeObject | None:
        # Items of a list response carry no kind/apiVersion of their own.
        data = {"kind": kind, "apiVersion": API_VERSIONS.get(kind, "v1"), **data}
        namespace, name = _identity(kind, data)
        try:
            obj = parse_object(data)
        except Exception as exc:  # PolicyError names the object and field
            detail = getattr(exc, "error", exc)
            kept = (namespace, name) in self._known.get(kind, {})
            log.warning("invalid %s %s/%s (%s): %s", kind, namespace, name,
                        "its last valid form stays in force" if kept else "rejected", detail)
            self._set_invalid(kind, namespace, name, str(detail))
            return None
        self._set_invalid(kind, namespace, name, None)
        return obj

    def _set_invalid(self, kind: str, namespace: str, name: str, error: str | None) -> None:
        with self._lock:
            if error is None:
                self._invalid.pop((kind, namespace, name), None)
            else:
                self._invalid[(kind, namespace, name)] = error

    def _report(self) -> None:
        """Hands the current invalid objects to the hub (status, metrics)."""
        with self._lock:
            problems = [
                SourceProblem(
                    f"{kind} {namespace}/{name}" if namespace else f"{kind} {name}",
                    "kubernetes",
                    error,
                    last_valid_in_force=(namespace, name) in self._known.get(kind, {}),
                )
                for (kind, namespace, name), error in self._invalid.items()
            ]
            self._hub.set_source_problems(problems)

    @property
    def invalid_objects(self) -> Iterable[str]:
        with self._lock:
            return list(self._invalid.values())


def _identity(kind: str, data: dict[str, Any]) -> ObjectKey:
    metadata = data.get("metadata")
    metadata = metadata if isinstance(metadata, dict) else {}
    namespace = metadata.get("namespace", "") if kind not in CLUSTER_SCOPED else ""
    name = metadata.get("name", "")
    return (namespace if isinstance(namespace, str) else "", name if isinstance(name, str) else "")


def _status(exc: Exception) -> int | None:
    status = getattr(exc, "status", None)
    return status if isinstance(status, int) else None
