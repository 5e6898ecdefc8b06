# Newcomer entry points: `make run` sets up and runs the ETL on data/ with the embedded
# PostgreSQL; `make test` runs the whole suite. VENV and PYTHON can be overridden.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup bytecode run test test-all lint bench serve clean

setup: $(BIN)/experiment-etl

$(BIN)/experiment-etl: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	$(MAKE) --no-print-directory bytecode
	@touch $@

# pip compiles what it installs, but an editable install leaves service/ as source: where
# PYTHONDONTWRITEBYTECODE is set (as in many CI and container environments), every process
# then compiles the package again (~45 ms of the CLI's start-up, ~30 ms of each worker's).
bytecode:
	$(BIN)/python -m compileall -q service

run: setup bytecode
	$(BIN)/experiment-etl run data
	$(BIN)/experiment-etl show

test: setup
	$(BIN)/pytest

test-all: setup
	$(BIN)/pytest -m ''

lint: setup
	$(BIN)/ruff check service tests
	$(BIN)/ruff format --check service tests
	$(BIN)/mypy
	PATH="$(CURDIR)/$(BIN):$$PATH" .ci/static-checks

bench: setup
	$(BIN)/experiment-etl bench

serve: setup
	$(BIN)/experiment-etl serve

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache .hypothesis
