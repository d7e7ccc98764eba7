"""Benchmarks: each module measures one thing and reports ratios/medians measured in one run.

`python -m bench` (`make bench`, as root) runs every module with a `run() -> dict` and collects
the results into bench/out/results.json; `python -m bench.report` renders bench/out/RESULTS.md.
With `--publish` both write the tracked bench/results.json and bench/RESULTS.md instead, the
figures docs/performance.md cites. Each module also runs alone: `python -m bench.<name>` prints
its JSON.

The node-level benchmarks (datapath, propagation, coldstart, footprint) build their own network
namespaces named `pfbench-*` (bench/_netlab.py) and remove them afterwards. Knobs, as environment
variables: BENCH_QUICK=1 (shorter runs, for a smoke test), BENCH_DATAPLANES=bpf,iptables (which
dataplanes to measure), BENCH_REPETITIONS=N (datapath: more repetitions on a noisy day).
"""
