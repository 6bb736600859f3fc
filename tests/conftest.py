"""Kernel tests run compiled on a GPU when there is one, else on CPU under the Triton interpreter.

The interpreter flag must be set before the kernels are decorated (their module's first import), so it
is decided here, once, from ``torch.cuda.is_available()``. Kernel tests take the ``device`` fixture
("cuda" or "cpu") and are marked ``cuda``: ``make test-gpu`` runs exactly those on the GPU.
"""
import os

# The interpreter runs each tl.dot as a small numpy matmul: threading those costs far more than it
# gains (about 30 ms vs 0.02 ms for [64, 256] x [256, 64] on 2 cores). Set before numpy loads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)  # one thread per xdist worker: the workers already fill the cores


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def device() -> str:
    """Where kernel tests put their tensors: the GPU when there is one, else the CPU (interpreter)."""
    return "cuda" if CUDA else "cpu"
