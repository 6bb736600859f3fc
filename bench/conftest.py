"""Fixtures shared by the bench cases. The helpers themselves live in ``bench.common``.

``bench/pytest.ini`` makes pytest collect ``bench_*.py`` (``python_files``); the project's own pytest
configuration (``pyproject.toml``, ``testpaths = ["tests"]``) never collects them.
"""
import os

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import json  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from bench import machine  # noqa: E402
from bench.common import bench_device, default_rounds, quick  # noqa: E402

# On a shared 2-core machine two intra-op threads wait on each other whenever another process holds a
# core; ``C2F_BENCH_THREADS=1`` (``python -m bench.report --threads 1``) trades that noise for one core.
if os.environ.get("C2F_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["C2F_BENCH_THREADS"]))


@pytest.fixture(scope="session")
def device() -> torch.device:
    """CUDA when present (the report names the GPU), else CPU."""
    return bench_device()


@pytest.fixture(scope="session")
def quick_mode() -> bool:
    return quick()


@pytest.fixture(scope="session")
def rounds() -> int:
    return default_rounds()


@pytest.fixture(scope="session", autouse=True)
def _gemm_reference(device):
    """The yardstick GEMM, timed once per process before any case, with the cases' threads."""
    return machine.gemm_reference(str(device), "float32")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_runtest_teardown(item):
    """With ``C2F_BENCH_STREAM=path``, appends each finished case to a JSON-lines file, so a run cut off
    by the report's time budget keeps the cases it finished (pytest-benchmark writes its JSON at the end)."""
    path = os.environ.get("C2F_BENCH_STREAM")
    fixture = getattr(item, "funcargs", {}).get("benchmark")
    stats = getattr(fixture, "stats", None)
    if not path or stats is None:
        return
    with open(path, "a") as f:
        f.write(json.dumps(stats.as_dict(include_data=False, stats=True, flat=False), default=str) + "\n")
