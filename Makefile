# Quick start: `make demo` (set up, convert the default mechanism), `make test-fast` (the quick
# tier, under a minute: no model exports) and `make test` (everything: the CI gate).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-fast bench bench-export bench-precision clean

$(STAMP): pyproject.toml runtimes/pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e ./runtimes -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/qcexport list
	$(BIN)/qcexport convert qformer --preset tiny -o out/qformer-tiny

test: $(STAMP)
	$(BIN)/ruff check qcexport runtimes tests testsupport scripts
	$(BIN)/python -m pytest -q

# Tests marked `slow` (they export models or run engines for seconds) are left out.
test-fast: $(STAMP)
	$(BIN)/ruff check qcexport runtimes tests testsupport scripts
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(STAMP)
	$(BIN)/python scripts/bench.py

bench-export: $(STAMP)
	$(BIN)/python scripts/bench_export.py

bench-precision: $(STAMP)
	$(BIN)/python scripts/bench_precision.py

clean:
	rm -rf $(VENV) out .pytest_cache
