"""Flow records from real traffic between network namespaces (bpf_netns.py), read through the node's
flow feed into podfence_flows_total as the agent does (issue 24).

Pod 2 admits pod 1 on TCP 8080 (policy ns/admit-one, its second ingress rule); pod 3 has no
policy. An allowed connection is one record per judgement (pod 1's egress, pod 2's ingress), a
denied flow of N datagrams is a few records whose packets add up to N, and a flood of new denied
flows spends the record budget (counted) while the datapath keeps its verdicts.
"""

from __future__ import annotations

import ipaddress
import threading
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from agent.dataplane.bpf.dataplane import BpfDataplane
from agent.dataplane.bpf.flow_records import NO_POLICY, NO_RULE_MATCHED
from agent.dataplane.flows import FlowRecord, FlowVerdict
from agent.dataplane.types import Allow, CidrPeer, DirectionPolicy, IdentityPeer
from agent.node.flowfeed import FlowFeed, FlowMetrics
from tests.privileged.bpf_netns import PYTHON, Node, Pod
from tests.privileged.test_bpf_traffic import IDENTITY_OF_POD, endpoint, state

pytestmark = pytest.mark.needs("nsenter", "bpffs")

TCP, UDP = 6, 17
PORT = 8080


@pytest.fixture
def node() -> Iterator[Node]:
    lab = Node().create(3)
    try:
        for pod in lab.pods:
            lab.serve(pod, PORT)
        yield lab
    finally:
        lab.destroy()


@pytest.fixture
def dataplane(node: Node) -> Iterator[BpfDataplane]:
    plane = BpfDataplane(node.settings(flow_deny_interval=1))
    plane.start()
    try:
        a, b, c = node.pods
        admit_one = DirectionPolicy(
            isolated=True,
            allows=(
                Allow(
                    CidrPeer(ipaddress.ip_network("192.0.2.0/24")),
                    TCP,
                    443,
                    443,
                    policy="ns/admit-one",
                    rule="ingress[0]",
                ),
                Allow(
                    IdentityPeer(IDENTITY_OF_POD[a.index]),
                    TCP,
                    PORT,
                    PORT,
                    policy="ns/admit-one",
                    rule="ingress[1]",
                ),
            ),
        )
        plane.apply(state(node, endpoint(a), endpoint(b, ingress=admit_one), endpoint(c)))
        yield plane
    finally:
        plane.teardown()


class Feed:
    """The agent's wiring: a FlowFeed thread polling the dataplane, records into podfence_flows_total
    and a list."""

    def __init__(self, plane: BpfDataplane) -> None:
        self.records: list[FlowRecord] = []
        self.metrics = FlowMetrics("policy")
        self._feed = FlowFeed(plane, [self.metrics, self.records.append])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._feed.run, args=(self._stop, 50), daemon=True)

    def __enter__(self) -> Feed:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def scrape(self) -> str:
        registry = CollectorRegistry()
        registry.register(self.metrics)
        return generate_latest(registry).decode()


def send_udp(pod: Pod, host: str, port: int, count: int, sport: int) -> None:
    """`count` datagrams from one socket: one flow."""
    code = (
        "import socket,sys\n"
        "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
        f"s.bind(('0.0.0.0',{sport}))\n"
        f"[s.sendto(b'x',('{host}',{port})) for _ in range({count})]\n"
    )
    pod.run(PYTHON, "-c", code)


def wait_records(feed: Feed, seconds: float) -> None:
    """Time for the feed's thread to read what the datapath sent (and sweep quiet denied flows)."""
    threading.Event().wait(seconds)


def test_an_allowed_connection_is_one_record_per_judgement_naming_the_rule(
    node: Node, dataplane: BpfDataplane
) -> None:
    a, b, _ = node.pods
    dataplane.poll_flows(0)
    with Feed(dataplane) as feed:
        assert a.tcp(b.ip, PORT)
        wait_records(feed, 0.5)
    mine = [
        r for r in feed.records if r.protocol == TCP and r.destination == b.ip and r.destination_port == PORT
    ]
    ingress = [r for r in mine if r.endpoint == "ns/pod2"]
    egress = [r for r in mine if r.endpoint == "ns/pod1"]
    assert len(ingress) == 1 and len(egress) == 1, mine  # the reply and later segments: none
    assert ingress[0].verdict is FlowVerdict.ALLOWED and ingress[0].direction == "ingress"
    assert (ingress[0].tier, ingress[0].policy, ingress[0].rule) == (
        "networkpolicy",
        "ns/admit-one",
        "ingress[1]",
    )
    assert ingress[0].source == a.ip and ingress[0].rule_ref != 0
    assert egress[0].verdict is FlowVerdict.ALLOWED and egress[0].direction == "egress"
    assert (egress[0].policy, egress[0].rule, egress[0].rule_ref) == ("", NO_POLICY, 0)
    scrape = feed.scrape()
    assert 'podfence_flows_total{direction="ingress",policy="ns/admit-one",verdict="allowed"} 1.0' in scrape


def test_a_denied_flow_of_n_packets_is_a_few_records_adding_up_to_n(
    node: Node, dataplane: BpfDataplane
) -> None:
    _, b, c = node.pods
    dataplane.poll_flows(0)
    before = {(x.key, x.direction): x.denied_packets for x in dataplane.counters()}
    with Feed(dataplane) as feed:
        send_udp(c, b.ip, PORT, 40, sport=47000)
        wait_records(feed, 2.5)  # the deny interval (1 s) and a sweep: what the flow held is sent
    denied = [r for r in feed.records if r.verdict is FlowVerdict.DENIED and r.source_port == 47000]
    after = {(x.key, x.direction): x.denied_packets for x in dataplane.counters()}
    assert after[("ns/pod2", "ingress")] - before[("ns/pod2", "ingress")] == 40
    assert sum(r.packets for r in denied) == 40
    assert 1 <= len(denied) <= 3  # the first packet, then aggregates: never one per packet
    for record in denied:
        assert (record.endpoint, record.direction, record.reason) == ("ns/pod2", "ingress", "policy")
        assert (record.tier, record.policy, record.rule, record.rule_ref) == (
            "networkpolicy",
            "",
            NO_RULE_MATCHED,
            0,
        )
        assert (record.source, record.destination_port, record.protocol) == (c.ip, PORT, UDP)


def test_a_flood_of_new_denied_flows_spends_the_budget_counted_never_the_datapath(
    node: Node, dataplane: BpfDataplane
) -> None:
    a, b, c = node.pods
    lost_before = dataplane.flows_lost()
    code = (
        "import socket\n"
        "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
        f"[s.sendto(b'x',('{b.ip}',p)) for p in range(20000, 26000)]\n"
    )
    with Feed(dataplane) as feed:
        c.run(PYTHON, "-c", code)  # 6,000 new flows, each owing two records (pod 3's egress, pod 2's ingress)
        assert a.tcp(b.ip, PORT)  # the verdicts hold
        assert not c.tcp(b.ip, PORT)
        wait_records(feed, 0.5)
    assert dataplane.flows_lost() - lost_before > 0
    flood = [
        r for r in feed.records if r.verdict is FlowVerdict.DENIED and 20000 <= r.destination_port < 26000
    ]
    assert 0 < len(flood) < 6000
