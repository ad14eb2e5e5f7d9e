# Ferry — the two commands a newcomer runs: `make setup`, then `make test`.
SHELL := /bin/bash
VENV  ?= .venv
PY    := $(VENV)/bin/python
export PATH := $(abspath $(VENV))/bin:/usr/local/sbin:$(PATH)

.PHONY: setup test test-middle lint typecheck workloads schemas demo demo-minecraft chaos chaos-cell bench bench-db clean

## setup: install everything (apt packages, CRIU from source, venv, pycriu, nats-server). Idempotent.
setup:
	bash deploy/setup/setup.sh

## test: lint, type check and the whole suite (real CRIU, runc and nats-server; needs root).
test: lint typecheck workloads
	$(PY) -m pytest -m "not long"

## test-middle: components against a real nats-server started per test (no root, < 1 min).
test-middle:
	$(PY) -m pytest tests/middle

lint:
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck:
	$(VENV)/bin/mypy

## demo: a stateful server moves h1 -> h2 -> h1 while a client talks to it.
demo: workloads
	$(PY) -m deploy.demo

## demo-minecraft: a flying-squid server moves to another network segment and back while
## mineflayer bots play; prints per bot: connected, longest tick gap, chats, blocks kept.
demo-minecraft:
	$(PY) -m deploy.minecraft.play --bots 4 --json bench/minecraft.json

## chaos: 433 cells (strategy x fault x step x when), directions alternating (~70 min); every
## cell gets a verdict, the run goes to the end and fails on any lost/two-copies/misplaced cell.
## First the tests marked `long` (minutes each), which `make test` leaves to it.
chaos: workloads
	$(PY) -m pytest -m long
	$(PY) -m deploy.chaos --repeat 1 --json bench/chaos.json

## chaos-cell: one cell, REPEAT times in a row (the labels: python -m deploy.chaos --list).
CELL ?= kill[transfer]:stop_destination:after
REPEAT ?= 20
chaos-cell: workloads
	$(PY) -m deploy.chaos --cell '$(CELL)' --repeat $(REPEAT) --json bench/chaos-cell.json

## schemas: export JSON Schema and the AsyncAPI document after changing schemas/.
schemas:
	$(PY) -m schemas.export

## bench: migrate 64/512/2048 MiB dirtying containers per strategy, 3 samples alternating with
## a hand-run baseline, TCP/push/UDP clients on them; nginx under wrk; the Minecraft demo
## (quick: make bench BENCH_ARGS="--sizes 64 --samples 1 --no-minecraft").
bench: workloads
	$(PY) -m deploy.bench.run --json bench/results.json --table bench/results-table.txt $(BENCH_ARGS)

## bench-db: MariaDB with its data on a volume moved under sysbench, alternating whole-file
## and changed-block deltas after the freeze (~5 min); bench/database.json and -table.txt.
bench-db: workloads
	$(PY) -m deploy.bench.database --json bench/database.json --table bench/database-table.txt $(BENCH_ARGS)

## workloads: the small static programs the tests run inside containers.
workloads: build/memapp build/dirtyapp build/holdapp

build/memapp: tests/workloads/memapp.c
	@mkdir -p build
	gcc -O2 -static -Wall -Wextra -o $@ $<

build/dirtyapp: tests/workloads/dirtyapp.c
	@mkdir -p build
	gcc -O2 -static -Wall -Wextra -o $@ $<

build/holdapp: tests/workloads/holdapp.c
	@mkdir -p build
	gcc -O2 -static -Wall -Wextra -o $@ $<

clean:
	rm -rf build .mypy_cache .ruff_cache .pytest_cache
