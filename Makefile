# The two commands a new user needs: `make demo` (the bookinfo demo on a simulated node) and
# `make test` (lint, types, layering, then every test tier). Both bootstrap by themselves.
PY := .venv/bin/python

.PHONY: bootstrap demo test lint unit privileged e2e adversarial fuzz bench bench-publish clean

bootstrap:
	bash scripts/bootstrap.sh

demo: bootstrap
	$(PY) -m agent.cli demo

lint: bootstrap
	.venv/bin/ruff check agent tests bench
	.venv/bin/mypy
	.venv/bin/lint-imports

# --durations: the slowest tests are listed, to keep the suite well inside CI's time limit.
# The unit tier is pure Python and CPU-bound: two workers (pytest-xdist). The other tiers share
# the kernel, the node lab and their probes' timeouts, so they run one test at a time, after it.
test: lint
	$(PY) -m pytest -q -n 2 --durations=15 tests/unit; unit=$$?; \
	$(PY) -m pytest -q --durations=15 tests --ignore=tests/unit; rest=$$?; \
	exit $$(( unit || rest ))

unit: bootstrap
	$(PY) -m pytest -q -n 2 tests/unit

privileged: bootstrap
	$(PY) -m pytest -q tests/privileged

e2e: bootstrap
	$(PY) -m pytest -q tests/e2e

# the attacker's tier (hostile frames on both dataplanes, routed and bridged; hostile input)
adversarial: bootstrap
	$(PY) -m pytest -q tests/adversarial

# the real-traffic differential fuzzer, long: PODFENCE_FUZZ_EXAMPLES random examples per lab
# (make test runs a fixed dozen per lab)
fuzz: bootstrap
	PODFENCE_FUZZ_EXAMPLES=$${PODFENCE_FUZZ_EXAMPLES:-500} $(PY) -m pytest -q tests/adversarial/test_fuzz.py

# Results are outputs, written to bench/out/ (untracked). bench-publish replaces the tracked
# bench/results.json and bench/RESULTS.md that docs/performance.md cites.
bench: bootstrap
	$(PY) -m bench; status=$$?; $(PY) -m bench.report; exit $$status

bench-publish: bootstrap
	$(PY) -m bench --publish; status=$$?; $(PY) -m bench.report --publish; exit $$status

clean:
	$(PY) -m agent.cli lab down || true
	rm -rf .venv build *.egg-info
