"""Detection of kube-proxy's IPVS mode, whose DNAT comes after the egress hook: in a real network
namespace with kube-proxy's interface, and against a copy of the kernel's IPVS table."""

from __future__ import annotations

import logging
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.dataplane.netns import inside
from agent.lab import wiring
from agent.node.kubeproxy import IPVS_INTERFACE, ipvs_signs, warn_if_ipvs

# /proc/net/ip_vs with one virtual service (10.96.0.1:443, round robin) and one real server
IPVS_TABLE = """IP Virtual Server version 1.2.1 (size=4096)
Prot LocalAddress:Port Scheduler Flags
  -> RemoteAddress:Port Forward Weight ActiveConn InActConn
TCP  0A600001:01BB rr
  -> AC110002:1F90      Masq    1      0          0
"""
EMPTY_IPVS_TABLE = "\n".join(IPVS_TABLE.splitlines()[:3]) + "\n"


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"pfk-{secrets.token_hex(3)}"
    wiring.create(name, loopback_up=False)
    try:
        yield name
    finally:
        wiring.remove(name)


def test_a_namespace_without_ipvs_shows_no_sign(netns: str, tmp_path: Path) -> None:
    proc = tmp_path / "ip_vs"
    proc.write_text(EMPTY_IPVS_TABLE)
    with inside(netns):
        assert ipvs_signs(str(proc)) == []
        assert ipvs_signs(str(tmp_path / "absent")) == []


def test_kube_proxys_interface_and_virtual_services_are_each_a_sign(
    netns: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    proc = tmp_path / "ip_vs"
    proc.write_text(IPVS_TABLE)
    with inside(netns):
        assert ipvs_signs(str(proc)) == [f"1 IPVS virtual services in {proc}"]
        # kube-proxy makes a dummy interface; any link of that name is the sign (this kernel
        # has no dummy links, a veth stands in)
        subprocess.run(
            ["ip", "link", "add", IPVS_INTERFACE, "type", "veth", "peer", "name", "pfk-peer"], check=True
        )
        with caplog.at_level(logging.WARNING, logger="agent.node.kubeproxy"):
            signs = warn_if_ipvs(str(tmp_path / "absent"))
    assert signs == [f"interface {IPVS_INTERFACE}"]
    assert "IPVS mode" in caplog.text and "ClusterIP" in caplog.text
