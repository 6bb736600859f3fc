# Two commands on a fresh clone: `make demo` and `make test` (each creates .venv on first use).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch keeps CI and laptops off the multi-GB CUDA wheel. GPU users: `make TORCH=torch ...`
# or install their own torch into .venv first (an installed torch is kept).
TORCH ?= torch==2.13.0
PYTEST_WORKERS ?= 2

.PHONY: venv test test-gpu demo bench inspect clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test,gpu]"
	touch $@

test: venv
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) tests

# On a machine with a CUDA (or ROCm) GPU: the kernel, contract and parity tests, compiled for the device.
test-gpu: venv
	$(PY) -m pytest -q -m cuda tests

demo: venv
	$(PY) -m c2f train

bench: venv
	$(PY) -m bench.report --out results

# Compiles every kernel plan for every target without a GPU (`make inspect ARGS="--arch sm_86 --json out.json"`).
inspect: venv
	$(PY) -m c2f.kernels.inspect $(ARGS)

clean:
	rm -rf $(VENV) results .pytest_cache .benchmarks
