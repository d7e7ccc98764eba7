"""Every build the agent can make loads its netfilter program (kernel >= 6.4).

Build knobs change the code the verifier walks: `established_on_change=reset` compiles
PF_TCP_NEEDS_SYN in, `unknown_endpoints=allow` PF_UNKNOWN_ALLOW. A build whose nf_egress_link
passes the verifier's one-million-instruction limit is not refused at start: the agent falls back
to the xt_bpf rule with a warning, so only a test notices (the reset build did, 2026-12-07, when
the tiers and the flow bound came together).
"""

from __future__ import annotations

import os
import re
import shutil

import pytest

from agent.dataplane.bpf import loader, netfilter
from agent.dataplane.bpf.settings import BpfSettings

pytestmark = pytest.mark.needs("bpffs")


@pytest.mark.parametrize(
    ("established_on_change", "unknown_endpoints"), [("keep", "drop"), ("reset", "allow")]
)
def test_the_netfilter_program_of_every_build_passes_the_verifier(
    established_on_change: str, unknown_endpoints: str
) -> None:
    release = tuple(int(part) for part in re.findall(r"\d+", os.uname().release)[:2])
    if release < (6, 4):
        pytest.skip(f"netfilter BPF programs need Linux >= 6.4 (this kernel is {os.uname().release})")
    settings = BpfSettings(
        pin_dir="/sys/fs/bpf/pf-build-check",
        established_on_change=established_on_change,
        unknown_endpoints=unknown_endpoints,
    )
    try:
        module = loader.compile_module(settings.knobs())  # pins its maps under pin_dir
        fd = netfilter.load_program(module, loader.PROGRAM_NF_EGRESS_LINK)  # raises with the verifier's log
        os.close(fd)
    finally:
        shutil.rmtree(settings.pin_dir, ignore_errors=True)
