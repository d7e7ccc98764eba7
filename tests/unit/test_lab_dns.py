"""The lab's tiny DNS: queries, answers and parsing agree with each other and with RFC 1035 layout."""

from __future__ import annotations

from agent.lab import dns

RECORDS = {"details.bookinfo.svc.cluster.local": ["10.241.0.12", "fd00:10:241::c"]}


def test_a_and_aaaa_answers_round_trip() -> None:
    query = dns.build_query(0x1234, "details.bookinfo.svc.cluster.local")
    assert query[12:20] == b"\x07details"  # first label, length-prefixed
    response = dns.answer(query, RECORDS)
    assert response is not None
    assert dns.parse_response(response, 0x1234) == ["10.241.0.12"]
    response6 = dns.answer(dns.build_query(7, "details.bookinfo.svc.cluster.local.", dns.TYPE_AAAA), RECORDS)
    assert response6 is not None
    assert dns.parse_response(response6, 7) == ["fd00:10:241::c"]


def test_unknown_names_get_nxdomain_and_other_ids_are_ignored() -> None:
    response = dns.answer(dns.build_query(1, "nope.bookinfo.svc.cluster.local"), RECORDS)
    assert response is not None
    assert response[3] & 0x0F == 3  # NXDOMAIN
    assert dns.parse_response(response, 1) is None
    ok = dns.answer(dns.build_query(2, "details.bookinfo.svc.cluster.local"), RECORDS)
    assert ok is not None
    assert dns.parse_response(ok, 3) is None


def test_non_dns_datagrams_are_not_answered() -> None:
    assert dns.answer(b"hostname\n", RECORDS) is None
    assert dns.answer(b"\0" * 40, RECORDS) is None
