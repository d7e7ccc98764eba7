"""The bpf dataplane's settings in one typed, validated object (each is a CLI flag and a
PODFENCE_* variable of the agent, see docs/settings.md); the build knobs derive from it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from agent.dataplane.bpf import loader
from agent.dataplane.bpf.egress_hook import EGRESS_HOOKS


@dataclass(frozen=True)
class BpfSettings:
    pin_dir: str = "/sys/fs/bpf/podfence"
    # traffic of pod interfaces no endpoint claims: "drop" or "allow"
    unknown_endpoints: str = "drop"
    # flows conntrack admitted when their policy changes: "keep" or "reset" (dataplane.py)
    established_on_change: str = "keep"
    egress_hook: str = "auto"  # where the egress verdict runs (egress_hook.py)
    # map sizes (entries); a pinned map keeps the size it was created with
    ct_max: int = 65536
    # conntrack entries one pod may hold (ctbound.py); None: a quarter of the map, so that four
    # flooding pods fill it, not one; 0: no bound
    flows_per_pod: int | None = None
    policy_max: int = 65536
    ipcache_max: int = 65536
    cidr_max: int = 16384
    endpoints_max: int = 1024
    node_ips_max: int = 64
    frag_max: int = 8192
    event_rate: int = 1000  # flow records per second and CPU (the rest only counted)
    flow_deny_interval: int = 5  # seconds: a denied flow's packets make one record per interval
    netns: str | None = None  # where the pod interfaces live (None: the agent's namespace)
    state_file: str | None = None  # None: /run/podfence/<pin dir name>.bpf-state.json
    bench_defines: tuple[str, ...] = ()  # benchmark builds only (loader.BENCH_DEFINES)

    def __post_init__(self) -> None:
        if self.egress_hook not in EGRESS_HOOKS:
            raise ValueError(f"egress_hook must be one of {', '.join(EGRESS_HOOKS)}")
        if self.unknown_endpoints not in ("drop", "allow"):
            raise ValueError("unknown_endpoints must be 'drop' or 'allow'")
        if self.established_on_change not in ("keep", "reset"):
            raise ValueError("established_on_change must be 'keep' or 'reset'")
        if not 1 <= self.flow_deny_interval <= 3600:
            raise ValueError("flow_deny_interval must be 1 to 3600 seconds")
        if self.flows_per_pod is not None and not 0 <= self.flows_per_pod <= self.ct_max:
            raise ValueError("flows_per_pod must be between 0 (no bound) and ct_max")
        object.__setattr__(self, "pin_dir", self.pin_dir.rstrip("/"))

    @property
    def state_path(self) -> Path:
        return Path(self.state_file or f"/run/podfence/{Path(self.pin_dir).name}.bpf-state.json")

    def knobs(self) -> loader.BuildKnobs:
        return loader.BuildKnobs(
            pin_dir=self.pin_dir,
            unknown_allow=self.unknown_endpoints == "allow",
            ct_max=self.ct_max,
            policy_max=self.policy_max,
            ipcache_max=self.ipcache_max,
            cidr_max=self.cidr_max,
            endpoints_max=self.endpoints_max,
            node_ips_max=self.node_ips_max,
            frag_max=self.frag_max,
            event_rate=self.event_rate,
            flow_deny_interval=self.flow_deny_interval,
            tcp_needs_syn=self.established_on_change == "reset",
            ct_endpoint_max=self.ct_max // 4 if self.flows_per_pod is None else self.flows_per_pod,
            bench_defines=self.bench_defines,
        )
