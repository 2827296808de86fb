# fer_bench: `make quickstart` trains and evaluates on SynthFER; `make test` runs the whole suite.
# Both create .venv (python3 -m venv + pip install -e ".[dev]") when it is missing.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: quickstart test lint clean-runs

$(BIN)/ferbench: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q -e ".[dev]"
	@touch $(BIN)/ferbench

quickstart: $(BIN)/ferbench
	$(BIN)/ferbench train recipes/quickstart.yaml

test: $(BIN)/ferbench
	$(BIN)/python -m pytest -q tests

lint: $(BIN)/ferbench
	$(BIN)/ruff check fer_bench tests benchmarks tools
	$(BIN)/ruff format --check fer_bench tests benchmarks tools

clean-runs:
	rm -rf runs/quickstart
