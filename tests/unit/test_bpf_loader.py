"""The BPF source as BCC compiles it: one text with the project's includes inlined, knobs as -D."""

from __future__ import annotations

import re

from agent.dataplane.bpf import loader


def knobs(**overrides: object) -> loader.BuildKnobs:
    values: dict = dict(
        pin_dir="/sys/fs/bpf/x",
        unknown_allow=False,
        ct_max=1,
        policy_max=2,
        ipcache_max=3,
        cidr_max=4,
        endpoints_max=5,
        node_ips_max=6,
        frag_max=7,
        event_rate=8,
    )
    values.update(overrides)
    return loader.BuildKnobs(**values)


def test_program_text_inlines_every_local_include_once() -> None:
    text = loader.program_text()
    assert not re.search(r'^#include "', text, re.MULTILINE)
    for program in (loader.PROGRAM_FROM_POD, loader.PROGRAM_TO_POD, loader.PROGRAM_NF_EGRESS):
        assert f"int {program}(struct __sk_buff *skb)" in text
    assert text.count("struct pf_ct_key {") == 1  # podfence.h inlined once despite several includers
    for map_name in ("pf_endpoints", "pf_ipcache", "pf_cidr", "pf_policy", "pf_ct", "pf_frag", "pf_counters"):
        assert re.search(rf"\b{map_name}\b", text)


def test_knobs_become_define_flags() -> None:
    flags = knobs(unknown_allow=True).cflags()
    assert '-DPF_PIN_DIR="/sys/fs/bpf/x"' in flags
    assert "-DPF_UNKNOWN_ALLOW=1" in flags
    assert "-DPF_POLICY_MAX=2" in flags and "-DPF_EVENT_RATE=8" in flags
    assert "-DPF_UNKNOWN_ALLOW=0" in knobs().cflags()


def test_conntrack_timeouts_mirror_the_datapath_defaults() -> None:
    """The agent's count of live conntrack entries expires them as the datapath does."""
    from agent.dataplane.bpf import structs

    text = (loader.BPF_SOURCE_DIR / "lib" / "common.h").read_text()
    defined = {name: int(value) for name, value in re.findall(r"#define PF_CT_TIMEOUT_(\w+) (\d+)", text)}
    assert defined == {
        "TCP": structs.CT_TIMEOUT_TCP,
        "TCP_CLOSING": structs.CT_TIMEOUT_TCP_CLOSING,
        "UDP": structs.CT_TIMEOUT_UDP,
        "SCTP": structs.CT_TIMEOUT_SCTP,
        "ICMP": structs.CT_TIMEOUT_ICMP,
        "OTHER": structs.CT_TIMEOUT_OTHER,
    }


def test_the_conntrack_bound_per_endpoint_is_a_define_flag() -> None:
    assert "-DPF_CT_ENDPOINT_MAX=0" in knobs().cflags()
    assert "-DPF_CT_ENDPOINT_MAX=64" in knobs(ct_endpoint_max=64).cflags()
