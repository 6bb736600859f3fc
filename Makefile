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
# The oldest supported pair (pyproject.toml's lower bounds; tests/test_packaging.py keeps them equal). From
# the index these are CUDA builds (about 4.7 GB with their NVIDIA libraries); they run on the CPU too.
# Triton before 3.7 interprets with int(1-element array), which numpy 2.4 refuses: numpy < 2.4 beside it.
COMPAT_VENV ?= .venv-compat
COMPAT_TORCH ?= torch==2.11.0
COMPAT_TRITON ?= triton==3.6.0
COMPAT_NUMPY ?= numpy<2.4

.PHONY: venv test lint test-compat test-gpu demo bench inspect clean

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

# pyflakes, pycodestyle, isort, bugbear and pyupgrade rules (pyproject.toml [tool.ruff]); .ci/run runs it first.
lint: venv
	$(PY) -m ruff check .

# The whole suite on the oldest supported torch and Triton, in a venv of its own.
test-compat: $(COMPAT_VENV)/.installed
	$(COMPAT_VENV)/bin/python -m pytest -q -n $(PYTEST_WORKERS) tests $(ARGS)

$(COMPAT_VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/python -m pip install -q --upgrade pip
	$(COMPAT_VENV)/bin/python -m pip uninstall -q -y c2f 2>/dev/null || true
	$(COMPAT_VENV)/bin/python -m pip install -q "$(COMPAT_TORCH)" "$(COMPAT_TRITON)" "$(COMPAT_NUMPY)" -e ".[$(EXTRAS)]"
	touch $@

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
	rm -rf $(VENV) $(COMPAT_VENV) results .pytest_cache .benchmarks
