"""The Kubernetes source against a test double of the API server (tests/kube_api_double.py: a real
HTTP server on loopback, so the real client's urllib3 timeouts and Watch run): paginated lists,
resuming watches, 410 on a watch and on a continue token, a half-open watch abandoned within its
bound, and a lost API server: the last state keeps being served and the staleness is reported
by /healthz, the metrics and `podfence status`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from agent.control.hub import PolicyHub
from agent.control.metrics import ControlMetrics
from agent.control.source_kubernetes import KubernetesSource, _api_list_functions
from agent.policy.resolver import Resolver
from tests.kube_api_double import KubeApiDouble
from tests.unit.control_helpers import ns_doc, pod_doc, policy_doc, wait_until
from tests.unit.test_control_cli import CLI, free_port

WATCH_TIMEOUT = 1  # seconds: a watch lasts 1 s (watch_timeout 1 cannot be randomised further)
REQUEST_TIMEOUT = 0.5
# The bound the source promises for noticing a dead connection: the longest watch, plus the read
# timeout's grace, plus the first retry's backoff (at most backoff_initial).
HALF_OPEN_BOUND = 2 * WATCH_TIMEOUT + REQUEST_TIMEOUT + 0.1


def api_client(url: str) -> Any:
    configuration = client.Configuration()
    configuration.host = url
    return client.ApiClient(configuration)


def pods(count: int) -> list[dict[str, Any]]:
    return [pod_doc(f"web-{i}", f"n{i % 5}", f"10.1.{i // 200}.{i % 200 + 1}", "web") for i in range(count)]


@pytest.fixture
def api() -> Iterator[KubeApiDouble]:
    with KubeApiDouble() as double:
        double.upsert("Namespace", ns_doc("shop"))
        yield double


def make_source(api: KubeApiDouble, **settings: Any) -> tuple[KubernetesSource, PolicyHub]:
    hub = PolicyHub(Resolver(), ControlMetrics(), initial_version=1)
    options: dict[str, Any] = {"watch_timeout_seconds": WATCH_TIMEOUT, "backoff_initial": 0.1,
                               "request_timeout_seconds": REQUEST_TIMEOUT, "backoff_max": 0.5}
    source = KubernetesSource(hub, api_client(api.url), **(options | settings))
    hub.set_freshness(source.freshness.read)
    return source, hub


def held_pods(hub: PolicyHub) -> set[str]:
    return set(hub._resolver.state.pods)  # type: ignore[attr-defined]


def test_lists_in_pages_and_watches_from_the_lists_version(api: KubeApiDouble) -> None:
    for doc in pods(250):
        api.upsert("Pod", doc)
    listed_at = api.upsert("Pod", pod_doc("last", "n1", "10.9.9.9", "web"))
    source, hub = make_source(api, page_size=100, watch_timeout_seconds=3)
    source.watch_kind("Pod", threading.Event(), max_attempts=1)

    lists = api.lists("Pod")
    assert [r["query"].get("limit") for r in lists] == ["100", "100", "100"]
    assert "continue" not in lists[0]["query"] and all("continue" in r["query"] for r in lists[1:])
    assert len(held_pods(hub)) == 251
    (watch,) = api.watches("Pod")
    assert watch["query"]["resourceVersion"] == str(listed_at), "resumes from the list's snapshot"
    assert 3 <= int(watch["query"]["timeoutSeconds"]) <= 5, "randomised in [timeout, 2 x timeout)"


def test_watch_timeouts_are_randomised(api: KubeApiDouble) -> None:
    source, _ = make_source(api, watch_timeout_seconds=100)
    seen: set[int] = set()
    for _ in range(20):  # an immediately-failing stream: only the requested timeout matters
        source._watch_factory = lambda: _Recorder(seen)  # type: ignore[method-assign]
        source.resource_versions["Pod"] = "1"
        source._watch_once("Pod", threading.Event())
    assert len(seen) > 1 and all(100 <= t < 200 for t in seen)


class _Recorder:
    def __init__(self, seen: set[int]) -> None:
        self.seen = seen

    def stream(self, func: Any, **kwargs: Any) -> Iterator[Any]:
        self.seen.add(kwargs["timeout_seconds"])
        read = kwargs["_request_timeout"][1]
        assert read == kwargs["timeout_seconds"] + REQUEST_TIMEOUT, "the client outwaits the server briefly"
        return iter(())

    def stop(self) -> None:
        pass


def test_a_half_open_watch_is_abandoned_within_its_bound(api: KubeApiDouble) -> None:
    """The watch is accepted and then nothing comes, ever: without a client-side read timeout the
    source would wait for it for ever and every later change would be lost."""
    api.upsert("Pod", pod_doc("web-1", "n1", "10.0.1.10", "web"))
    source, hub = make_source(api)
    api.script_watch("Pod", "silent")
    stop = threading.Event()
    thread = threading.Thread(target=source.watch_kind, args=("Pod", stop), daemon=True)
    thread.start()
    try:
        wait_until(lambda: len(api.watches("Pod")) == 1, what="the silent watch accepted")
        silent_since = time.monotonic()
        api.upsert("Pod", pod_doc("web-2", "n2", "10.0.2.10", "web"))
        wait_until(lambda: "shop/web-2" in held_pods(hub), timeout=HALF_OPEN_BOUND + 3.0,
                   what="the change made while the watch was half-open")
        assert time.monotonic() - silent_since < HALF_OPEN_BOUND + 2.0  # slack for a loaded machine
        assert len(api.lists("Pod")) == 1, "resumed from its resourceVersion, no re-list"
        assert hub.metrics.source_errors_total._value.get() == 1
        assert "timed out" in (source.last_error or "").lower()
    finally:
        stop.set()


def test_a_410_on_the_watch_relists_and_applies_what_was_missed(api: KubeApiDouble) -> None:
    for doc in pods(3):
        api.upsert("Pod", doc)
    source, hub = make_source(api)
    source.relist("Pod")
    api.delete("Pod", "shop", "web-1")  # missed: the history is compacted before the watch starts
    api.upsert("Pod", pod_doc("web-9", "n1", "10.0.9.9", "web"))
    api.compact()
    source.watch_kind("Pod", threading.Event(), max_attempts=2)
    assert source.relists["Pod"] == 1
    assert held_pods(hub) == {"shop/web-0", "shop/web-2", "shop/web-9"}
    assert hub.metrics.source_errors_total._value.get() == 0, "410 is routine, not an error"


def test_an_expired_continue_token_restarts_the_list_from_scratch(api: KubeApiDouble) -> None:
    for doc in pods(25):
        api.upsert("Pod", doc)
    source, hub = make_source(api, page_size=10)
    api.expire_continue = 1
    version = hub.version
    source.watch_kind("Pod", threading.Event(), max_attempts=2)
    assert [("continue" in r["query"]) for r in api.lists("Pod")] == [False, True, False, True, True]
    assert len(held_pods(hub)) == 25
    assert hub.version == version + 1, "the broken list applied nothing"


def test_a_replica_that_lost_the_api_server_serves_the_last_state_and_says_so(api: KubeApiDouble) -> None:
    for doc in pods(3):
        api.upsert("Pod", doc)
    api.upsert("NetworkPolicy", policy_doc("web-in", "web", 8080))
    source, hub = make_source(api)
    stop = threading.Event()
    threading.Thread(target=source.run, args=(stop,), daemon=True).start()
    try:
        assert source.synced.wait(10)
        fresh = hub.status().source_freshness
        assert fresh is not None and not fresh.stale
        api.unreachable.set()
        wait_until(lambda: source.freshness.read().stale, timeout=2 * WATCH_TIMEOUT + REQUEST_TIMEOUT + 3,
                   what="the source to call itself stale")
        status = hub.status()
        assert status.source_freshness is not None and status.source_freshness.stale
        assert held_pods(hub) == {"shop/web-0", "shop/web-1", "shop/web-2"}, "the last state stays"
        assert hub._resolver.node_policy("n0").endpoints, "and is what agents get"  # type: ignore[attr-defined]
        stale_gauge = hub.metrics.registry.get_sample_value("podfence_control_source_stale")
        assert stale_gauge == 1.0
        assert (hub.metrics.registry.get_sample_value("podfence_control_source_last_heard_seconds") or 0) > 2

        api.unreachable.clear()
        api.upsert("Pod", pod_doc("web-7", "n1", "10.0.7.7", "web"))
        wait_until(lambda: "shop/web-7" in held_pods(hub) and not source.freshness.read().stale,
                   timeout=HALF_OPEN_BOUND + 3, what="recovery once the API server is back")
    finally:
        stop.set()


def test_a_cluster_without_the_optional_crd_stays_fresh(api: KubeApiDouble) -> None:
    """The absent ClusterNetworkPolicy CRD is asked for again at least every watch timeout, so its
    404s keep that kind heard even with a long backoff_max."""
    source, _ = make_source(api, backoff_max=30.0)
    stop = threading.Event()
    threading.Thread(target=source.run, args=(stop,), daemon=True).start()
    try:
        assert source.synced.wait(10)
        time.sleep(2 * WATCH_TIMEOUT + REQUEST_TIMEOUT + 1.0)  # past stale_after
        assert not source.freshness.read().stale
    finally:
        stop.set()


def test_an_api_server_that_refuses_every_request_brings_no_freshness(api: KubeApiDouble) -> None:
    """403 (the role was removed) or 500 are answers, but no news: the state is as old as ever."""
    only_pods = {"Pod": _api_list_functions(api_client(api.url))["Pod"]}
    source, hub = make_source(api, list_functions=only_pods)
    source.relist("Pod")
    assert source.freshness.read().seconds_since_heard < 1.0
    api.refuse["Pod"] = 403
    stop = threading.Event()
    threading.Thread(target=source.watch_kind, args=("Pod", stop), daemon=True).start()
    try:
        wait_until(lambda: source.freshness.read().seconds_since_heard > 2.0, what="the age to grow")
        refused = len(api.watches("Pod"))
        wait_until(lambda: len(api.watches("Pod")) > refused + 1, what="more refused requests meanwhile")
        assert source.freshness.read().seconds_since_heard > 2.0
        assert hub.metrics.source_errors_total._value.get() >= 3
    finally:
        stop.set()


def write_kubeconfig(api: KubeApiDouble, path: Path) -> Path:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "double",
        "clusters": [{"name": "double", "cluster": {"server": api.url}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "double", "context": {"cluster": "double", "user": "u"}}],
    }))
    return path


@pytest.mark.parametrize("flags", [["--watch-timeout", "0"], ["--api-timeout", "0"],
                                   ["--list-page-size", "0"]])
def test_control_refuses_timeouts_and_pages_that_cannot_work(api: KubeApiDouble, tmp_path: Path,
                                                             flags: list[str]) -> None:
    done = subprocess.run([*CLI, "control", "--source", "kubernetes", "--insecure", "--kubeconfig",
                           str(write_kubeconfig(api, tmp_path / "kubeconfig")), *flags],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "timeout" in done.stderr


def test_healthz_status_and_metrics_of_a_control_process_show_freshness(api: KubeApiDouble,
                                                                        tmp_path: Path) -> None:
    api.upsert("Pod", pod_doc("web-1", "n1", "10.0.1.10", "web"))
    kubeconfig = write_kubeconfig(api, tmp_path / "kubeconfig")
    grpc_port, metrics_port = free_port(), free_port()
    process = subprocess.Popen(
        [*CLI, "control", "--source", "kubernetes", "--kubeconfig", str(kubeconfig), "--insecure",
         "--listen", f"127.0.0.1:{grpc_port}", "--metrics-listen", f"127.0.0.1:{metrics_port}",
         "--watch-timeout", "1", "--api-timeout", "0.5", "--list-page-size", "50"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )

    def get(path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}{path}", timeout=2) as reply:
                return reply.status, reply.read().decode()
        except OSError:
            return 0, ""

    def status() -> dict[str, Any]:
        done = subprocess.run([*CLI, "status", "--control", f"127.0.0.1:{grpc_port}", "--json"],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return dict(json.loads(done.stdout))

    try:
        wait_until(lambda: get("/healthz")[0] == 200, timeout=30, what="control /healthz")
        assert "last heard from the API server" in get("/healthz")[1]
        assert status()["source_freshness"]["stale"] is False
        assert api.lists("Pod")[0]["query"]["limit"] == "50"
        api.unreachable.set()
        wait_until(lambda: "STALE" in get("/healthz")[1], timeout=10, what="/healthz to say stale")
        assert get("/healthz")[0] == 200, "a stale replica stays up: it serves the last state"
        fresh = status()["source_freshness"]
        assert fresh["stale"] is True and fresh["seconds_since_heard"] > fresh["stale_after_seconds"] == 2.5
        table = subprocess.run([*CLI, "status", "--control", f"127.0.0.1:{grpc_port}"],
                               capture_output=True, text=True, timeout=60)
        assert "STALE" in table.stdout and "serving the state last read" in table.stdout
        assert "podfence_control_source_stale 1.0" in get("/metrics")[1]
    finally:
        process.kill()
        process.wait()
        api.unreachable.clear()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__]))


def test_status_of_several_replicas_names_the_one_that_lost_the_api_server() -> None:
    import argparse
    import io
    from contextlib import redirect_stdout

    from agent.control import status as status_cmd
    from agent.control.freshness import Freshness
    from tests.unit.control_helpers import small_cluster, start_control

    fresh, lost = start_control(small_cluster()), start_control(small_cluster())
    try:
        fresh.hub.set_freshness(lambda: Freshness("kubernetes", 3.0, False, 270.0))
        lost.hub.set_freshness(lambda: Freshness("kubernetes", 900.0, True, 270.0))
        args = argparse.Namespace(control=f"{fresh.target},{lost.target}", json=True, insecure=False,
                                  tls_cert=None, tls_key=None, tls_ca=None, timeout=5.0)
        out = io.StringIO()
        with redirect_stdout(out):
            assert status_cmd.run(args) == 0
        views = {view["control"]: view for view in json.loads(out.getvalue())["replicas"]}
        assert views[fresh.target]["source_stale"] is False and views[lost.target]["source_stale"] is True
        args.json = False
        out = io.StringIO()
        with redirect_stdout(out):
            assert status_cmd.run(args) == 0
        (line,) = [line for line in out.getvalue().splitlines() if "lost the API server" in line]
        assert line.startswith(lost.target)
    finally:
        fresh.stop()
        lost.stop()
