# The two commands a new user needs: `make demo` (the bookinfo demo on a simulated node) and
# `make test` (lint, types, layering, then every test tier). Both bootstrap by themselves.
PY := .venv/bin/python

.PHONY: bootstrap demo test lint unit privileged e2e bench clean

bootstrap:
	bash scripts/bootstrap.sh

demo: bootstrap
	$(PY) -m agent.cli demo

lint: bootstrap
	.venv/bin/ruff check agent tests bench
	.venv/bin/mypy
	.venv/bin/lint-imports

# --durations: the slowest tests are listed, to keep the suite well inside CI's time limit
test: lint
	$(PY) -m pytest -q --durations=15 tests

unit: bootstrap
	$(PY) -m pytest -q tests/unit

privileged: bootstrap
	$(PY) -m pytest -q tests/privileged

e2e: bootstrap
	$(PY) -m pytest -q tests/e2e

bench: bootstrap
	$(PY) -m bench; status=$$?; $(PY) -m bench.report; exit $$status

clean:
	$(PY) -m agent.cli lab down || true
	rm -rf .venv build *.egg-info
