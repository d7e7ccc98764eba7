"""The read-back's decoding, without a kernel: verdict words, port prefixes joined into ranges,
iptables-save rules, and the comparison of a policy's entries with the record."""

from __future__ import annotations

from agent.dataplane.bpf.compiler import port_range_prefixes
from agent.dataplane.bpf.readback import compare_entries, verdict_text
from agent.dataplane.bpf.structs import ACT_ACCEPT, ACT_DENY, ACT_PASS, POLICY_PREFIX_PROTOCOL, verdict_word
from agent.dataplane.bpf.tiered import leaf_value
from agent.dataplane.iptables.kernel import KernelSet, Rule
from agent.dataplane.iptables.readback import decode_rule
from agent.dataplane.readback import port_ranges


def test_verdict_words_read_as_tiers_ranks_and_actions() -> None:
    assert verdict_text(verdict_word((3, ACT_DENY), None)) == "admin#3 deny"
    assert verdict_text(verdict_word((0, ACT_PASS), (7, ACT_ACCEPT))) == "admin#0 pass, baseline#7 allow"
    assert verdict_text(verdict_word(None, None)) == "no tier decides"


def test_port_prefixes_join_back_into_the_ranges_they_cover() -> None:
    blocks = port_range_prefixes(1000, 2000) + port_range_prefixes(8080, 8080)
    ranges = [(value, value + (1 << (16 - bits)) - 1) for value, bits in blocks]
    assert port_ranges(ranges) == "1000-2000, 8080"
    assert port_ranges([(0, 65535)]) == "any"


def test_an_iptables_save_rule_is_decoded_with_its_counters() -> None:
    sets = {"pf-i4-7": KernelSet("pf-i4-7", "hash:ip", 4, 65536, frozenset({"10.1.0.1/32"}))}
    spec = '-m set --match-set pf-i4-7 src -p tcp -m tcp --dport 80:90 -m comment --comment "podfence:allow" '
    spec += "-j RETURN"
    rule = decode_rule(Rule("PF-Iabc-def", spec, 3, 180), 4, sets)
    assert (rule.peer, rule.protocol, rule.ports, rule.action) == (
        "set pf-i4-7 {10.1.0.1/32}",
        "tcp",
        "80-90",
        "allow",
    )
    assert (rule.packets, rule.bytes) == (3, 180)
    missing = decode_rule(Rule("PF-Iabc-def", "-m set --match-set pf-i4-8 src -j RETURN", 0, 0), 4, sets)
    assert missing.peer == "set pf-i4-8 (MISSING)"
    final = decode_rule(Rule("PF-Iabc-def", '-m comment --comment "podfence:deny" -j DROP', 1, 60), 4, sets)
    assert (final.peer, final.protocol, final.ports, final.action) == ("any address", "any", "any", "deny")


def test_missing_stray_and_changed_entries_are_told_apart() -> None:
    entry = (POLICY_PREFIX_PROTOCOL + 16, 5, 9, 1, 6, 8080)
    other = (POLICY_PREFIX_PROTOCOL + 16, 5, 9, 1, 6, 9090)
    assert compare_entries("ingress", {entry: (1, 0)}, {entry: leaf_value(1, 0)}) == []
    (missing,) = compare_entries("ingress", {}, {entry: leaf_value(1, 0)})
    assert "tcp 8080" in missing and "missing in the kernel" in missing
    (stray,) = compare_entries("ingress", {entry: (1, 0), other: (1, 0)}, {entry: leaf_value(1, 0)})
    assert "tcp 9090" in stray and "not recorded" in stray
    deny = verdict_word((0, ACT_DENY), None)
    (changed,) = compare_entries(
        "ingress", {entry: (1, verdict_word((0, ACT_ACCEPT), None))}, {entry: leaf_value(1, deny)}
    )
    assert "admin#0 allow" in changed and "recorded admin#0 deny" in changed


def test_inspect_refuses_a_bad_pod_name_and_reports_a_missing_record(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    from agent.cli import build_parser

    parser, runners = build_parser()
    bad = parser.parse_args(["inspect", "--pod", "no-namespace"])
    assert runners["inspect"](bad) == 2
    args = parser.parse_args(["inspect", "--dataplane", "bpf", "--pin-dir", str(tmp_path), "--state-file",
                              str(tmp_path / "none.json"), "--pod", "ns/pod"])  # fmt: skip
    assert runners["inspect"](args) == 1
    assert "no readable bpf state file" in capsys.readouterr().err
