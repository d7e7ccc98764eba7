"""Verify the bpf dataplane's kernel objects and put back what someone removed.

What podfence installed outside its maps can be removed by hand (root in the node's network
namespace): a pod interface's clsact qdisc or one of our two tc filters (`tc filter del`, `tc
qdisc del dev X clsact`), or the bpffs pin of a map or of the iptables hook's egress program
(`rm`). The agent's state check (agent/node/repair.py) calls `repair` on a timer and on tc
netlink notifications; it finds the drift with one filter dump per hook and interface and one
`bpf_obj_get` per pin, and repairs with the same idempotent calls an apply makes.

None of these repairs opens anything: a filter or qdisc is attached again with the programs
already loaded and the maps as they are (the policy never left them: the programs hold the maps,
not the pins), and a pin is re-created from the map or program this process holds open. The
window is the one the removal opened: a pod interface without our filter is not filtered until
the repair (docs/security.md says so); a removed pin opens nothing (the next agent start would
create empty maps, fail-closed, instead of adopting the state).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import struct
from collections.abc import Iterable
from typing import Any

from pyroute2 import NetlinkError

from agent.dataplane.base import TemporaryDataplaneError
from agent.dataplane.bpf import attach, loader

PARENTS = {attach.TC_PARENT_INGRESS: 0xFFFFFFF2, attach.TC_PARENT_EGRESS: 0xFFFFFFF3}
HOOK_NAMES = {attach.TC_PARENT_INGRESS: "ingress (from the pod)", attach.TC_PARENT_EGRESS: "egress (to pod)"}

Drift = tuple[str, str]  # (kind, what was found): kind is a podfence_state_repairs_total label


class _ObjectInfo(ctypes.Structure):
    """The head shared by struct bpf_prog_info and struct bpf_map_info: type, then id."""

    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("rest", ctypes.c_uint8 * 248)]


def object_id(fd: int) -> int:
    """The kernel's id of the BPF program or map behind `fd` (0 when it cannot be read)."""
    from bcc import libbcc

    info = _ObjectInfo()
    length = ctypes.c_uint32(ctypes.sizeof(info))
    if libbcc.lib.bpf_obj_get_info(fd, ctypes.byref(info), ctypes.byref(length)) != 0:
        return 0
    return int(info.id)


def pinned_id(path: str) -> int | None:
    """The id of the object pinned at `path`; None when nothing is pinned there."""
    from bcc import libbcc

    fd = libbcc.lib.bpf_obj_get(path.encode())
    if fd < 0:
        return None
    try:
        return object_id(fd)
    finally:
        os.close(fd)


def _our_program_ids(sock: Any, ifindex: int) -> dict[str, int] | None:
    """parent -> id of the program our filter (fixed prio and handle) runs there; None when the
    interface has no clsact qdisc (the filter dump is refused)."""
    found: dict[str, int] = {}
    for parent, number in PARENTS.items():
        try:
            filters = sock.get_filters(ifindex, parent=number)
        except NetlinkError as error:
            if error.code == errno.ENODEV:
                raise attach.InterfaceVanished(f"interface {ifindex} vanished") from error
            if error.code == errno.EINVAL:  # no clsact: no hook to list
                return None
            raise TemporaryDataplaneError(f"listing tc filters of interface {ifindex}: {error}") from error
        for entry in filters:
            if entry.get_attr("TCA_KIND") != "bpf" or entry["info"] >> 16 != attach.TC_PRIORITY:
                continue
            program = _filter_program_id(entry.get_attr("TCA_OPTIONS"))
            if program:
                found[parent] = program
    return found


TCA_BPF_ID = 11  # linux/pkt_cls.h


def _filter_program_id(options: Any) -> int:
    """The id of the program a bpf filter runs (TCA_BPF_ID). pyroute2 does not decode that
    attribute (it lists it as UNKNOWN), so it is read from the raw attribute: a u32."""
    if options is None:
        return 0
    for name, attribute in options["attrs"]:
        if name == "TCA_BPF_ID":
            return int(attribute)
        if name == "UNKNOWN" and attribute["header"]["type"] == TCA_BPF_ID:
            (program,) = struct.unpack_from("=I", attribute.data, attribute.offset + 4)
            return int(program)
    return 0


def _has_clsact(sock: Any, ifindex: int) -> bool:
    try:
        return any(q.get_attr("TCA_KIND") == "clsact" for q in sock.get_qdiscs(index=ifindex))
    except NetlinkError:
        return False


def repair_tc(sock: Any, interfaces: Iterable[int], programs: dict[str, Any]) -> list[Drift]:
    """Every guarded interface must have clsact and our two filters running these programs."""
    from_pod, to_pod = programs[loader.PROGRAM_FROM_POD].fd, programs[loader.PROGRAM_TO_POD].fd
    wanted = {attach.TC_PARENT_INGRESS: object_id(from_pod), attach.TC_PARENT_EGRESS: object_id(to_pod)}
    drift: list[Drift] = []
    for ifindex in sorted(interfaces):
        try:
            found = _our_program_ids(sock, ifindex)
        except attach.InterfaceVanished:
            continue  # gone with its pod: the next apply forgets it
        if found == wanted:
            continue
        if found is None or (not found and not _has_clsact(sock, ifindex)):
            drift.append(("clsact", f"interface {ifindex}: clsact qdisc missing"))
        else:
            for parent in sorted(p for p in wanted if found.get(p) != wanted[p]):
                hook = HOOK_NAMES[parent]
                what = "missing" if parent not in found else f"runs program {found[parent]}, not ours"
                drift.append(("tc_filter", f"interface {ifindex}: {hook} filter {what}"))
        with contextlib.suppress(attach.InterfaceVanished):
            attach.attach_tc(sock, ifindex, from_pod, to_pod)
    return drift


def repair_pins(pins: dict[str, int]) -> list[Drift]:
    """`pins`: bpffs path -> fd of the map or program this process holds that must be pinned
    there. A missing pin is re-created; one that holds another object is replaced."""
    from bcc import libbcc

    drift: list[Drift] = []
    for path, fd in sorted(pins.items()):
        ours = object_id(fd)
        there = pinned_id(path)
        if there == ours:
            continue
        if there is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        if libbcc.lib.bpf_obj_pin(fd, path.encode()) != 0:
            reason = os.strerror(ctypes.get_errno())
            raise TemporaryDataplaneError(f"cannot pin {path} again: {reason}")
        drift.append(("pin", f"{path}: {'missing' if there is None else f'held object {there}'}"))
    return drift


def pins_of(module: Any, pin_dir: str) -> dict[str, int]:
    """The pinned maps: bpffs path -> the fd this process holds."""
    return {f"{pin_dir}/{name}": module[name.encode()].get_fd() for name in loader.PINNED_MAPS}
