"""Policy sources: the folder source (edits, new and deleted files, bad files keep their last good
objects, moves between files) and the Kubernetes source replayed from recorded watch streams
(a named test double of the API server: list responses plus recorded watch events, incl. 410)."""

from __future__ import annotations

import copy
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from agent.control.hub import PolicyHub
from agent.control.metrics import ControlMetrics
from agent.control.source_folder import FolderSource
from agent.control.source_kubernetes import KubernetesSource
from agent.model.load import parse_object
from agent.policy.resolver import Resolver
from tests.unit.control_helpers import PODS, RecordingAgent, ns_doc, pod_doc, policy_doc, start_control


def write(path: Path, *docs: dict[str, Any]) -> None:
    # A fresh inode each time, as editors and kubectl write files, so the change is always visible.
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump_all(list(docs)))
    tmp.replace(path)


def web_ports(agent: RecordingAgent) -> list[int]:
    web = next(e for k, e in agent.last.endpoints.items() if k.startswith("shop/web"))
    return [a.port_first for a in web.ingress.allows]


# --- folder source --------------------------------------------------------------------------------------


@pytest.fixture
def folder_env(tmp_path):
    write(tmp_path / "ns.yaml", ns_doc("shop"))
    write(tmp_path / "pods.yaml", *PODS)
    write(tmp_path / "web-policy.yaml", policy_doc("web-in", "web", 8080))
    ctl = start_control([])
    source = FolderSource(tmp_path, ctl.hub)
    source.scan()
    agents = {n: RecordingAgent(n, ctl.target).start() for n in ("n1", "n2", "n3")}
    for agent in agents.values():
        agent.wait_for_state(lambda s: bool(s.endpoints), "first snapshot")
    yield tmp_path, ctl, source, agents
    for agent in agents.values():
        agent.close()
    ctl.stop()


def test_editing_a_policy_file_reaches_every_affected_node_and_only_those(folder_env):
    folder, ctl, source, agents = folder_env
    assert web_ports(agents["n1"]) == [8080]
    db_applies = len(agents["n3"].states)
    write(folder / "web-policy.yaml", policy_doc("web-in", "web", 9090))
    assert source.scan()
    for node in ("n1", "n2"):
        agents[node].wait_for_state(lambda s: s.version == ctl.hub.version, "the edit")
        assert web_ports(agents[node]) == [9090]
    time.sleep(0.3)
    assert len(agents["n3"].states) == db_applies, "n3 runs no web pod"
    assert not source.scan(), "an unchanged folder publishes nothing"


def test_a_file_that_stops_parsing_keeps_its_last_good_objects(folder_env):
    folder, ctl, source, agents = folder_env
    version = ctl.hub.version
    errors_before = ctl.metrics.source_errors_total._value.get()
    (folder / "web-policy.yaml").write_text("kind: NetworkPolicy\nspec: [unclosed\n")
    source.scan()
    assert folder / "web-policy.yaml" in source.errors
    assert source.last_error and "web-policy.yaml" in source.last_error
    assert ctl.metrics.source_errors_total._value.get() == errors_before + 1
    assert ctl.hub.version == version, "nothing changed for any node"
    assert web_ports(agents["n1"]) == [8080]

    write(folder / "web-policy.yaml", policy_doc("web-in", "web", 7070))
    source.scan()
    assert folder / "web-policy.yaml" not in source.errors
    agents["n1"].wait_for_state(lambda s: s.version == ctl.hub.version)
    assert web_ports(agents["n1"]) == [7070]


def test_an_invalid_object_is_skipped_and_the_rest_of_its_file_applies(folder_env):
    folder, ctl, source, agents = folder_env
    broken = policy_doc("db-in", "db", 5432, cidr="10.0.0.0/33")
    write(folder / "web-policy.yaml", policy_doc("web-in", "web", 9090), broken)
    source.scan()
    assert len(source.invalid_objects) == 1 and "db-in" in source.invalid_objects[0]
    assert ctl.metrics.invalid_objects._value.get() == 1
    agents["n1"].wait_for_state(lambda s: s.version == ctl.hub.version)
    assert web_ports(agents["n1"]) == [9090]
    assert not agents["n3"].last.endpoints["shop/db-1"].ingress.isolated


def _policies(ctl: Any) -> Any:
    """The policies the control service's resolver holds (what it enforces), by key."""
    return ctl.hub._resolver.state.policies


def _held(ctl: Any) -> dict[str | None, bool]:
    """What `podfence status` shows of the source: object -> whether its last valid form is in force."""
    return {p.object: p.last_valid_in_force for p in ctl.hub.status().source_errors}


def test_a_valid_policy_edited_into_an_invalid_one_keeps_its_last_valid_form(folder_env):
    folder, ctl, source, agents = folder_env
    deny: dict[str, Any] = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"namespace": "shop", "name": "db-deny"},
            "spec": {"podSelector": {"matchLabels": {"app": "db"}}, "policyTypes": ["Ingress"]}}
    write(folder / "deny.yaml", deny)
    source.scan()
    agents["n3"].wait_for_state(lambda s: s.endpoints["shop/db-1"].ingress.isolated, "the default-deny")
    broken = copy.deepcopy(deny)
    broken["spec"]["ingress"] = [{"ports": [{"port": 99999}]}]  # and still saying "deny the rest"
    write(folder / "deny.yaml", broken)
    version = ctl.hub.version
    source.scan()
    assert ctl.hub.version == version, "nothing changed for any node: the deny stays"
    assert "shop/db-deny" in _policies(ctl)
    assert _held(ctl) == {"NetworkPolicy shop/db-deny": True}
    assert "99999" in ctl.hub.status().source_errors[0].error
    assert ctl.metrics.invalid_objects._value.get() == 1
    assert ctl.metrics.last_valid_objects._value.get() == 1
    # An invalid web-in edit in another file is held the same way, with its allow.
    write(folder / "web-policy.yaml", policy_doc("web-in", "web", 8080, cidr="10.0.0.0/33"))
    source.scan()
    assert web_ports(agents["n1"]) == [8080]
    assert ctl.metrics.last_valid_objects._value.get() == 2

    write(folder / "deny.yaml", deny | {"spec": deny["spec"] | {"ingress": [{"ports": [{"port": 5432}]}]}})
    source.scan()
    state = agents["n3"].wait_for_state(lambda s: bool(s.endpoints["shop/db-1"].ingress.allows), "the fix")
    assert {a.port_first for a in state.endpoints["shop/db-1"].ingress.allows} == {5432}
    assert _held(ctl) == {"NetworkPolicy shop/web-in": True}
    assert ctl.metrics.last_valid_objects._value.get() == 1


def test_an_object_invalid_at_its_first_appearance_is_rejected_and_reported(folder_env):
    folder, ctl, source, agents = folder_env
    write(folder / "db.yaml", policy_doc("db-in", "db", 5432, cidr="10.0.0.0/33"))
    source.scan()
    assert "shop/db-in" not in _policies(ctl)
    assert _held(ctl) == {"NetworkPolicy shop/db-in": False}
    assert ctl.metrics.invalid_objects._value.get() == 1
    assert ctl.metrics.last_valid_objects._value.get() == 0
    assert not agents["n3"].last.endpoints["shop/db-1"].ingress.isolated


def test_a_held_object_removed_from_its_file_is_deleted(folder_env):
    folder, ctl, source, agents = folder_env
    write(folder / "web-policy.yaml", policy_doc("web-in", "web", 8080, cidr="10.0.0.0/33"))
    source.scan()
    assert _held(ctl) == {"NetworkPolicy shop/web-in": True}
    write(folder / "web-policy.yaml", ns_doc("other"))  # the policy gone from the file: deleted
    source.scan()
    agents["n1"].wait_for_state(lambda s: not s.endpoints["shop/web-1"].ingress.isolated, "the delete")
    assert _held(ctl) == {}
    assert ctl.metrics.invalid_objects._value.get() == 0


def test_a_renamed_file_keeps_its_held_object_in_force(folder_env):
    folder, ctl, source, agents = folder_env
    write(folder / "web-policy.yaml", policy_doc("web-in", "web", 8080, cidr="10.0.0.0/33"))
    source.scan()
    version = ctl.hub.version
    (folder / "web-policy.yaml").rename(folder / "zz-renamed.yaml")
    source.scan()
    assert ctl.hub.version == version, "a rename is no change"
    assert _held(ctl) == {"NetworkPolicy shop/web-in": True}
    assert "zz-renamed.yaml" in ctl.hub.status().source_errors[0].source
    assert web_ports(agents["n1"]) == [8080]


def test_of_two_files_defining_an_object_the_last_decides_and_an_invalid_one_holds_the_last_form(
    folder_env,
):
    folder, ctl, source, agents = folder_env
    write(folder / "zz-override.yaml", policy_doc("web-in", "web", 9090))  # after web-policy.yaml
    source.scan()
    agents["n1"].wait_for_state(lambda _s: web_ports(agents["n1"]) == [9090], "the override")
    version = ctl.hub.version
    write(folder / "zz-override.yaml", policy_doc("web-in", "web", 9090, cidr="10.0.0.0/33"))
    source.scan()
    assert ctl.hub.version == version, "the winning definition broke: its last valid form stays"
    assert web_ports(agents["n1"]) == [9090]
    (folder / "zz-override.yaml").unlink()
    source.scan()
    agents["n1"].wait_for_state(lambda _s: web_ports(agents["n1"]) == [8080], "the other file's form")
    assert _held(ctl) == {}


def test_a_broken_later_duplicate_of_a_new_object_falls_back_to_the_valid_one(tmp_path):
    write(tmp_path / "a.yaml", policy_doc("web-in", "web", 8080))
    write(tmp_path / "b.yaml", policy_doc("web-in", "web", 8080, cidr="10.0.0.0/33"))
    ctl = start_control([])
    try:
        source = FolderSource(tmp_path, ctl.hub)
        source.scan()
        assert "shop/web-in" in _policies(ctl), "never dropped for a broken copy"
        assert _held(ctl) == {"NetworkPolicy shop/web-in": True}
    finally:
        ctl.stop()


def test_deleting_a_file_removes_its_objects_and_a_new_file_adds_them(folder_env):
    folder, ctl, source, agents = folder_env
    (folder / "web-policy.yaml").unlink()
    source.scan()
    agents["n1"].wait_for_state(lambda s: s.version == ctl.hub.version, "the delete")
    assert not agents["n1"].last.endpoints["shop/web-1"].ingress.isolated

    write(folder / "more-pods.yaml", pod_doc("web-9", "n1", "10.0.1.19", "web"))
    source.scan()
    state = agents["n1"].wait_for_state(lambda s: "shop/web-9" in s.endpoints, "the new pod")
    assert set(state.endpoints) == {"shop/web-1", "shop/web-9"}


def test_an_object_moving_between_files_is_not_deleted_on_the_way(folder_env):
    folder, ctl, source, _agents = folder_env
    version = ctl.hub.version
    (folder / "web-policy.yaml").unlink()
    write(folder / "all-policies.yaml", policy_doc("web-in", "web", 8080))
    assert not source.scan(), "same objects, other files: no change for anyone"
    assert ctl.hub.version == version


def test_the_polling_thread_picks_up_an_edit_within_the_poll_interval(folder_env):
    folder, _ctl, source, agents = folder_env
    stop = threading.Event()
    thread = threading.Thread(target=source.run, args=(stop,), daemon=True)
    thread.start()
    try:
        write(folder / "web-policy.yaml", policy_doc("web-in", "web", 6060))
        written = time.monotonic()
        agents["n2"].wait_for_state(lambda s: [a.port_first for a in s.endpoints["shop/web-2"].ingress.allows]
                                    == [6060], "the polled edit")
        assert time.monotonic() - written < 2.0
    finally:
        stop.set()
        thread.join(timeout=2)


def test_file_system_events_wake_the_source_long_before_its_poll_interval(folder_env):
    folder, _ctl, source, agents = folder_env
    source.poll_interval = 30.0  # only a wake-up can explain an edit seen within a second
    (folder / "team").mkdir()
    stop = threading.Event()
    thread = threading.Thread(target=source.run, args=(stop,), daemon=True)
    thread.start()
    try:
        time.sleep(0.1)  # the watch is in place once run() waits; it covers new subfolders too
        write(folder / "team" / "web-more.yaml", policy_doc("web-more", "web", 7070))
        written = time.monotonic()
        agents["n2"].wait_for_state(
            lambda s: sorted(a.port_first for a in s.endpoints["shop/web-2"].ingress.allows) == [7070, 8080],
            "the edit in a subfolder",
        )
        assert time.monotonic() - written < 1.0
    finally:
        stop.set()
        thread.join(timeout=2)  # a stop ends even a 30 s poll interval at once
    assert not thread.is_alive()


def test_an_edit_after_a_quiet_interval_is_read_at_once_whatever_the_polls_did(folder_env):
    folder, ctl, source, _agents = folder_env
    source.poll_interval = 0.4
    stop = threading.Event()
    thread = threading.Thread(target=source.run, args=(stop,), daemon=True)
    thread.start()
    try:
        time.sleep(0.5)  # one periodic pass at 0.4 s: not a reason to wait for the next
        before = ctl.hub.version
        write(folder / "web-policy.yaml", policy_doc("web-in", "web", 6300))
        written = time.monotonic()
        while ctl.hub.version == before and time.monotonic() - written < 2:
            time.sleep(0.002)
        assert time.monotonic() - written < 0.15
    finally:
        stop.set()
        thread.join(timeout=2)


def test_a_burst_of_edits_is_read_once_per_poll_interval_not_once_per_write(folder_env):
    folder, ctl, source, _agents = folder_env
    source.poll_interval = 0.5
    stop = threading.Event()
    thread = threading.Thread(target=source.run, args=(stop,), daemon=True)
    thread.start()
    try:
        time.sleep(0.6)  # a quiet interval: the first edit is read at once
        before = ctl.hub.version
        for port in range(6200, 6210):  # ten writes in ~0.2 s
            write(folder / "web-policy.yaml", policy_doc("web-in", "web", port))
            time.sleep(0.02)
        time.sleep(1.2)
        # the first write at once, the rest of the burst one poll interval later
        assert 1 <= ctl.hub.version - before <= 3
    finally:
        stop.set()
        thread.join(timeout=2)


def test_without_file_system_events_the_source_still_polls(folder_env):
    folder, _ctl, source, agents = folder_env
    stop = threading.Event()
    thread = threading.Thread(target=source.run, args=(stop,), kwargs={"use_events": False}, daemon=True)
    thread.start()
    try:
        write(folder / "web-policy.yaml", policy_doc("web-in", "web", 6161))
        agents["n2"].wait_for_state(
            lambda s: [a.port_first for a in s.endpoints["shop/web-2"].ingress.allows] == [6161],
            "the polled edit",
        )
    finally:
        stop.set()
        thread.join(timeout=2)


# --- Kubernetes source: a recorded API server -----------------------------------------------------------


def _to_model(doc: dict[str, Any], model: str) -> Any:
    """Deserialises an API JSON object into the kubernetes client's model, as a list response does."""
    return client.ApiClient().deserialize(json.dumps(doc), model, "application/json")


class RecordedApi:
    """Test double of the API server (no cluster here): list responses and watch streams recorded
    from `kubectl get --watch -o json` style events, replayed in order. A 410 arrives as an ERROR
    event (or as the ApiException the real Watch raises after its own retry)."""

    def __init__(self, lists: list[tuple[str, list[dict[str, Any]]]], watches: list[list[Any]],
                 model: str) -> None:
        self.lists = list(lists)  # (resourceVersion, items) for each successive list call
        self.watches = list(watches)
        self.model = model
        self.watch_resource_versions: list[str | None] = []
        self.list_calls = 0

    def list_function(self, **kwargs: Any) -> Any:
        self.list_calls += 1
        version, items = self.lists.pop(0) if len(self.lists) > 1 else self.lists[0]
        return _to_model({"metadata": {"resourceVersion": version}, "items": items}, self.model)

    def watch(self) -> RecordedApi._Watch:
        return RecordedApi._Watch(self)

    class _Watch:
        def __init__(self, api: RecordedApi) -> None:
            self.api = api

        def stream(self, func: Any, **kwargs: Any) -> Any:
            self.api.watch_resource_versions.append(kwargs.get("resource_version"))
            for event in self.api.watches.pop(0):
                if isinstance(event, Exception):
                    raise event
                yield copy.deepcopy(event)

        def stop(self) -> None:
            pass


def _event(kind: str, doc: dict[str, Any], version: str) -> dict[str, Any]:
    raw = copy.deepcopy(doc)
    raw["metadata"]["resourceVersion"] = version
    return {"type": kind, "raw_object": raw, "object": raw}


GONE = {"type": "ERROR", "raw_object": {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                        "message": "too old resource version: 100 (150)", "reason": "Expired",
                                        "code": 410}}


def _k8s_source(hub: PolicyHub, kind: str, api: RecordedApi) -> KubernetesSource:
    return KubernetesSource(hub, client.ApiClient(), list_functions={kind: api.list_function},
                            watch_factory=api.watch, backoff_initial=0.01, backoff_max=0.02)


def test_kubernetes_pods_list_watch_bookmark_and_relist_after_410():
    hub = PolicyHub(Resolver(), ControlMetrics(), initial_version=1)
    with hub.change() as resolver:
        resolver.upsert(parse_object(ns_doc("shop")))
        resolver.upsert(parse_object(policy_doc("web-in", "web", 8080)))
    web1, web2, db1 = PODS
    moved = copy.deepcopy(web2)
    moved["metadata"]["labels"] = {"app": "db"}
    web3 = pod_doc("web-3", "n3", "10.0.3.11", "web")
    api = RecordedApi(
        # db-1 vanished while the watch was gone; web-3 came while the second watch was gone.
        lists=[("100", [web1, web2, db1]), ("200", [web1, moved]), ("250", [web1, moved, web3])],
        watches=[
            [_event("MODIFIED", moved, "105"),
             {"type": "BOOKMARK", "raw_object": {"kind": "Pod", "metadata": {"resourceVersion": "150"}}},
             GONE],
            [_event("ADDED", web3, "201")],
            [client.exceptions.ApiException(status=410, reason="Gone")],
            [_event("DELETED", web1, "301")],
        ],
        model="V1PodList",
    )
    source = _k8s_source(hub, "Pod", api)
    assert not source.synced.is_set()
    source.watch_kind("Pod", threading.Event(), max_attempts=4)
    assert source.synced.is_set(), "the only kind has been listed: agents may be served"

    # Watches resume from the list's version, then from the newest event; 410 (either form) re-lists.
    assert api.watch_resource_versions == ["100", "200", "201", "250"]
    assert source.relists["Pod"] == 2
    assert api.list_calls == 3
    assert source.resource_versions["Pod"] == "301"
    assert hub.source.generation == 301  # the version published last says what it was built from
    resolver = hub._resolver
    assert resolver.node_policy("n1").endpoints == {}  # web-1 deleted by the last event
    assert set(resolver.node_policy("n2").endpoints) == {"shop/web-2"}
    assert not resolver.node_policy("n2").endpoints["shop/web-2"].ingress.isolated  # relabelled to db
    assert set(resolver.node_policy("n3").endpoints) == {"shop/web-3"}  # db-1 gone after the re-list


def test_kubernetes_versions_carry_the_oldest_of_the_kinds_resource_versions():
    """Every kind is known at least up to the oldest kind's resourceVersion: that is the generation
    a version was built from, comparable across replicas; it never goes back."""
    hub = PolicyHub(Resolver(), ControlMetrics(), initial_version=1)
    unused = RecordedApi([("1", [])], [], "V1PodList")
    kinds = ("Pod", "NetworkPolicy", "ClusterNetworkPolicy")
    source = KubernetesSource(hub, client.ApiClient(), watch_factory=unused.watch,
                              list_functions={kind: unused.list_function for kind in kinds})
    source.resource_versions.update(Pod="500", NetworkPolicy="420", ClusterNetworkPolicy=None)  # CRD absent
    with hub.change():
        source._note_source("Pod", "510")
    first = hub.source
    assert first.generation == 420 and first.digest.startswith("rv:")
    source.resource_versions.update(Pod="510")
    with hub.change():
        source._note_source("NetworkPolicy", "600")
    assert hub.source.generation == 510 and hub.source.digest != first.digest
    source.resource_versions.update(NetworkPolicy="600")
    with hub.change():
        source._note_source("ClusterNetworkPolicy", "400")  # the CRD appears, listed (say) by a lagging cache
    assert hub.source.generation == 510  # never back


def test_kubernetes_invalid_objects_and_watch_errors_are_counted_not_fatal():
    metrics = ControlMetrics()
    resolver = Resolver()
    hub = PolicyHub(resolver, metrics, initial_version=1)
    bad = policy_doc("bad", "web", 99999)
    good = policy_doc("web-in", "web", 8080)
    api = RecordedApi(
        lists=[("10", [good])],
        watches=[[_event("ADDED", bad, "11"), ConnectionResetError("connection reset by peer")],
                 [_event("MODIFIED", policy_doc("web-in", "web", 9090), "12")]],
        model="V1NetworkPolicyList",
    )
    source = _k8s_source(hub, "NetworkPolicy", api)
    source.watch_kind("NetworkPolicy", threading.Event(), max_attempts=2)
    assert metrics.invalid_objects._value.get() == 1
    assert metrics.source_errors_total._value.get() == 1
    assert api.watch_resource_versions == ["10", "11"], "after an error the watch resumes, no re-list"
    assert source.relists["NetworkPolicy"] == 0
    assert "connection reset" in (source.last_error or "")
    policies = resolver.state.policies
    assert set(policies) == {"shop/web-in"}


def test_kubernetes_an_invalid_edit_keeps_the_last_valid_form_across_watch_and_relist():
    metrics = ControlMetrics()
    resolver = Resolver()
    hub = PolicyHub(resolver, metrics, initial_version=1)
    deny: dict[str, Any] = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"namespace": "shop", "name": "deny"},
            "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}}
    # What a newer API server may accept and this podfence refuses: an unknown policyType.
    broken = copy.deepcopy(deny)
    broken["spec"]["policyTypes"] = ["Ingress", "Sideways"]
    never_valid = policy_doc("bad", "web", 8080)
    never_valid["spec"]["policyTypes"] = ["Sideways"]
    api = RecordedApi(
        lists=[("10", [deny]), ("20", [broken, never_valid]), ("30", [never_valid])],
        watches=[[_event("MODIFIED", broken, "11"), GONE],
                 [client.exceptions.ApiException(status=410, reason="Gone")],
                 []],
        model="V1NetworkPolicyList",
    )
    source = _k8s_source(hub, "NetworkPolicy", api)
    source.watch_kind("NetworkPolicy", threading.Event(), max_attempts=2)
    assert api.list_calls == 2, "the invalid form came by watch, then by a re-list"
    assert resolver.state.policies["shop/deny"] == parse_object(deny), "the default-deny stays"
    assert "shop/bad" not in resolver.state.policies
    held = {p.object: p.last_valid_in_force for p in hub.status().source_errors}
    assert held == {"NetworkPolicy shop/deny": True, "NetworkPolicy shop/bad": False}
    assert all(p.source == "kubernetes" and "Sideways" in p.error for p in hub.status().source_errors)
    assert metrics.invalid_objects._value.get() == 2
    assert metrics.last_valid_objects._value.get() == 1
    # Gone from the cluster (seen by the next re-list): deleted, however invalid it was.
    source.watch_kind("NetworkPolicy", threading.Event(), max_attempts=1)
    assert "shop/deny" not in resolver.state.policies
    assert {p.object for p in hub.status().source_errors} == {"NetworkPolicy shop/bad"}
    assert metrics.last_valid_objects._value.get() == 0
