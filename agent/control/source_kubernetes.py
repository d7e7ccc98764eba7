"""Policy source: list+watch of Namespaces, Pods, NetworkPolicies and ClusterNetworkPolicies.

One thread per kind: list (remembering the list's resourceVersion), then watch from there,
following every event's resourceVersion and the server's bookmarks. A 410 Gone (the version
was compacted away) re-lists, and the re-list is diffed against what was known so deletions
missed meanwhile are applied. Other errors back off exponentially with full jitter and resume
the watch from the last resourceVersion. API objects become dicts with
`ApiClient.sanitize_for_serialization` and then model objects with `parse_object`.

An invalid object never opens anything (the API server validates objects, but podfence is
stricter in places, and may be older than the cluster): an object whose new form fails
validation keeps its previous valid form in force, on a watch event and on a re-list alike, with
its error in `podfence status` and the metrics until it is fixed or deleted. An object invalid
from its first appearance is rejected (reported, never applied); a deleted object is deleted.

ClusterNetworkPolicy (`policy.networking.k8s.io/v1alpha2`) is a CRD a cluster may not have: while
the API server answers 404 for it, the kind counts as listed and empty (so agents are served), and
the list is retried every `backoff_max` seconds, so installing the CRD later takes effect.
"""

from __future__ import annotations

import hashlib
import logging
import random
import threading
from collections.abc import Callable, Iterable
from typing import Any

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
        watch_timeout_seconds: int = 300,
    ) -> None:
        from kubernetes import watch

        self._hub = hub
        self._api_client = api_client
        self._list_functions = list_functions or _api_list_functions(api_client)
        self._watch_factory = watch_factory or watch.Watch
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._watch_timeout = watch_timeout_seconds
        self._known: dict[str, dict[ObjectKey, KubeObject]] = {kind: {} for kind in self._list_functions}
        self._invalid: dict[tuple[str, str, str], str] = {}
        self._lock = threading.Lock()  # guards _invalid, shared by the per-kind threads
        self.resource_versions: dict[str, str | None] = {kind: None for kind in self._list_functions}
        self.relists: dict[str, int] = {kind: 0 for kind in self._list_functions}
        self.last_error: str | None = None
        self._listed: set[str] = set()
        self.synced = threading.Event()  # every kind has been listed once

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
                if _status(exc) == 410:
                    self.resource_versions[kind] = None
                    self.relists[kind] += 1
                    log.info("%s watch: 410 Gone; listing again", kind)
                    continue
                if _status(exc) == 404 and kind in OPTIONAL_KINDS:
                    self._absent(kind)
                    stop.wait(self._backoff_max)
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
                 kind, self._backoff_max)
        self._apply_listing(kind, {}, set())
        self._report()

    def relist(self, kind: str) -> None:
        """Lists `kind` and makes the resolver hold exactly the listed objects of that kind."""
        result = self._list_functions[kind]()
        listed: dict[ObjectKey, KubeObject] = {}
        known = self._known[kind]
        present: set[ObjectKey] = set()
        # Typed clients return model objects; the custom-objects client (a CRD) returns dicts.
        items = result.get("items") if isinstance(result, dict) else getattr(result, "items", None)
        for item in items or []:
            data = self._to_dict(item)
            obj = self._parse(kind, data)
            key = _identity(kind, data)
            present.add(key)
            if obj is not None:
                listed[(getattr(obj, "namespace", ""), obj.name)] = obj
            elif key in known:  # listed but invalid now: its last valid form stays in force
                listed[key] = known[key]
        if isinstance(result, dict):
            version = (result.get("metadata") or {}).get("resourceVersion")
        else:
            version = getattr(getattr(result, "metadata", None), "resource_version", None)
        self._apply_listing(kind, listed, present, version)
        self.resource_versions[kind] = version or "0"
        self._report()
        log.info("listed %d %s object(s) at resourceVersion %s", len(listed), kind,
                 self.resource_versions[kind])

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
        watcher = self._watch_factory()
        stream = watcher.stream(
            self._list_functions[kind],
            resource_version=self.resource_versions[kind],
            timeout_seconds=self._watch_timeout,
            allow_watch_bookmarks=True,
        )
        for event in stream:
            if stop.is_set():
                watcher.stop()
                return
            self._handle_event(kind, event)

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
