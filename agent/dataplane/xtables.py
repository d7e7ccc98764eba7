"""The one x_tables backend podfence writes rules with: legacy, for both dataplanes.

python-iptables (libiptc) drives the legacy x_tables interface only, so the iptables dataplane
must. The eBPF dataplane's xt_bpf egress hook (for kernels without netfilter links) uses the
same tools, so that one agent never writes into two backends and `iptables-legacy-save` shows
everything podfence put into x_tables. Rules of both backends see every packet (each registers
its own netfilter hooks), so a DROP of ours holds whichever backend kube-proxy or the host
firewall uses: an ACCEPT in the nft tables does not skip a legacy chain.

Releases before this module wrote the xt_bpf hook with Debian's default `iptables` (nft);
`STALE_BACKEND` names those tools so that the hook can remove what they left.
"""

from __future__ import annotations

IPTABLES = {4: "iptables-legacy", 6: "ip6tables-legacy"}
SAVE = {4: "iptables-legacy-save", 6: "ip6tables-legacy-save"}
RESTORE = {4: "iptables-legacy-restore", 6: "ip6tables-legacy-restore"}
STALE_BACKEND = {4: "iptables-nft", 6: "ip6tables-nft"}
