# Two commands for a fresh machine: `make demo` and `make test`.
# Both build .venv in the repo root from pyproject.toml (only when it changed).

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test demo clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: venv
	$(BIN)/python -m pytest tests

demo: venv
	$(BIN)/python -m bincounter.demo

clean:
	rm -rf $(VENV) demo-output .pytest_cache
