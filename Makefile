# `make demo` and `make test` each set up their own virtual environment on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# torch is pinned so that set-up installs the CPU build this project is tested with.
TORCH ?= torch==2.13.0

.PHONY: install demo test test-fast lint format bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]" "$(TORCH)"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/lrq demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint
	$(BIN)/pytest

test-fast: $(STAMP)
	$(BIN)/pytest tests/unit

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(STAMP)
	$(BIN)/python -m benchmarks.bench_fused
	$(BIN)/python -m benchmarks.bench_engines
	$(BIN)/python -m benchmarks.bench_checkpoints
	$(BIN)/python -m benchmarks.bench_queue
	$(BIN)/python -m benchmarks.bench_db
	$(BIN)/python -m benchmarks.bench_startup
	$(BIN)/python -m benchmarks.bench_broker
	$(BIN)/python -m benchmarks.bench_pack --queue

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
