"""The eBPF dataplane: tc programs on each pod's host-side interface plus a netfilter egress hook
(BPF netfilter links, or an xt_bpf rule on older kernels), all policy in pinned maps. See
bpf/README.md for the design.

Public surface: `BpfDataplane` (implements agent.dataplane.base.Dataplane) and `DenyEvent`.
BCC is imported lazily so that the pure compiler can be used (and unit-tested) without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agent.dataplane.bpf.dataplane import BpfDataplane
    from agent.dataplane.bpf.telemetry import DenyEvent

__all__ = ["BpfDataplane", "DenyEvent"]


def __getattr__(name: str) -> Any:
    if name == "BpfDataplane":
        from agent.dataplane.bpf.dataplane import BpfDataplane

        return BpfDataplane
    if name == "DenyEvent":
        from agent.dataplane.bpf.telemetry import DenyEvent

        return DenyEvent
    raise AttributeError(name)
