# Two commands on a fresh clone: `make demo` and `make test` (each creates .venv on first use).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch keeps CI and laptops off the multi-GB CUDA wheel. GPU users: `make TORCH=torch ...`
# or install their own torch into .venv first (an installed torch is kept).
TORCH ?= torch==2.13.0
# What the tests need: the test extra (pytest, plots, extract, safetensors) and triton for the interpreter tests.
EXTRAS ?= test,triton
PYTEST_WORKERS ?= 2
ARGS ?=

.PHONY: venv test test-gpu demo bench inspect clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip uninstall -q -y c2f 2>/dev/null || true   # the distribution's old name
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

test: venv
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) tests $(ARGS)

# On a machine with a CUDA (or ROCm) GPU: the kernel, contract and parity tests, compiled for the device.
test-gpu: venv
	$(PY) -m pytest -q -m cuda tests

demo: venv
	$(PY) -m c2f train $(ARGS)

bench: venv
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) -m bench.report --out results $(ARGS)

# Compiles every kernel plan for every target without a GPU (`make inspect ARGS="--arch sm_86 --json out.json"`);
# results are kept per compile in ~/.cache/c2f/inspect (ARGS=--no-cache compiles everything).
inspect: venv
	$(PY) -m c2f.kernels.inspect $(ARGS)

clean:
	rm -rf $(VENV) results .pytest_cache .benchmarks
