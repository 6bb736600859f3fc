"""Kernels run on CPU under the Triton interpreter: the flag must be set before they are decorated."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
# The interpreter runs each tl.dot as a small numpy matmul: threading those costs far more than it
# gains (about 30 ms vs 0.02 ms for [64, 256] x [256, 64] on 2 cores). Set before numpy loads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)  # one thread per xdist worker: the workers already fill the cores


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
