"""Part-wise mixup, forward + backward: fused (``c2f.part_mixup``) against the reference, same inputs, one run.

``.venv/bin/python -m pytest bench/bench_part_mixup.py --benchmark-only``

- ``part_mixup_inplace``: ``part_mixup_`` vs ``reference.part_mixup``. Goal: peak extra live bytes at most
  5% of ``B*P*C*4`` and at least 2x faster. "Extra" is the peak beyond the ``[B, P, C]`` gradient of the
  parts that any implementation must return (``x.grad``); the upstream gradient is the caller's, so the
  fused backward copies it once and mixes that copy in place into ``x.grad``.
- ``part_mixup_pool``: ``part_mixup_pool`` vs ``reference.part_mixup(...).mean(-2)`` for K = 1, 4, 32.
  Goals: fused peak at K=32 at most 1.25x the fused peak at K=1; at K=4 at least 3x faster.

Each case records both implementations' peak bytes and median times and their ratios in ``extra_info``.
``C2F_BENCH_THREADS=1`` pins torch to one thread for these cases: on a shared, loaded 2-core machine
two OpenMP threads wait on each other for milliseconds per op, which swamps every ratio.
"""
from __future__ import annotations

import os
import statistics
import time

import pytest
import torch

from bench import algebra
from bench.common import bench_device, record, synchronize, zero_grads
from bench.memtrack import peak_live_bytes
from c2f import reference as ref
from c2f.part_mixup import part_mixup_, part_mixup_pool

B, P, C = 16, 312, 2048
K_VALUES = (1, 4, 32)
RATIO_ROUNDS = 3          # rounds behind the median times of the ratios (the timed rounds are record's)
_RATIOS: dict = {}        # (op, K) -> (peaks, seconds) of both impls: measured once, shared by both impl cases


@pytest.fixture(autouse=True)
def _threads():
    before = torch.get_num_threads()
    if os.environ.get("C2F_BENCH_THREADS"):
        torch.set_num_threads(int(os.environ["C2F_BENCH_THREADS"]))
    yield
    torch.set_num_threads(before)


def _inputs(device, k=None):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, P, C, generator=g).to(device).requires_grad_()
    perm = torch.arange(B - 1, -1, -1, device=device)
    shape = (B, P) if k is None else (k, B, P)
    lam = torch.rand(shape[:-1] + (1,), generator=g)
    mask = (torch.rand(shape, generator=g) < lam).float().to(device)
    grad = torch.randn(shape[:-1] + (P, C) if k is None else (k, B, C), generator=g).to(device)
    return x, perm, mask, grad


def _inplace_step(impl, x, perm, mask, grad):
    """(step, setup): setup makes a fresh non-leaf copy of x to mix in place, outside the timing."""
    state = {}

    def setup():
        zero_grads(x)
        state["parts"] = x.detach().clone().requires_grad_() if impl == "reference" else x.clone()

    def fused():
        part_mixup_(state["parts"], perm, mask).backward(grad)

    def reference():
        ref.part_mixup(state["parts"], perm, mask).backward(grad)

    return (fused if impl == "fused" else reference), setup


def _pool_step(impl, x, perm, mask, grad):
    def fused():
        part_mixup_pool(x, perm, mask).backward(grad)

    def reference():
        ref.part_mixup(x, perm, mask).mean(-2).backward(grad)

    return (fused if impl == "fused" else reference), (lambda: zero_grads(x))


def _measure(step, setup, device):
    """(peak live bytes of one step, median seconds of RATIO_ROUNDS steps after a warmup)."""
    setup()
    peak = peak_live_bytes(step, device)
    times = []
    for i in range(RATIO_ROUNDS + 1):
        setup()
        start = time.perf_counter()
        step()
        synchronize(device)
        if i:
            times.append(time.perf_counter() - start)
    return peak, statistics.median(times)


def _both(key, make_step, device):
    """({impl: peak bytes}, {impl: median seconds}) of fused and reference, measured once per key."""
    if key not in _RATIOS:
        peak, secs = {}, {}
        for name in ("fused", "reference"):
            peak[name], secs[name] = _measure(*make_step(name), device)
        _RATIOS[key] = peak, secs
    return _RATIOS[key]


@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_part_mixup_inplace(benchmark, impl):
    device = bench_device()
    inputs = _inputs(device)
    grad_bytes = B * P * C * 4
    peak, secs = _both(("inplace", None), lambda name: _inplace_step(name, *inputs), device)
    extra = {
        "grad_bytes": grad_bytes,
        "peak_fused": peak["fused"], "peak_reference": peak["reference"],
        "extra_fused": peak["fused"] - grad_bytes, "extra_reference": peak["reference"] - grad_bytes,
        "extra_fused_fraction": (peak["fused"] - grad_bytes) / grad_bytes,
        "median_s_fused": secs["fused"], "median_s_reference": secs["reference"],
        "speedup": secs["reference"] / secs["fused"],
        "goal_met": (peak["fused"] - grad_bytes) <= 0.05 * grad_bytes and secs["reference"] >= 2 * secs["fused"],
    }
    step, setup = _inplace_step(impl, *inputs)
    record(benchmark, step, name="part_mixup_inplace", impl=impl, device=device, dtype=torch.float32,
           shapes={"parts": [B, P, C], "mask": [B, P]}, params={"B": B}, setup=setup, extra=extra)


@pytest.mark.parametrize("k", K_VALUES)
@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_part_mixup_pool(benchmark, impl, k):
    device = bench_device()
    inputs = _inputs(device, k)
    peak, secs = _both(("pool", k), lambda name: _pool_step(name, *inputs), device)
    step_k1, setup_k1 = _pool_step("fused", *_inputs(device, 1))
    setup_k1()
    peak_k1 = peak_live_bytes(step_k1, device)
    extra = {
        "peak_fused": peak["fused"], "peak_reference": peak["reference"], "peak_fused_k1": peak_k1,
        "peak_ratio_vs_k1": peak["fused"] / peak_k1,
        "memory_saving": peak["reference"] / peak["fused"],
        "median_s_fused": secs["fused"], "median_s_reference": secs["reference"],
        "speedup": secs["reference"] / secs["fused"],
    }
    if k == 32:
        extra["goal_met"] = peak["fused"] <= 1.25 * peak_k1
    if k == 4:
        extra["goal_met"] = secs["reference"] >= 3 * secs["fused"]
    step, setup = _pool_step(impl, *inputs)
    record(benchmark, step, name="part_mixup_pool", impl=impl, device=device, dtype=torch.float32,
           shapes={"parts": [B, P, C], "mask": [k, B, P]}, params={"B": B, "K": k}, sweep="K",
           setup=setup, rounds=3 if (impl == "reference" and k == 32) else None, extra=extra,
           minimal=algebra.mixup_pool(B, P, C, k))
