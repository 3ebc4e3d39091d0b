# `make demo` runs the main job, `make test` runs lint and every test (slow ones included).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test test-fast lint bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/resnet-surgery inspect resnet50
	$(BIN)/resnet-surgery run resnet50 --to v1 --out runs/r50 --force

test: $(BIN)/.installed lint
	$(BIN)/pytest -q -n 2 --durations=15

test-fast: $(BIN)/.installed
	$(BIN)/pytest -q -n 2 -m "not slow"

lint: $(BIN)/.installed
	$(BIN)/ruff check .

bench: $(BIN)/.installed
	$(BIN)/python benchmarks/bench_trace.py
	$(BIN)/python benchmarks/bench_latency.py

clean:
	rm -rf $(VENV) .cache runs
