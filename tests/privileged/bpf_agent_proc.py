"""A throwaway agent process for the restart tests: start a BpfDataplane, apply a pickled
NodeState, print "applied", then wait to be killed (kill -9 included)."""

from __future__ import annotations

import pickle
import sys
import time

from agent.dataplane.bpf.dataplane import BpfDataplane
from agent.dataplane.bpf.settings import BpfSettings


def main(pin_dir: str, netns: str, state_file: str, node_state_pickle: str) -> None:
    with open(node_state_pickle, "rb") as handle:
        node_state = pickle.load(handle)
    plane = BpfDataplane(BpfSettings(pin_dir=pin_dir, netns=netns, state_file=state_file))
    plane.start()
    plane.apply(node_state)
    print("applied", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main(*sys.argv[1:5])
