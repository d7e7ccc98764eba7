"""Several control replicas, over real gRPC on loopback: an agent that fails over to a replica
lagging behind the source never goes back to older policy; streams drain gradually on shutdown
and shed gradually from a replica above its share; heartbeats expose a wedged replica; and
`podfence status` shows every replica's view."""

from __future__ import annotations

import argparse
import io
import json
import os
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import yaml

from agent.api import podfence_pb2 as pb
from agent.control import status as status_cmd
from agent.control.balance import StreamBalancer
from agent.control.hub import PolicyHub
from agent.control.metrics import ControlMetrics
from agent.control.server import SYNC_SERVICE, ControlServer, create_server, stop_server
from agent.control.source_folder import FolderSource
from agent.dataplane.types import NodeState
from agent.node.sync import SyncClient
from agent.policy.resolver import Resolver
from tests.unit.control_helpers import (
    PODS,
    ns_doc,
    pod,
    policy_doc,
    small_cluster,
    start_control,
    wait_until,
)

T0 = 1_700_000_000  # seconds; file times are set explicitly so generations are known


@dataclass
class FolderControl:
    """A control replica fed by its own folder, on loopback."""

    folder: Path
    source: FolderSource
    hub: PolicyHub
    server: ControlServer
    port: int
    health: object

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self, grace: float = 0.5) -> None:
        stop_server(self.server, self.hub, self.health, grace=grace)  # type: ignore[arg-type]


def write_folder(folder: Path, port: int, mtime: int) -> None:
    """The cluster with web open on `port`; every file and the folder itself dated `mtime`."""
    folder.mkdir(exist_ok=True)
    docs = [ns_doc("shop"), *PODS, policy_doc("web", "web", port)]
    path = folder / "cluster.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    os.utime(path, (mtime, mtime))
    os.utime(folder, (mtime, mtime))


def folder_control(folder: Path, replica: str) -> FolderControl:
    hub = PolicyHub(Resolver(), ControlMetrics(), initial_version=1000 if replica == "new" else 5,
                    replica=replica)
    source = FolderSource(folder, hub)
    source.scan()
    server, port, health = create_server("127.0.0.1:0", hub)
    server.start()
    return FolderControl(folder, source, hub, server, port, health)


def web_port(state: NodeState) -> int:
    (allow,) = state.endpoints["shop/web-1"].ingress.allows
    return allow.port_first


@pytest.fixture
def replicas(tmp_path) -> Iterator[tuple[FolderControl, FolderControl]]:
    """Two replicas: `old` read its folder at generation T0, `new` at T0 + 100 s."""
    write_folder(tmp_path / "old", 8080, T0)  # a replica whose source copy lags behind
    write_folder(tmp_path / "new", 9090, T0 + 100)  # the source as it is now
    old, new = folder_control(tmp_path / "old", "old"), folder_control(tmp_path / "new", "new")
    yield old, new
    old.stop()
    new.stop()


@contextmanager
def running(client: SyncClient) -> Iterator[SyncClient]:
    stop = threading.Event()
    thread = threading.Thread(target=client.run, args=(stop,), daemon=True)
    thread.start()
    try:
        yield client
    finally:
        stop.set()
        thread.join(5)


def test_failover_to_a_lagging_replica_never_rolls_policy_back(tmp_path, replicas, agents):
    old, new = replicas
    assert new.hub.source.generation == (T0 + 100) * 10**9 > old.hub.source.generation == T0 * 10**9
    agent = agents("n1", f"{new.target},{old.target}", first_message_timeout=5.0)
    agent.wait_for_state(lambda s: "shop/web-1" in s.endpoints and web_port(s) == 9090, "new policy")
    applied = len(agent.states)

    new.stop()  # the agent fails over to the lagging replica
    wait_until(lambda: "n1" in old.hub.status().nodes and bool(old.hub.status().nodes["n1"].last_error),
               what="the lagging replica's version held")
    assert len(agent.states) == applied and web_port(agent.last) == 9090, "rolled back to older policy"
    assert agent.client is not None and agent.client.held is not None
    assert "older than the enforced" in agent.client.held
    assert (old.hub.status().nodes["n1"].last_error or "").startswith("held: ")

    # The lagging replica catches up: its newer version is applied.
    write_folder(tmp_path / "old", 7070, T0 + 200)
    old.source.scan()
    agent.wait_for_state(lambda s: web_port(s) == 7070, "the caught-up replica's policy")
    assert all(web_port(s) != 8080 for s in agent.states), "an older version was enforced"
    assert agent.client.held is None
    assert agent.client.enforced_generation == (T0 + 200) * 10**9


def test_a_lagging_replica_is_left_after_the_hold_timeout(replicas):
    old, new = replicas
    # An agent that enforces generation T0+100 (from `new`, before a restart) meets `old` first.
    states: list[NodeState] = []
    client = SyncClient("n1", f"{old.target},{new.target}", states.append, backoff_initial=0.05,
                        backoff_max=0.2, hold_timeout=0.5, heartbeat_interval=0.2)
    client.enforced_generation = (T0 + 100) * 10**9
    with running(client):
        wait_until(lambda: bool(states) and web_port(states[-1]) == 9090, what="moved to the newer replica")
        assert all(web_port(s) != 8080 for s in states)


def test_status_shows_every_replicas_view(replicas):
    old, new = replicas
    args = argparse.Namespace(control=f"{new.target},{old.target},127.0.0.1:1", json=True, insecure=False,
                              tls_cert=None, tls_key=None, tls_ca=None, timeout=2.0)
    out = io.StringIO()
    with redirect_stdout(out):
        assert status_cmd.run(args) == 0
    status = json.loads(out.getvalue())
    assert status["version"] == new.hub.version  # the first that answers
    views = {view["control"]: view for view in status["replicas"]}
    assert views[new.target]["replica"] == "new"
    assert views[new.target]["source_generation"] == (T0 + 100) * 10**9
    assert views[old.target]["source_generation"] == T0 * 10**9
    assert views["127.0.0.1:1"]["reachable"] is False
    args.json = False
    out = io.StringIO()
    with redirect_stdout(out):
        assert status_cmd.run(args) == 0
    assert "behind the newest source generation" in out.getvalue()


# --- drain and shed -----------------------------------------------------------------------------------


NODES = [f"n{i}" for i in range(1, 9)]


def test_shutdown_drains_streams_gradually_to_the_other_replica(agents):
    a, b = start_control(small_cluster()), start_control(small_cluster())
    try:
        for node in NODES:
            agents(node, f"{a.target},{b.target}")
        wait_until(lambda: len(a.hub.open_streams()) == len(NODES), what="every agent on replica a")
        counts: list[int] = []
        stopper = threading.Thread(target=stop_server, args=(a.server, a.hub, a.health),
                                   kwargs={"grace": 2.0})
        started = time.monotonic()
        stopper.start()
        while stopper.is_alive():
            counts.append(len(a.hub.open_streams()))
            time.sleep(0.02)
        took = time.monotonic() - started
        intermediate = {count for count in counts if 0 < count < len(NODES)}
        assert len(intermediate) >= 4, f"streams ended all at once: {sorted(set(counts))}"
        assert took >= 1.4
        wait_until(lambda: len(b.hub.open_streams()) == len(NODES), what="every agent moved to replica b")
    finally:
        b.stop()


def test_a_replica_above_its_share_sheds_one_stream_per_tick(agents):
    # Pods on six nodes: the pod cache says six agents share two replicas.
    cluster = [*small_cluster(), *(pod(f"x-{i}", f"n{i}", f"10.0.{i}.20", "x") for i in (4, 5, 6))]
    a, b = start_control(cluster), start_control(cluster)
    try:
        for node in NODES[:6]:
            agents(node, f"{a.target},{b.target}")
        wait_until(lambda: len(a.hub.open_streams()) == 6, what="every agent on replica a")
        balancer = StreamBalancer(a.hub, replicas=2)
        assert balancer.share() == 4  # ceil(6 / 2 * 1.1)
        assert balancer.tick() is not None
        assert len(a.hub.open_streams()) == 5  # one at a time
        assert balancer.tick() is not None
        wait_until(lambda: len(b.hub.open_streams()) == 2, what="the shed agents on replica b")
        assert len(a.hub.open_streams()) == 4
        assert balancer.tick() is None  # at its share: nothing more
        assert StreamBalancer(b.hub, replicas=1).tick() is None
    finally:
        a.stop()
        b.stop()


# --- heartbeats ---------------------------------------------------------------------------------------


class WedgedReplica:
    """A NodeSync server that sends one empty snapshot and then never anything again (its
    process alive, HTTP/2 pings answered by the gRPC core: only the application is stuck).
    `current=False`: a replica of a release before heartbeats (its versions carry no source)."""

    def __init__(self, current: bool = True) -> None:
        self.current = current
        self.calls = 0
        self.release = threading.Event()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        self.server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
            SYNC_SERVICE, {"Sync": grpc.stream_stream_rpc_method_handler(
                self.sync, response_serializer=pb.ControlMessage.SerializeToString)})])
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def sync(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[pb.ControlMessage]:
        self.calls += 1
        next(requests, None)
        message = pb.ControlMessage(version=1, snapshot=pb.Snapshot())
        if self.current:
            message.source.CopyFrom(pb.SourceState(generation=1, replica="wedged"))
        yield message
        self.release.wait(30)  # wedged

    def stop(self) -> None:
        self.release.set()
        self.server.stop(0)


def test_heartbeats_expose_a_wedged_replica_and_the_agent_reconnects():
    wedged = WedgedReplica()
    states: list[NodeState] = []
    client = SyncClient("n1", f"127.0.0.1:{wedged.port}", states.append, backoff_initial=0.05,
                        backoff_max=0.2, heartbeat_interval=0.2)
    try:
        with running(client):
            wait_until(lambda: wedged.calls >= 2, timeout=5.0, what="a new stream after 0.6 s of silence")
            assert states and states[0].version == 1
    finally:
        wedged.stop()


def test_an_idle_stream_of_a_replica_without_heartbeats_is_not_taken_for_wedged():
    older = WedgedReplica(current=False)
    states: list[NodeState] = []
    client = SyncClient("n1", f"127.0.0.1:{older.port}", states.append, heartbeat_interval=0.2)
    try:
        with running(client):
            wait_until(lambda: bool(states), what="the snapshot")
            time.sleep(1.5)
            assert older.calls == 1, "reconnected to a replica that never promised heartbeats"
    finally:
        older.stop()


def test_a_live_replica_keeps_an_idle_stream_open_with_heartbeats(agents):
    ctl = start_control(small_cluster())
    try:
        states: list[NodeState] = []
        client = SyncClient("n1", ctl.target, states.append, heartbeat_interval=0.2)
        with running(client):
            wait_until(lambda: bool(states), what="the snapshot")
            (stream,) = ctl.hub.open_streams()
            time.sleep(1.5)  # idle, seven heartbeat intervals
            assert ctl.hub.open_streams() == [stream], "an idle but live stream was given up"
            assert len(states) == 1
    finally:
        ctl.stop()


def test_a_restarted_agent_still_refuses_a_lagging_replica(tmp_path, replicas):
    """The enforced generation survives the agent process (a file beside its state in /run): an
    agent restarted while only a lagging replica answers keeps the newer policy the kernel holds."""
    old, new = replicas
    generation_file = tmp_path / "run" / "enforced-generation"
    first: list[NodeState] = []
    with running(SyncClient("n1", new.target, first.append, generation_file=generation_file)):
        wait_until(lambda: bool(first) and web_port(first[-1]) == 9090, what="the newer policy applied")
    assert generation_file.read_text().strip() == str((T0 + 100) * 10**9)

    new.stop()  # the agent restarts; only the lagging replica answers
    states: list[NodeState] = []
    restarted = SyncClient("n1", old.target, states.append, generation_file=generation_file,
                           backoff_initial=0.05, backoff_max=0.2)
    assert restarted.enforced_generation == (T0 + 100) * 10**9
    with running(restarted):
        wait_until(lambda: restarted.held is not None, what="the lagging snapshot held")
        time.sleep(0.3)
    assert states == [], "a restarted agent applied a lagging replica's older policy"


def test_an_unreadable_generation_file_accepts_any_generation(tmp_path):
    bad = tmp_path / "enforced-generation"
    bad.write_text("not a number\n")
    assert SyncClient("n1", "127.0.0.1:1", lambda _s: None, generation_file=bad).enforced_generation == 0
    missing = tmp_path / "none"
    assert SyncClient("n1", "127.0.0.1:1", lambda _s: None, generation_file=missing).enforced_generation == 0
