# Ferry — the two commands a newcomer runs: `make setup`, then `make test`.
SHELL := /bin/bash
VENV  ?= .venv
PY    := $(VENV)/bin/python
export PATH := $(abspath $(VENV))/bin:/usr/local/sbin:$(PATH)

.PHONY: setup test lint typecheck unit lab-tests workloads clean

## setup: install everything (apt packages, CRIU from source, venv, pycriu, nats-server). Idempotent.
setup:
	bash deploy/setup/setup.sh

## test: lint, type check and the whole suite (real CRIU, runc and nats-server; needs root).
test: lint typecheck workloads
	$(PY) -m pytest

lint:
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck:
	$(VENV)/bin/mypy

## workloads: the small static programs the tests run inside containers.
workloads: build/memapp

build/memapp: tests/workloads/memapp.c
	@mkdir -p build
	gcc -O2 -static -Wall -Wextra -o $@ $<

clean:
	rm -rf build .mypy_cache .ruff_cache .pytest_cache
