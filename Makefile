# `make demo` runs the main job, `make test` runs lint and every test (slow ones included).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test test-fast lint docs bench fuzz clean

# CPU=1 takes torch and torchvision from PyTorch's CPU-only wheel index first (under 1 GB instead of a 5.8 GB
# CUDA build); the rest comes from PyPI as usual.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(if $(CPU),$(BIN)/pip install -q torch torchvision --index-url $(TORCH_CPU_INDEX))
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/resnet-surgery inspect resnet50
	$(BIN)/resnet-surgery run resnet50 --to v1 --out runs/r50 --force

test: $(BIN)/.installed lint docs
	$(BIN)/pytest -q -n 2 --durations=15

test-fast: $(BIN)/.installed
	$(BIN)/pytest -q -n 2 -m "not slow"

# The long fuzz profile (tests/test_fuzz.py): about a thousand cases per input instead of a dozen; its counts,
# failures and machine go to benchmarks/results/fuzz.json.
fuzz: $(BIN)/.installed
	$(BIN)/python benchmarks/fuzz_run.py --profile long

lint: $(BIN)/.installed
	$(BIN)/ruff check .

# The manual (docs/, mkdocs.yml) as a site in site/: --strict fails on a broken link or a docstring griffe cannot read.
docs: $(BIN)/.installed
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

bench: $(BIN)/.installed
	$(BIN)/python benchmarks/bench_trace.py
	$(BIN)/python benchmarks/bench_latency.py

clean:
	rm -rf $(VENV) .cache runs site
