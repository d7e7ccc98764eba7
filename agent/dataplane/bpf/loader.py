"""Build and load the BPF C in bpf/ with BCC: build knobs as -D flags, pinned maps, the three programs.

BCC rewrites map method calls (`map.lookup(&key)`) only in the main translation unit, not in
#included files, so the loader inlines the project's own `#include "..."` lines (podfence.h,
lib/*.h) into one source text before compiling. That text is "the final program": setting
PODFENCE_BPF_DUMP=1 prints it with the -D flags to stderr.
"""

from __future__ import annotations

import ctypes
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.dataplane.base import PermanentDataplaneError
from agent.dataplane.bpf import structs

MAIN_SOURCE = "podfence.c"
PACKAGED_SOURCE_DIR = "sources"  # where a wheel carries bpf/ (setup.py copies it at build time)


def _bpf_source_dir() -> Path:
    """The BPF C sources: bpf/ beside agent/ in a checkout or an editable install (edits to it are
    used as they are), else the copy a wheel carries inside this package."""
    here = Path(__file__).resolve().parent
    checkout = here.parents[2] / "bpf"
    return checkout if (checkout / MAIN_SOURCE).is_file() else here / PACKAGED_SOURCE_DIR


BPF_SOURCE_DIR = _bpf_source_dir()
_LOCAL_INCLUDE = re.compile(r'^#include "([^"]+)"\s*$', re.MULTILINE)

PROGRAM_FROM_POD = "tc_from_pod"
PROGRAM_TO_POD = "tc_to_pod"
PROGRAM_NF_EGRESS = "nf_egress"
PROGRAM_NF_EGRESS_LINK = "nf_egress_link"  # loaded by netfilter.py, not by BCC


# Notes of flow-opening packets per CPU (bpf/lib/conntrack.h): the map has per-CPU LRU lists, each
# holding its share of the entries; a share must outlast the packets of one receive batch between
# tc and the netfilter hook (64 a NAPI poll) with room for the notes no verdict takes.
CT_EXPECT_PER_CPU = 1024


def possible_cpus() -> int:
    """How many CPUs the kernel may bring up (an LRU map with per-CPU lists splits among them)."""
    try:
        text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    except OSError:
        return os.cpu_count() or 1
    count = 0
    for part in text.split(","):
        first, _, last = part.partition("-")
        count += int(last or first) - int(first) + 1
    return count


# The benchmark-only build knobs (bpf/lib/common.h), each 0 in every build the agent makes.
BENCH_DEFINES = ("PF_BENCH_TC_PASS", "PF_BENCH_NF_PASS", "PF_BENCH_NO_FLOW_STATE")


@dataclass(frozen=True)
class BuildKnobs:
    """Compile-time settings of the datapath; each becomes one -D flag."""

    pin_dir: str
    unknown_allow: bool
    ct_max: int
    policy_max: int
    ipcache_max: int
    cidr_max: int
    endpoints_max: int
    node_ips_max: int
    frag_max: int
    event_rate: int
    flow_deny_interval: int = 5  # seconds (PF_FLOW_DENY_INTERVAL, lib/metrics.h)
    tcp_needs_syn: bool = False  # established_on_change="reset" (see bpf/lib/common.h)
    ct_endpoint_max: int = 0  # conntrack entries one endpoint may hold; 0: no bound (lib/conntrack.h)
    # Benchmark builds only (bench/hook_floor.py), never the agent's: PF_BENCH_* macros of
    # bpf/lib/common.h to set to 1, each cutting the programs short at a fixed point.
    bench_defines: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        unknown = [name for name in self.bench_defines if name not in BENCH_DEFINES]
        if unknown:
            known = ", ".join(BENCH_DEFINES)
            raise ValueError(f"no benchmark build knob {', '.join(unknown)} (known: {known})")

    def cflags(self) -> list[str]:
        values: dict[str, int | str] = {
            "PF_PIN_DIR": f'"{self.pin_dir}"',
            "PF_UNKNOWN_ALLOW": int(self.unknown_allow),
            "PF_CT_MAX": self.ct_max,
            "PF_POLICY_MAX": self.policy_max,
            "PF_IPCACHE_MAX": self.ipcache_max,
            "PF_CIDR_MAX": self.cidr_max,
            "PF_ENDPOINTS_MAX": self.endpoints_max,
            "PF_NODE_IPS_MAX": self.node_ips_max,
            "PF_FRAG_MAX": self.frag_max,
            "PF_CT_EXPECT_MAX": CT_EXPECT_PER_CPU * possible_cpus(),
            "PF_EVENT_RATE": self.event_rate,
            "PF_FLOW_DENY_INTERVAL": self.flow_deny_interval,
            "PF_TCP_NEEDS_SYN": int(self.tcp_needs_syn),
            "PF_CT_ENDPOINT_MAX": self.ct_endpoint_max,
        }
        values.update({name: 1 for name in self.bench_defines})
        return [f"-D{name}={value}" for name, value in values.items()]


def inline_local_includes(path: Path, seen: set[Path] | None = None) -> str:
    """The source at `path` with every project-local #include replaced by the file's text."""
    seen = set() if seen is None else seen
    path = path.resolve()
    if path in seen:  # include guards would make it empty anyway
        return ""
    seen.add(path)
    text = path.read_text()

    def expand(match: re.Match[str]) -> str:
        included = (BPF_SOURCE_DIR / match.group(1)).resolve()
        if not included.is_file():
            included = (path.parent / match.group(1)).resolve()
        body = inline_local_includes(included, seen)
        return f"/* ---- {match.group(1)} ---- */\n{body}\n/* ---- end {match.group(1)} ---- */"

    return _LOCAL_INCLUDE.sub(expand, text)


def program_text() -> str:
    return inline_local_includes(BPF_SOURCE_DIR / MAIN_SOURCE)


# Pinned maps that hold only flow state, which the datapath rebuilds from the next packets: a pin of
# another layout (left by another version) is replaced by a fresh map instead of refused.
FLOW_STATE_MAPS = ("pf_ct", "pf_ct_expect", "pf_frag")


def retire_stale_flow_state(pin_dir: str) -> list[str]:
    """Unpin flow-state maps whose key/value sizes are not this version's, so that compiling (next)
    creates them afresh; the programs still attached keep their old map until they are replaced.
    Returns a warning per retired map. Forgetting flows fails closed: their next packet is judged
    again (a reply of an egress-only flow may be dropped once)."""
    from bcc import libbcc

    warnings = []
    for name in FLOW_STATE_MAPS:
        path = Path(pin_dir) / name
        if not path.exists():
            continue
        key, value = structs.MAP_MIRRORS[name]
        fd = libbcc.lib.bpf_obj_get(str(path).encode())
        if fd < 0:
            raise PermanentDataplaneError(f"cannot open pinned map {path}")
        try:
            info = _MapInfo()
            length = ctypes.c_uint32(ctypes.sizeof(info))
            if libbcc.lib.bpf_obj_get_info(fd, ctypes.byref(info), ctypes.byref(length)) != 0:
                raise PermanentDataplaneError(f"cannot read the layout of pinned map {path}")
        finally:
            os.close(fd)
        if (info.key_size, info.value_size) != (ctypes.sizeof(key), ctypes.sizeof(value)):
            path.unlink()
            warnings.append(
                f"pinned map {name} had another version's layout ({info.key_size}/{info.value_size} "
                f"bytes per key/value): replaced by an empty one, its flows are judged again"
            )
    return warnings


def compile_module(knobs: BuildKnobs) -> Any:
    """Compile the datapath with BCC; pinned maps are created or re-opened under knobs.pin_dir."""
    try:
        from bcc import BPF
    except ImportError as error:  # pragma: no cover - bootstrap installs python3-bpfcc
        raise PermanentDataplaneError("BCC (python3-bpfcc) is not importable") from error
    text = program_text()
    cflags = knobs.cflags()
    if os.environ.get("PODFENCE_BPF_DUMP") == "1":
        print(f"/* podfence BPF program, cflags: {' '.join(cflags)} */\n{text}", file=sys.stderr)
    os.makedirs(knobs.pin_dir, exist_ok=True)
    try:
        return BPF(text=text, cflags=cflags)
    except Exception as error:  # BCC raises bare Exception for compile/load failures
        raise PermanentDataplaneError(f"the BPF program failed to compile or load: {error}") from error


PINNED_MAPS = (
    "pf_endpoints",
    "pf_endpoint_ips",
    "pf_node_ips",
    "pf_ipcache",
    "pf_cidr",
    "pf_cidr_host",
    "pf_policy",
    "pf_policy_exact",
    "pf_ct",
    "pf_ct_expect",
    "pf_frag",
    "pf_counters",
    "pf_audit",
    "pf_audit_denied",
    "pf_drop_reasons",
    "pf_events_lost",
)


class _MapInfo(ctypes.Structure):
    """The head of struct bpf_map_info (uapi/linux/bpf.h)."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * 16),
        ("rest", ctypes.c_uint8 * 128),
    ]


def verify_pinned_layouts(module: Any) -> tuple[dict[str, int], list[str]]:
    """Refuse pinned maps whose key/value layout is not this program's (left by another version):
    BCC re-opens a pin whatever its layout, and a mismatch would be misread, not rejected.
    Returns every map's real capacity (a pin keeps its size) and warnings where it differs from
    the requested one."""
    from bcc import libbcc

    warnings = []
    capacities: dict[str, int] = {}
    for name in PINNED_MAPS:
        table = module[name.encode()]
        info = _MapInfo()
        length = ctypes.c_uint32(ctypes.sizeof(info))
        if libbcc.lib.bpf_obj_get_info(table.get_fd(), ctypes.byref(info), ctypes.byref(length)) != 0:
            raise PermanentDataplaneError(f"cannot read the layout of pinned map {name}")
        value_type = getattr(table, "sLeaf", table.Leaf)
        expected = (ctypes.sizeof(table.Key), ctypes.sizeof(value_type))
        if (info.key_size, info.value_size) != expected:
            raise PermanentDataplaneError(
                f"pinned map {name} has key/value sizes {info.key_size}/{info.value_size}, this version "
                f"needs {expected[0]}/{expected[1]}: remove the old pins first (podfence teardown)"
            )
        if info.max_entries != table.max_entries:
            warnings.append(
                f"pinned map {name} keeps its {info.max_entries} entries (asked {table.max_entries})"
            )
        capacities[name] = int(info.max_entries)
    return capacities, warnings


def load_programs(module: Any) -> dict[str, Any]:
    """Load the three programs into the kernel (verifier); returns name -> BCC function."""
    from bcc import BPF

    kinds = {
        PROGRAM_FROM_POD: BPF.SCHED_CLS,
        PROGRAM_TO_POD: BPF.SCHED_CLS,
        PROGRAM_NF_EGRESS: BPF.SOCKET_FILTER,
    }
    try:
        return {name: module.load_func(name.encode(), kind) for name, kind in kinds.items()}
    except Exception as error:
        raise PermanentDataplaneError(f"the kernel rejected a BPF program: {error}") from error
