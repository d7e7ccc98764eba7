"""Flow-log records and rate limit; `podfence agent` usage errors (exit 2, no silent plaintext)."""

from __future__ import annotations

import json
import logging

import pytest

from agent.cli import main
from agent.dataplane.bpf.telemetry import DenyEvent
from agent.logs import JsonFormatter
from agent.node.build import bpffs_mount_of
from agent.node.flowlog import FlowLogger, TokenBucket

Event = DenyEvent  # what the bpf dataplane reports


EVENT = Event("ns/web", "ingress", 6, "10.0.0.9", "10.0.0.5", 40000, 22, "policy")


class NoEventsDouble:
    def poll_events(self, timeout_ms: int) -> list[Event]:
        return []


def test_flow_record_is_structured(caplog):
    flows = FlowLogger(NoEventsDouble())
    with caplog.at_level(logging.INFO, logger="podfence.flow"):
        flows.handle(EVENT)
    (record,) = caplog.records
    entry = json.loads(JsonFormatter().format(record))
    assert entry["flow"] == {
        "pod": "ns/web",
        "direction": "ingress",
        "protocol": "TCP",
        "src": "10.0.0.9",
        "dst": "10.0.0.5",
        "sport": 40000,
        "dport": 22,
        "reason": "policy",
        "verdict": "denied",
    }
    assert "10.0.0.9:40000 -> 10.0.0.5:22" in entry["msg"]


def test_flow_log_is_rate_limited():
    now = [0.0]
    flows = FlowLogger(NoEventsDouble(), rate_per_s=10, burst=5, clock=lambda: now[0])
    for _ in range(100):
        flows.handle(EVENT)
    assert (flows.logged, flows.suppressed) == (5, 95)
    now[0] += 1.0  # one second refills 10 tokens, capped by the burst
    for _ in range(100):
        flows.handle(EVENT)
    assert flows.logged == 10


def test_token_bucket_refills_at_its_rate():
    now = [0.0]
    bucket = TokenBucket(rate_per_s=2, burst=1, clock=lambda: now[0])
    assert bucket.take() and not bucket.take()
    now[0] += 0.5
    assert bucket.take() and not bucket.take()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["agent", "--node", "n1", "--control", "127.0.0.1:1"], "or --insecure"),
        (["agent", "--node", "n1", "--control", "127.0.0.1:1", "--tls-cert", "c.pem"], "or --insecure"),
        (
            ["agent", "--node", "n1", "--control", "127.0.0.1:1", "--insecure", "--tls-ca", "ca.pem"],
            "exclude each other",
        ),
        (["agent", "--node", "n1", "--control", "nohostport", "--insecure"], "HOST:PORT"),
        (["agent", "--node", "n1", "--control", "127.0.0.1:1,nohost", "--insecure"], "HOST:PORT,HOST:PORT"),
        (
            ["agent", "--node", "n1", "--control", "127.0.0.1:1", "--insecure", "--hook-check-interval", "0"],
            "--hook-check-interval must be 0.1 to 3600",
        ),
        (
            ["agent", "--node", "n1", "--control", "127.0.0.1:1", "--insecure", "--hook-check-interval=nan"],
            "--hook-check-interval must be 0.1 to 3600",
        ),
    ],
)
def test_bad_usage_exits_2(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_missing_required_flag_exits_2():
    with pytest.raises(SystemExit) as exited:
        main(["agent", "--control", "127.0.0.1:1", "--insecure"])
    assert exited.value.code == 2


def test_unreadable_tls_material_exits_2(tmp_path, capsys):
    argv = ["agent", "--node", "n1", "--control", "127.0.0.1:1"]
    argv += [
        "--tls-cert",
        str(tmp_path / "c"),
        "--tls-key",
        str(tmp_path / "k"),
        "--tls-ca",
        str(tmp_path / "a"),
    ]
    assert main(argv) == 2
    assert "cannot read TLS material" in capsys.readouterr().err


MOUNTINFO = """\
22 1 0:21 / / rw,relatime shared:1 - ext4 /dev/vda1 rw
23 22 0:22 / /sys rw,nosuid shared:2 - sysfs sysfs rw
24 23 0:23 / /sys/fs/bpf rw,nosuid shared:3 - bpf bpf rw,mode=700
25 23 0:24 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw
"""


def test_bpffs_mount_found_for_paths_under_it_only(tmp_path):
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(MOUNTINFO)
    assert bpffs_mount_of("/sys/fs/bpf/podfence", str(mountinfo)) == "/sys/fs/bpf"
    assert bpffs_mount_of("/sys/fs/bpf", str(mountinfo)) == "/sys/fs/bpf"
    assert bpffs_mount_of("/sys/fs/bpfx/podfence", str(mountinfo)) is None
    assert bpffs_mount_of("/sys/fs/cgroup/x", str(mountinfo)) is None
    # `ip netns exec` remounts /sys: a later sysfs mount hides the bpffs under it.
    mountinfo.write_text(MOUNTINFO + "30 22 0:40 / /sys rw - sysfs sysfs rw\n")
    assert bpffs_mount_of("/sys/fs/bpf/podfence", str(mountinfo)) is None
