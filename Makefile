# rayrec: `make demo` and `make test` set up .venv themselves (torch pinned by constraints.txt).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

export RAY_USAGE_STATS_ENABLED := 0
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install test test-e2e test-unit lint demo bench-prepare bench-train bench-serve bench-quality clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# Two tiers: `make test` (lint, unit tests, then the fast integration tests on one shared local Ray) and
# `make test-e2e` (the tests marked e2e).
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -p no:cacheprovider --timeout=900 --durations=15 -m "not e2e" $(PYTEST_ARGS) tests/unit tests/integration

test-e2e: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider --timeout=1800 --durations=15 -m e2e $(PYTEST_ARGS) tests

test-unit: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/unit

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

demo: $(STAMP)
	$(BIN)/rec-train demo $(if $(DATA),--data $(DATA)) $(if $(OUT),--output $(OUT))

bench-prepare: $(STAMP)
	$(BIN)/python benchmarks/prepare_throughput.py

bench-train: $(STAMP)
	$(BIN)/python benchmarks/train_throughput.py

bench-serve: $(STAMP)
	$(BIN)/python benchmarks/serve_load.py

bench-quality: $(STAMP)
	$(BIN)/python benchmarks/quality.py ../shared/data/ml-1m

clean:
	rm -rf $(VENV) demo_out runs
