"""Where the BPF dataplane's egress verdict (after DNAT) runs, and keeping it there.

"netfilter": netfilter links (netfilter.py, kernel >= 6.4); "iptables": an xt_bpf rule first in
FORWARD and INPUT running a pinned program; "auto" (default): links where the kernel can, else
the rule. Switching either way installs the new hook before removing the old one, so the
egress verdict never stops.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import time
from typing import Any

from agent.dataplane.base import PermanentDataplaneError
from agent.dataplane.bpf import attach, loader, netfilter

log = logging.getLogger(__name__)

NF_PROGRAM_PIN = "nf_egress"
EGRESS_HOOKS = ("auto", "netfilter", "iptables")


class EgressHook:
    def __init__(self, setting: str, pin_dir: str, netns: str | None) -> None:
        if setting not in EGRESS_HOOKS:
            raise ValueError(f"egress_hook must be one of {', '.join(EGRESS_HOOKS)}")
        self.setting = setting
        self.in_use = ""  # "netfilter" or "iptables" once installed
        self.pin_dir = pin_dir
        self.iptables = attach.Iptables(netns)
        self.links = netfilter.NetfilterLinks(pin_dir, netns)
        self._nf_pin = ""  # bpffs path of the egress program the iptables rule runs

    def install(self, module: Any, programs: dict[str, Any]) -> None:
        """Run this agent's egress program from netfilter links or the iptables rule, and only then
        remove the other kind of hook (left by an earlier run with another setting or kernel)."""
        if self.setting != "iptables":
            try:
                program_fd = netfilter.load_program(module, loader.PROGRAM_NF_EGRESS_LINK)
                self.links.install(program_fd)
            except netfilter.NetfilterUnsupported as error:
                if self.setting == "netfilter":
                    raise
                log.warning("no netfilter links, the egress verdict runs from iptables (xt_bpf): %s", error)
            else:
                self.in_use = "netfilter"
                if not self.links.defrag:
                    log.warning(
                        "netfilter links without IP defragmentation (Linux < 6.6): later "
                        "fragments take the verdict of their first fragment"
                    )
                if self.iptables.available():
                    self.iptables.remove()
                self._unpin_nf_programs(keep="")
                return
        self._install_nf_program(programs)
        self.in_use = "iptables"
        self.links.remove()

    def repair(self) -> list[str]:
        """Put the hook back where it must be if something moved or removed it (the xt_bpf rule
        first in FORWARD and INPUT running the current program; every netfilter link pinned);
        returns what was repaired."""
        if self.in_use == "netfilter":
            return self.links.repair()
        return self.iptables.install(self._nf_pin)

    def remove(self) -> None:
        """Remove both kinds of hook (teardown: whichever an earlier run left)."""
        self.links.remove()
        if self.iptables.available():
            self.iptables.remove()

    def close(self) -> None:
        self.links.close()

    def _install_nf_program(self, programs: dict[str, Any]) -> None:
        """Pin the new egress program under a fresh name, point the iptables rule at it, unpin the old."""
        from bcc import libbcc

        fd = programs[loader.PROGRAM_NF_EGRESS].fd
        pin = f"{self.pin_dir}/{NF_PROGRAM_PIN}_{time.monotonic_ns()}"  # bpffs names allow no dots
        if libbcc.lib.bpf_obj_pin(fd, pin.encode()) != 0:
            reason = os.strerror(ctypes.get_errno())
            raise PermanentDataplaneError(f"cannot pin the egress program at {pin}: {reason}")
        self.iptables.install(pin)
        self._nf_pin = pin
        self._unpin_nf_programs(keep=pin)

    def _unpin_nf_programs(self, keep: str) -> None:
        for name in os.listdir(self.pin_dir):
            old = f"{self.pin_dir}/{name}"
            if name.startswith(f"{NF_PROGRAM_PIN}_") and old != keep:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(old)
