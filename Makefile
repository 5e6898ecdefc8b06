# Newcomer entry points: `make run` sets up and runs the ETL on data/ with the embedded
# PostgreSQL; `make test` runs the whole suite. VENV and PYTHON can be overridden.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup run test test-all lint bench serve clean

setup: $(BIN)/experiment-etl

$(BIN)/experiment-etl: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	@touch $@

run: setup
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
