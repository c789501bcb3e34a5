# Two commands for a new user: `make serve` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install serve test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

serve: install
	$(BIN)/python -m serving.main $(SERVE_ARGS)

test: install
	$(BIN)/python -m pytest -q $(TEST_ARGS)

lint: install
	$(BIN)/ruff check .

bench: install
	$(BIN)/python benchmarks/serving.py

clean:
	rm -rf $(VENV)
