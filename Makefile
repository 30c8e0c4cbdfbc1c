# Quick start: `make demo` (set up, convert the default mechanism) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test bench bench-export bench-precision clean

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
	$(BIN)/ruff check qcexport runtimes tests scripts
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python scripts/bench.py

bench-export: $(STAMP)
	$(BIN)/python scripts/bench_export.py

bench-precision: $(STAMP)
	$(BIN)/python scripts/bench_precision.py

clean:
	rm -rf $(VENV) out .pytest_cache
