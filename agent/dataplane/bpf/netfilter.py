"""The egress verdict on netfilter links (kernel >= 6.4): `nf_egress_link` attached with
BPF_LINK_CREATE at FORWARD and LOCAL_IN of IPv4 and IPv6, with no iptables rule around it.

Why: run from an iptables rule (xt_bpf), every forwarded packet also pays the filter table's walk
and the compat match around the program, ~6 % of the same-node connection rate on the benchmark
machine. A link is one hook function of its own, ordered by priority: a rule another tool
inserts at the top of FORWARD cannot step in front of it, and an iptables reload cannot flush it.

BCC cannot load the program by itself: a netfilter program needs expected_attach_type
BPF_NETFILTER at load time, and it reads the packet through kfuncs (netfilter programs have no
skb helpers), which BCC cannot emit. So BCC compiles it with the rest (same maps); here its
instructions are taken with dump_func, every placeholder helper call of bpf/lib/kfunc.h is
rewritten into a call of the kernel function of that name (its BTF id on the running kernel),
and the result is loaded with BPF_PROG_LOAD. A kernel without netfilter programs or without the
kfuncs refuses the load: `NetfilterUnsupported`, and the dataplane falls back to xt_bpf.

The links are pinned in the pin directory, so enforcement outlives the agent. A new agent links
its program first and only then unpins the links of the old one: for a moment both judge (the
same maps, the same verdicts), never neither. The kernel refuses two BPF links at one hook with
the same priority (EBUSY), so the new links take whichever of LINK_PRIORITIES the old ones leave
free.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import struct
import time
from typing import Any

from agent.dataplane.base import PermanentDataplaneError, TemporaryDataplaneError
from agent.dataplane.bpf.syscall import bpf
from agent.dataplane.netns import inside

BPF_PROG_LOAD = 5
BPF_LINK_CREATE = 28
BPF_PROG_TYPE_NETFILTER = 32
BPF_NETFILTER = 45  # attach type
BPF_PSEUDO_KFUNC_CALL = 2
BPF_CALL_INSN = 0x85  # BPF_JMP | BPF_CALL
BTF_KIND_FUNC = 12

# Placeholder helper ids of bpf/lib/kfunc.h -> the kernel function each call stands for.
KFUNC_PLACEHOLDERS = {
    0x7F01: "bpf_dynptr_from_skb",
    0x7F02: "bpf_dynptr_size",
}

NFPROTO_IPV4 = 2
NFPROTO_IPV6 = 10
NF_INET_LOCAL_IN = 1
NF_INET_FORWARD = 2
# (family, hook) of every link: packets forwarded for a pod and packets a pod sends to the node
LINK_HOOKS = (
    (NFPROTO_IPV4, NF_INET_FORWARD),
    (NFPROTO_IPV4, NF_INET_LOCAL_IN),
    (NFPROTO_IPV6, NF_INET_FORWARD),
    (NFPROTO_IPV6, NF_INET_LOCAL_IN),
)
_HOOK_NAMES = {
    (NFPROTO_IPV4, NF_INET_FORWARD): "ipv4_forward",
    (NFPROTO_IPV4, NF_INET_LOCAL_IN): "ipv4_input",
    (NFPROTO_IPV6, NF_INET_FORWARD): "ipv6_forward",
    (NFPROTO_IPV6, NF_INET_LOCAL_IN): "ipv6_input",
}
# Just before the filter tables (NF_IP_PRI_FILTER = 0), after conntrack, mangle and kube-proxy's
# DNAT (PREROUTING), before SNAT (POSTROUTING; LOCAL_IN's NAT runs at +100). Two of them, so that
# a new agent's links can sit beside the old ones for the handover.
LINK_PRIORITIES = (-1, -2)
LINK_PIN_PREFIX = "nf_link_"
# Linux >= 6.6: the kernel reassembles IP datagrams before the link's hook even where nothing else
# uses conntrack, so the verdict always sees a whole datagram with its L4 header. Where the kernel
# refuses the flag (6.4, 6.5) later fragments take their first fragment's verdict (lib/frag.h).
BPF_F_NETFILTER_IP_DEFRAG = 1

class NetfilterUnsupported(PermanentDataplaneError):
    """This kernel cannot run the egress verdict as a netfilter link (older than 6.4, no BTF, or
    without the kfuncs the program needs)."""


class _ProgLoadAttr(ctypes.Structure):
    """The BPF_PROG_LOAD part of union bpf_attr (uapi/linux/bpf.h) up to expected_attach_type."""

    _fields_ = [
        ("prog_type", ctypes.c_uint32),
        ("insn_cnt", ctypes.c_uint32),
        ("insns", ctypes.c_uint64),
        ("license", ctypes.c_uint64),
        ("log_level", ctypes.c_uint32),
        ("log_size", ctypes.c_uint32),
        ("log_buf", ctypes.c_uint64),
        ("kern_version", ctypes.c_uint32),
        ("prog_flags", ctypes.c_uint32),
        ("prog_name", ctypes.c_char * 16),
        ("prog_ifindex", ctypes.c_uint32),
        ("expected_attach_type", ctypes.c_uint32),
    ]


class _NetfilterLinkAttr(ctypes.Structure):
    """The BPF_LINK_CREATE part of union bpf_attr with its netfilter member."""

    _fields_ = [
        ("prog_fd", ctypes.c_uint32),
        ("target_fd", ctypes.c_uint32),
        ("attach_type", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("pf", ctypes.c_uint32),
        ("hooknum", ctypes.c_uint32),
        ("priority", ctypes.c_int32),
        ("netfilter_flags", ctypes.c_uint32),
    ]


def kfunc_btf_ids(names: list[str]) -> dict[str, int]:
    """The BTF id of each kernel function in the running kernel's BTF (/sys/kernel/btf/vmlinux)."""
    from bcc import libbcc  # libbcc carries libbpf's BTF reader

    lib = libbcc.lib
    lib.btf__load_vmlinux_btf.restype = ctypes.c_void_p
    lib.btf__find_by_name_kind.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_uint32]
    lib.btf__find_by_name_kind.restype = ctypes.c_int32
    lib.btf__free.argtypes = [ctypes.c_void_p]
    btf = lib.btf__load_vmlinux_btf()
    if not btf or btf > 2**64 - 4096:  # NULL or an ERR_PTR
        raise NetfilterUnsupported("the kernel's BTF (/sys/kernel/btf/vmlinux) cannot be read")
    try:
        ids = {name: int(lib.btf__find_by_name_kind(btf, name.encode(), BTF_KIND_FUNC)) for name in names}
    finally:
        lib.btf__free(btf)
    missing = sorted(name for name, btf_id in ids.items() if btf_id <= 0)
    if missing:
        raise NetfilterUnsupported(f"the kernel has no kfunc {', '.join(missing)}")
    return ids


def patch_kfunc_calls(instructions: bytes, btf_ids: dict[int, int]) -> bytes:
    """Rewrite each helper call to a placeholder id into a kfunc call of that BTF id."""
    if len(instructions) % 8:
        raise ValueError("BPF instructions come in 8-byte units")
    patched = bytearray(instructions)
    for offset in range(0, len(patched), 8):
        code, registers, jump, immediate = struct.unpack_from("<BBhi", patched, offset)
        if code == BPF_CALL_INSN and (registers >> 4) == 0 and immediate in btf_ids:
            registers = (registers & 0x0F) | (BPF_PSEUDO_KFUNC_CALL << 4)
            struct.pack_into("<BBhi", patched, offset, code, registers, jump, btf_ids[immediate])
    return bytes(patched)


def load_program(module: Any, name: str) -> int:
    """Load BCC-compiled function `name` as a netfilter program; returns its fd."""
    try:
        instructions = module.dump_func(name.encode())
    except Exception as error:  # BCC raises bare Exception
        raise PermanentDataplaneError(f"BCC has no compiled function {name}: {error}") from error
    btf_ids = kfunc_btf_ids(list(KFUNC_PLACEHOLDERS.values()))
    placeholders = {slot: btf_ids[kfunc] for slot, kfunc in KFUNC_PLACEHOLDERS.items()}
    code = patch_kfunc_calls(instructions, placeholders)
    code_buffer = ctypes.create_string_buffer(code, len(code))
    license_buffer = ctypes.create_string_buffer(b"GPL")
    log_buffer = ctypes.create_string_buffer(1 << 20)
    attr = _ProgLoadAttr(
        prog_type=BPF_PROG_TYPE_NETFILTER,
        insn_cnt=len(code) // 8,
        insns=ctypes.addressof(code_buffer),
        license=ctypes.addressof(license_buffer),
        prog_name=name.encode()[:15],
        expected_attach_type=BPF_NETFILTER,
    )
    try:
        return bpf(BPF_PROG_LOAD, attr, "BPF_PROG_LOAD")
    except OSError as first:
        # again with the verifier's log, only needed to explain the refusal
        attr.log_level, attr.log_size, attr.log_buf = 1, len(log_buffer), ctypes.addressof(log_buffer)
        with contextlib.suppress(OSError):
            os.close(bpf(BPF_PROG_LOAD, attr, "BPF_PROG_LOAD"))
        tail = " | ".join(log_buffer.value.decode(errors="replace").strip().splitlines()[-3:])
        message = f"the kernel refused {name} as a netfilter program: {first}; {tail}"
        raise NetfilterUnsupported(message) from first


def _pin(fd: int, path: str) -> None:
    from bcc import libbcc

    if libbcc.lib.bpf_obj_pin(fd, path.encode()) != 0:
        raise TemporaryDataplaneError(f"cannot pin {path}: {os.strerror(ctypes.get_errno())}")


class NetfilterLinks:
    """podfence's netfilter links in `netns` (one per family and hook), pinned under `pin_dir`."""

    def __init__(self, pin_dir: str, netns: str | None) -> None:
        self.pin_dir = pin_dir
        self.netns = netns
        self._program_fd = -1
        self._pins: dict[tuple[int, int], str] = {}
        # whether the links ask the kernel for defragmentation; cleared where it refuses the flag
        self.defrag = True

    @property
    def program_fd(self) -> int:
        """The linked program (-1 before install): for test runs."""
        return self._program_fd

    def install(self, program_fd: int) -> None:
        """Link `program_fd` at every hook, then unpin every other link of ours."""
        self._program_fd = program_fd
        stamp = time.monotonic_ns()
        pins = {hook: self._link(hook, stamp) for hook in LINK_HOOKS}
        self._pins = pins
        self._unpin(keep=set(pins.values()))

    def repair(self) -> list[str]:
        """Link again where a pin of ours vanished (someone unpinned it); returns what was redone."""
        if self._program_fd < 0:
            return []
        repaired = []
        for hook, pin in list(self._pins.items()):
            if not os.path.exists(pin):
                self._pins[hook] = self._link(hook, time.monotonic_ns())
                repaired.append(f"netfilter link {_HOOK_NAMES[hook]}")
        return repaired

    def pinned(self) -> list[str]:
        """Every link pin of ours in the pin directory (this agent's or a previous one's)."""
        with contextlib.suppress(FileNotFoundError):
            names = os.listdir(self.pin_dir)
            return sorted(f"{self.pin_dir}/{name}" for name in names if name.startswith(LINK_PIN_PREFIX))
        return []

    def remove(self) -> None:
        """Unpin every link of ours: the kernel unhooks a link when its last reference goes."""
        self._unpin(keep=set())
        self._pins = {}

    def close(self) -> None:
        """Forget the program (its links stay pinned and running)."""
        if self._program_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._program_fd)
        self._program_fd = -1

    def _link(self, hook: tuple[int, int], stamp: int) -> str:
        link_fd = self._create(hook)
        try:
            pin = f"{self.pin_dir}/{LINK_PIN_PREFIX}{_HOOK_NAMES[hook]}_{stamp}"
            _pin(link_fd, pin)
        finally:
            os.close(link_fd)  # the pin holds the link now
        return pin

    def _create(self, hook: tuple[int, int]) -> int:
        family, hooknum = hook
        for priority in LINK_PRIORITIES:
            attr = _NetfilterLinkAttr(
                prog_fd=self._program_fd,
                attach_type=BPF_NETFILTER,
                pf=family,
                hooknum=hooknum,
                priority=priority,
                netfilter_flags=BPF_F_NETFILTER_IP_DEFRAG if self.defrag else 0,
            )
            with inside(self.netns):  # a link hooks the namespace of the thread that creates it
                try:
                    return bpf(BPF_LINK_CREATE, attr, "BPF_LINK_CREATE")
                except OSError as error:
                    if error.errno == errno.EBUSY and priority != LINK_PRIORITIES[-1]:
                        continue  # a link of the previous agent holds this priority
                    if error.errno in (errno.EINVAL, errno.EOPNOTSUPP) and self.defrag:
                        self.defrag = False  # a kernel before 6.6: link without defragmentation
                        return self._create(hook)
                    raise NetfilterUnsupported(f"netfilter link at {_HOOK_NAMES[hook]}: {error}") from error
        raise AssertionError("unreachable: the last priority raises")

    def _unpin(self, keep: set[str]) -> None:
        for pin in self.pinned():
            if pin not in keep:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(pin)
