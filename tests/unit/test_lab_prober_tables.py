"""Pure parts of the lab: SCTP encoding and truth tables (no root needed)."""

from __future__ import annotations

from agent.lab.prober import TruthTable, comparison
from agent.lab.scenarios import upstream_pods
from agent.lab.sctp import (
    CHUNK_INIT,
    CHUNK_INIT_ACK,
    InitChunk,
    build_init,
    build_init_ack,
    crc32c,
    parse_ip_packet,
)


def _ipv4(payload: bytes, source: str = "10.0.0.1") -> bytes:
    header = bytes([0x45, 0, 0, 20 + len(payload), 0, 0, 0, 0, 64, 132, 0, 0])
    return header + bytes(int(b) for b in source.split(".")) + bytes([10, 0, 0, 2]) + payload


def test_crc32c_matches_the_standard_check_value() -> None:
    assert crc32c(b"123456789") == 0xE3069283


def test_init_round_trips_and_init_ack_answers_with_the_peer_tag() -> None:
    init = parse_ip_packet(_ipv4(build_init(40000, 80, 0xDEADBEEF)))
    assert init == ("10.0.0.1", InitChunk(40000, 80, 0, CHUNK_INIT, 0xDEADBEEF))
    ack = parse_ip_packet(_ipv4(build_init_ack(init[1], 7), source="10.0.0.2"))
    assert ack == ("10.0.0.2", InitChunk(80, 40000, 0xDEADBEEF, CHUNK_INIT_ACK, 7))


def test_corrupted_sctp_is_rejected() -> None:
    packet = bytearray(_ipv4(build_init(40000, 80, 1)))
    packet[-1] ^= 0xFF
    assert parse_ip_packet(bytes(packet)) is None


def test_differences_ignore_loopback_and_render_marks_cells() -> None:
    pods = ["x/a", "x/b"]
    expected = TruthTable.filled(pods, pods)
    observed = TruthTable.filled(pods, pods)
    observed.cells[("x/a", "x/a")] = False  # loopback: ignored, as upstream does
    observed.cells[("x/b", "x/a")] = False
    assert expected.differences(observed) == [("x/b", "x/a", True, False)]
    rendered = observed.render()
    assert rendered.splitlines()[2].split() == ["x/b", "X", "-"]
    assert "comparison" in comparison(expected, observed)


def test_upstream_pods_span_both_nodes_in_every_namespace() -> None:
    pods = upstream_pods(2)
    assert len(pods) == 9
    for namespace in "xyz":
        assert {p.node for p in pods if p.namespace == namespace} == {"node1", "node2"}
