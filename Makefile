# renderwatch: `make demo` and `make test` on a fresh clone need only Python 3.11.
# Every target first brings .venv in line with uv.lock (rerun only when the lock or
# pyproject.toml change); uv itself is bootstrapped into .venv-tools when it is not
# on PATH.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3.11
UV_VERSION := 0.13.9
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.synced
UV := $(shell command -v uv 2>/dev/null || echo .venv-tools/bin/uv)

.PHONY: help venv lint test test-failover demo up bench fuzz

help:
	@echo "make demo   run a short demo of the whole flow"
	@echo "make test   lint, then every test suite (unit, integration, e2e, faults)"
	@echo "make test-failover   the slow Redis Sentinel/Cluster failover runs"
	@echo "make lint   ruff check, ruff format --check, mypy"
	@echo "make up     migrate, then run api, worker, beat and flower in the foreground"
	@echo "make bench  run the benchmark"
	@echo "make fuzz   the cache model suite with a long randomized budget (MODEL_EXAMPLES)"

.venv-tools/bin/uv:
	$(PYTHON) -m venv .venv-tools
	.venv-tools/bin/pip install --quiet uv==$(UV_VERSION)

$(STAMP): uv.lock pyproject.toml | $(UV)
	$(UV) sync --frozen --python $(PYTHON)
	touch $@

venv: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# pytest exits 5 when it collected no test: that fails this target like any failure.
# The slow failover runs (Redis nodes killed under load) are `make test-failover`.
test: lint
	$(BIN)/pytest -p no:cacheprovider -m "not failover" --durations=25

test-failover: $(STAMP)
	$(BIN)/pytest -p no:cacheprovider -m failover

demo: $(STAMP)
	$(BIN)/renderwatch demo

# `renderwatch up` runs the compose file's one-shot `migrate` before the services.
up: $(STAMP)
	$(BIN)/renderwatch up

bench: $(STAMP)
	@if [ -f bench/__main__.py ]; then \
		$(BIN)/python -m bench; \
	else \
		echo "bench: not yet (bench/__main__.py does not exist)"; \
	fi

# The cache's Hypothesis model (tests/model/) with a long, randomized budget.
fuzz: $(STAMP)
	MODEL_RANDOM=1 MODEL_EXAMPLES=$${MODEL_EXAMPLES:-5000} MODEL_STEPS=$${MODEL_STEPS:-60} \
		$(BIN)/pytest -p no:cacheprovider -m model tests/model -x
