"""BPF_PROG_TEST_RUN through the bpf() syscall (ctypes): run a loaded program on one packet.

Used by the packet-table tests and handy for debugging a verdict without any traffic. The
packet is run on the caller's loopback device (skb->ifindex 1) unless `ifindex` names another
device of the calling thread's network namespace (the kernel looks it up there). A netfilter
program is run as if at the hook and family named in its context (kernel >= 6.4).
"""

from __future__ import annotations

import ctypes

from agent.dataplane.bpf.netfilter import NF_INET_FORWARD, NFPROTO_IPV4, NFPROTO_IPV6
from agent.dataplane.bpf.syscall import bpf

BPF_PROG_TEST_RUN = 10
TC_ACT_OK = 0
TC_ACT_SHOT = 2

class _TestRunAttr(ctypes.Structure):
    _fields_ = [
        ("prog_fd", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("data_in", ctypes.c_uint64),
        ("data_out", ctypes.c_uint64),
        ("repeat", ctypes.c_uint32),
        ("duration", ctypes.c_uint32),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_uint64),
        ("ctx_out", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
    ]


class _SkbContext(ctypes.Structure):
    """The head of struct __sk_buff (uapi/linux/bpf.h) up to `ifindex`: the kernel accepts a
    shorter context and reads the rest as zero."""

    _fields_ = [
        ("len", ctypes.c_uint32),
        ("pkt_type", ctypes.c_uint32),
        ("mark", ctypes.c_uint32),
        ("queue_mapping", ctypes.c_uint32),
        ("protocol", ctypes.c_uint32),
        ("vlan_present", ctypes.c_uint32),
        ("vlan_tci", ctypes.c_uint32),
        ("vlan_proto", ctypes.c_uint32),
        ("priority", ctypes.c_uint32),
        ("ingress_ifindex", ctypes.c_uint32),
        ("ifindex", ctypes.c_uint32),
    ]


class _NetfilterHookState(ctypes.Structure):
    """struct nf_hook_state as BPF_PROG_TEST_RUN takes it: only hook and pf may be set."""

    _fields_ = [
        ("hook", ctypes.c_uint8),
        ("pf", ctypes.c_uint8),
        ("pointers", ctypes.c_uint64 * 5),  # in, out, sk, net, okfn: must be NULL
    ]


NF_ACCEPT = 1


def run_netfilter_program(prog_fd: int, frame: bytes, hook: int = NF_INET_FORWARD) -> int:
    """A netfilter program's verdict (NF_ACCEPT 1, NF_DROP 0) for `frame` (an Ethernet frame;
    the family follows its EtherType, the kernel refuses any other with EPROTO)."""
    ethertype = frame[12:14]
    family = NFPROTO_IPV6 if ethertype == b"\x86\xdd" else NFPROTO_IPV4
    data_in = ctypes.create_string_buffer(frame, len(frame))
    state = _NetfilterHookState(hook=hook, pf=family)
    attr = _TestRunAttr(
        prog_fd=prog_fd,
        data_size_in=len(frame),
        data_in=ctypes.addressof(data_in),
        repeat=1,
        ctx_in=ctypes.addressof(state),
        ctx_size_in=ctypes.sizeof(state),
    )
    bpf(BPF_PROG_TEST_RUN, attr, "BPF_PROG_TEST_RUN")
    return int(attr.retval)


def run_program(prog_fd: int, frame: bytes, ifindex: int = 0, ingress_ifindex: int = 0) -> int:
    """The program's return value for `frame` (an Ethernet frame), received on `ifindex`
    (0: the loopback device). `ingress_ifindex`: the device the packet entered the node on
    (0: sent by the node itself)."""
    return run_program_timed(prog_fd, frame, repeat=1, ifindex=ifindex, ingress_ifindex=ingress_ifindex)[0]


def run_program_timed(
    prog_fd: int, frame: bytes, repeat: int, ifindex: int = 0, ingress_ifindex: int = 0
) -> tuple[int, int]:
    """(return value, mean kernel-measured nanoseconds per run) over `repeat` runs."""
    data_in = ctypes.create_string_buffer(frame, len(frame))
    data_out = ctypes.create_string_buffer(len(frame) + 256)
    attr = _TestRunAttr(
        prog_fd=prog_fd,
        data_size_in=len(frame),
        data_size_out=len(data_out),
        data_in=ctypes.addressof(data_in),
        data_out=ctypes.addressof(data_out),
        repeat=repeat,
    )
    context = _SkbContext(ifindex=ifindex, ingress_ifindex=ingress_ifindex)
    if ifindex or ingress_ifindex:
        attr.ctx_in = ctypes.addressof(context)
        attr.ctx_size_in = ctypes.sizeof(context)
    bpf(BPF_PROG_TEST_RUN, attr, "BPF_PROG_TEST_RUN")
    return int(attr.retval), int(attr.duration)
