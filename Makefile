# recsys-operator: `make demo` and `make test` each set up what they need first.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
export PATH := $(CURDIR)/.tools/bin:$(CURDIR)/$(VENV)/bin:$(PATH)
PYTEST_WORKERS ?= 2

.PHONY: help setup test lint typecheck crds demo bench clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

setup:  ## install system packages, the venv and the tools (idempotent)
	@bash scripts/setup.sh

lint: setup  ## ruff and mypy (packages, tests/ and benchmarks/)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	MYPY=$(CURDIR)/$(VENV)/bin/mypy bash scripts/typecheck.sh

typecheck: setup  ## mypy only (packages, tests/ and benchmarks/)
	MYPY=$(CURDIR)/$(VENV)/bin/mypy bash scripts/typecheck.sh

test: setup lint  ## set up, lint, then the whole test suite
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadgroup

crds: setup  ## regenerate crds/ from the API models
	$(VENV)/bin/recsys crds

demo: setup  ## set up, then run the continuous-learning loop locally (drift, retrain, gate, canary)
	$(VENV)/bin/recsys validate --local -f examples/demo.yaml
	$(VENV)/bin/recsys demo -f examples/demo.yaml

# Full runs, one after the other (tens of minutes in all; serving.py alone builds 1M-item
# indexes). `make bench BENCHMARKS="gateway stream_features"` runs some. Each script's
# output is kept in build/bench/NAME.txt; the figures worth keeping are recorded by hand
# in benchmarks/README.md, with the machine and its load (the tests run each `--quick`).
BENCHMARKS ?= stream_features gateway http_server operator_reconcile serving quality end_to_end event_codec
BENCH_ARGS_operator_reconcile ?= --systems 10

# One recipe line per benchmark, so a failing one stops the run and names itself.
define run_benchmark
	set -o pipefail; $(PY) benchmarks/$(1).py $(BENCH_ARGS_$(1)) 2>&1 | tee build/bench/$(1).txt

endef

bench: setup  ## run the benchmarks in full; output in build/bench/, results recorded in benchmarks/README.md
	@mkdir -p build/bench
	$(foreach b,$(BENCHMARKS),$(call run_benchmark,$(b)))
	@echo "outputs in build/bench/; record the figures in benchmarks/README.md, with the machine and its load"

clean:  ## remove build outputs (keeps .venv and .tools)
	rm -rf build .pytest_cache .mypy_cache .ruff_cache
