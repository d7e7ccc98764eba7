"""The Python mirrors (agent/dataplane/bpf/structs.py) match the compiled program, mechanically.

Two independent checks:
1. a probe compiled by BCC from bpf/podfence.h stores sizeof/offsetof of every mirrored struct
   field and the value of every mirrored constant into an array map, run once through
   BPF_PROG_TEST_RUN; each number must equal the mirror's;
2. the key/leaf types BCC derived from the real datapath's maps have the mirror's size and
   field offsets.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import secrets
import shutil
from collections.abc import Iterator
from typing import Any

import pytest

from agent.dataplane.base import PermanentDataplaneError
from agent.dataplane.bpf import loader, structs
from agent.dataplane.bpf.testrun import run_program

pytestmark = pytest.mark.needs("bpffs")


def expectations() -> list[tuple[str, str, int]]:
    """(label, C expression, value the mirror says)."""
    rows = []
    for mirror, c_name in structs.C_STRUCT_NAMES.items():
        rows.append((f"sizeof {c_name}", f"sizeof(struct {c_name})", ctypes.sizeof(mirror)))
        for field_name, *_ in mirror._fields_:
            offset = getattr(mirror, field_name).offset
            rows.append((f"{c_name}.{field_name}", f"offsetof(struct {c_name}, {field_name})", offset))
    for constant, value in structs.C_CONSTANTS.items():
        rows.append((constant, constant, int(value)))
    return rows


def probe_source(rows: list[tuple[str, str, int]]) -> str:
    header = (loader.BPF_SOURCE_DIR / "podfence.h").read_text()
    stores = "\n".join(
        f"    {{ u32 k = {i}; u64 v = (u64)({expr}); probe_values.update(&k, &v); }}"
        for i, (_, expr, _) in enumerate(rows)
    )
    return f"""
#include <uapi/linux/bpf.h>
#include <linux/stddef.h>
{header}
BPF_ARRAY(probe_values, u64, {len(rows)});
int probe(struct __sk_buff *skb) {{
{stores}
    return 0;
}}
"""


def test_structs_and_constants_match_a_compiled_probe() -> None:
    from bcc import BPF

    rows = expectations()
    module = BPF(text=probe_source(rows))
    try:
        function = module.load_func(b"probe", BPF.SOCKET_FILTER)
        run_program(function.fd, b"\0" * 64)
        table = module[b"probe_values"]
        mismatches = [
            f"{label}: C {table[table.Key(i)].value} != Python {value}"
            for i, (label, _, value) in enumerate(rows)
            if table[table.Key(i)].value != value
        ]
    finally:
        module.cleanup()
    assert len(rows) > 60  # every struct, field and constant was probed
    assert not mismatches, "\n".join(mismatches)


def _layout(ctype: Any) -> list[tuple[str, int, int]]:
    if not hasattr(ctype, "_fields_"):
        return [("", 0, ctypes.sizeof(ctype))]
    out = []
    for name, *_ in ctype._fields_:
        out.append((name, getattr(ctype, name).offset, getattr(ctype, name).size))
    return out


@pytest.fixture(scope="module")
def datapath() -> Iterator[Any]:
    pin_dir = f"/sys/fs/bpf/pfb-{secrets.token_hex(3)}"
    knobs = loader.BuildKnobs(
        pin_dir=pin_dir,
        unknown_allow=False,
        ct_max=64,
        policy_max=64,
        ipcache_max=64,
        cidr_max=64,
        endpoints_max=8,
        node_ips_max=8,
        frag_max=64,
        event_rate=10,
    )
    module = loader.compile_module(knobs)
    try:
        yield module
    finally:
        module.cleanup()
        shutil.rmtree(pin_dir, ignore_errors=True)


@pytest.mark.parametrize("map_name", sorted(structs.MAP_MIRRORS))
def test_map_types_derived_by_bcc_match_the_mirrors(datapath: Any, map_name: str) -> None:
    key_mirror, value_mirror = structs.MAP_MIRRORS[map_name]
    table = datapath[map_name.encode()]
    value_type = getattr(table, "sLeaf", table.Leaf)  # per-CPU maps: one CPU's value
    assert ctypes.sizeof(table.Key) == ctypes.sizeof(key_mirror)
    assert ctypes.sizeof(value_type) == ctypes.sizeof(value_mirror)
    assert _layout(table.Key) == _layout(key_mirror)
    assert _layout(value_type) == _layout(value_mirror)


def test_dump_flag_prints_the_final_program_with_its_flags(
    capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PODFENCE_BPF_DUMP", "1")
    pin_dir = f"/sys/fs/bpf/pfb-{secrets.token_hex(3)}"
    knobs = loader.BuildKnobs(
        pin_dir=pin_dir,
        unknown_allow=True,
        ct_max=64,
        policy_max=64,
        ipcache_max=64,
        cidr_max=64,
        endpoints_max=8,
        node_ips_max=8,
        frag_max=64,
        event_rate=10,
    )
    try:
        loader.compile_module(knobs).cleanup()
    finally:
        shutil.rmtree(pin_dir, ignore_errors=True)
    dumped = capfd.readouterr().err
    assert "-DPF_UNKNOWN_ALLOW=1" in dumped
    assert "int nf_egress(struct __sk_buff *skb)" in dumped and "struct pf_policy_key {" in dumped


def test_pins_of_another_layout_are_refused_and_a_resized_pin_reports_its_real_capacity() -> None:
    from bcc import BPF

    pin_dir = f"/sys/fs/bpf/pfb-{secrets.token_hex(3)}"
    os.makedirs(pin_dir)
    knobs = loader.BuildKnobs(
        pin_dir=pin_dir,
        unknown_allow=False,
        ct_max=64,
        policy_max=64,
        ipcache_max=64,
        cidr_max=64,
        endpoints_max=8,
        node_ips_max=8,
        frag_max=64,
        event_rate=10,
    )
    try:
        # what an older version with 16-byte ipcache keys would have left pinned
        old = BPF(
            text=f'BPF_TABLE_PINNED("hash", struct {{ char a[16]; }}, u64, pf_ipcache, 8, '
            f'"{pin_dir}/pf_ipcache");'.encode()
        )
        old.cleanup()
        module = loader.compile_module(knobs)
        with pytest.raises(PermanentDataplaneError, match="pf_ipcache has key/value sizes 16/8"):
            loader.verify_pinned_layouts(module)
        module.cleanup()
        shutil.rmtree(pin_dir)
        loader.compile_module(knobs).cleanup()  # pins of this layout, 64 conntrack entries
        bigger = loader.compile_module(dataclasses.replace(knobs, ct_max=128))
        capacities, warnings = loader.verify_pinned_layouts(bigger)
        bigger.cleanup()
        assert capacities["pf_ct"] == 64 and any("pf_ct" in w for w in warnings)
    finally:
        shutil.rmtree(pin_dir, ignore_errors=True)


def test_flow_state_pins_of_another_layout_are_replaced_by_fresh_maps() -> None:
    """An agent upgrade whose conntrack layout changed starts, forgetting only the flows."""
    from bcc import BPF

    pin_dir = f"/sys/fs/bpf/pfb-{secrets.token_hex(3)}"
    os.makedirs(pin_dir)
    knobs = loader.BuildKnobs(
        pin_dir=pin_dir, unknown_allow=False, ct_max=64, policy_max=64, ipcache_max=64, cidr_max=64,
        endpoints_max=8, node_ips_max=8, frag_max=64, event_rate=10,
    )
    try:
        # the conntrack of the version before one entry per flow: 40-byte keys, 16-byte values
        old = BPF(
            text=f'BPF_TABLE_PINNED("lru_hash", struct {{ char a[40]; }}, struct {{ char v[16]; }}, '
            f'pf_ct, 8, "{pin_dir}/pf_ct");'.encode()
        )
        old.cleanup()
        assert loader.retire_stale_flow_state(pin_dir) == [
            "pinned map pf_ct had another version's layout (40/16 bytes per key/value): replaced by an "
            "empty one, its flows are judged again"
        ]
        module = loader.compile_module(knobs)
        capacities, _ = loader.verify_pinned_layouts(module)  # would raise on the old layout
        module.cleanup()
        assert capacities["pf_ct"] == 64
        assert loader.retire_stale_flow_state(pin_dir) == []  # this version's own pins stay
    finally:
        shutil.rmtree(pin_dir, ignore_errors=True)
