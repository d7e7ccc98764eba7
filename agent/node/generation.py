"""The enforced source generation, kept on disk across agent restarts.

A control replica that lags behind the source sends versions built from an older generation; the
agent refuses them while it enforces something newer (sync.py). That comparison needs the
generation the kernel enforces, and the kernel state outlives the agent process (pinned maps,
iptables chains), so the number must too: a restarted agent that started from 0 would accept the
lagging replica's first snapshot and roll the node's policy back. The file sits beside the
dataplane's state file under /run/podfence, which lives exactly as long as that kernel state.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

GENERATION_DIR = "/run/podfence"  # beside the dataplane state (build.generation_file)


def beside_state_file(state_file: Path) -> Path:
    """The generation file of a dataplane whose state file is `state_file` (bpf: named after the
    pin directory, so two agents with their own pins in one /run keep their own)."""
    return state_file.with_name(state_file.name.split(".", 1)[0] + ".enforced-generation")


def per_node(dataplane: str, node: str) -> Path:
    """The generation file of a dataplane without a state file of its own (iptables)."""
    return Path(GENERATION_DIR) / f"{dataplane}-{node}.enforced-generation"


def load_generation(path: Path | None) -> int:
    """The generation saved by a previous run; 0 (accept any) when there is none or it is unreadable."""
    if path is None:
        return 0
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return 0
    except OSError as exc:
        log.warning("cannot read the enforced source generation from %s: %s", path, exc)
        return 0
    if not text.isdigit():
        log.warning("ignoring %s: %r is not a source generation", path, text[:40])
        return 0
    generation = int(text)
    log.info("enforced source generation %d (from the previous run)", generation)
    return generation


def save_generation(path: Path | None, generation: int) -> None:
    """Write atomically (a crash leaves the old number or the new). A failure is logged, not
    raised: the kernel enforces the version already; only a later restart would lose the guard."""
    if path is None:
        return
    temporary = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary.write_text(f"{generation}\n")
        os.replace(temporary, path)
    except OSError as exc:
        log.warning("cannot save the enforced source generation to %s: %s", path, exc)
