# `make test` and `make demo` work on a fresh clone: they build .venv first.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test lint demo clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PY) >/dev/null 2>&1 || { echo "need $(PY) on PATH"; exit 2; }
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

lint: venv
	$(BIN)/ruff check src tests bench

test: venv lint
	$(BIN)/pytest -q

demo: venv
	$(BIN)/certfleet quickstart --dir demo-data

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info src/*.egg-info
