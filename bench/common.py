"""What every bench case shares: sweep sizes, quick mode, and ``record`` (time + memory + FLOPs in one call).

A case file looks like::

    from bench.common import B_SWEEP, record, sweep

    @pytest.mark.parametrize("B", sweep(B_SWEEP))
    @pytest.mark.parametrize("impl", ["fused", "reference"])
    def test_attention_step(benchmark, device, impl, B):
        ...build inputs and a closure `step` that runs forward + backward...
        record(benchmark, step, name="attention_step_h1", impl=impl, dtype=torch.float32,
               shapes={"x": [B, 2048, 14, 14]}, params={"B": B, "heads": 1}, sweep="B",
               forward=lambda: model(x))

``params`` identify the case (cases with equal ``name`` and ``params`` are compared across ``impl``);
``sweep`` names the param that the report plots on the x axis. ``impl`` is one of ``IMPLS``: c2f eager
("fused"), ``torch.compile`` of c2f ("fused_compiled"), ``c2f.reference`` ("reference") and
``torch.compile(reference)`` ("compiled"). A dtype axis puts ``amp`` ("off" or "bf16") in ``params`` and
runs the forward under ``autocast(device, amp)``.

Every measured case records, beside its times: peak live bytes, FLOPs and the aten ops of one
forward + backward (custom ops expanded, ``bench.memtrack.measure_step``), and the throughput of the
yardstick GEMM measured in the same process with the same threads (``bench.machine.gemm_reference``),
so the report can state each case's GEMM efficiency. On CUDA the rounds are timed with CUDA events.

Quick mode (``C2F_BENCH_QUICK=1``, set by ``python -m bench.report --quick``) thins sweeps and rounds
so the whole report stays within minutes on a 2-core CPU.
"""
from __future__ import annotations

import contextlib
import json
import os
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from . import machine
from .memtrack import (
    LiveTensorTracker,
    count_flops,
    cuda_kernel_launches,
    device_used_bytes,
    measure_step,
    profiler_peak_bytes,
    saved_tensor_bytes,
)

__all__ = ["B_SWEEP", "K_SWEEP", "IMPLS", "AMPS", "quick", "sweep", "default_rounds", "bench_device", "record",
           "zero_grads", "synchronize", "autocast", "failure_note", "head_inputs"]

# Sweeps of the report's plots: batch sizes up to a realistic training batch, mixup views up to 32.
B_SWEEP = (8, 16, 32, 64)
K_SWEEP = (1, 2, 4, 8, 16, 32)
IMPLS = ("fused", "fused_compiled", "reference", "compiled")
COMPILED_IMPLS = ("fused_compiled", "compiled")
AMPS = {"off": None, "bf16": torch.bfloat16}


def quick() -> bool:
    """True when the report asked for a short run (``C2F_BENCH_QUICK=1``)."""
    return os.environ.get("C2F_BENCH_QUICK", "0") == "1"


def sweep(values: Sequence[Any], quick_values: Sequence[Any] | None = None) -> list[Any]:
    """The sweep's values; in quick mode ``quick_values``, or the first, a middle and the last value."""
    values = list(values)
    if not quick():
        return values
    if quick_values is not None:
        return list(quick_values)
    if len(values) <= 3:
        return values
    return [values[0], values[len(values) // 2], values[-1]]


def default_rounds() -> int:
    """Timed rounds per case: the median of 5 (3 in quick mode) after a warmup (``record``)."""
    return 3 if quick() else 5


def bench_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device | str, amp: str = "off"):
    """The forward's context: ``torch.autocast(device.type, dtype=torch.bfloat16)`` for ``amp="bf16"``."""
    if amp not in AMPS:
        raise ValueError(f"amp must be one of {sorted(AMPS)}, got {amp!r}")
    if AMPS[amp] is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=AMPS[amp])


def head_inputs(b: int, c: int, hw: int, p: int, classes: int, k: int, device: torch.device) -> tuple:
    """``(x, attrs, perm, mask, targets)`` of a head step, seeded: a feature map, attribute labels, the
    flip pairing, K binary masks and the mixed class targets."""
    from c2f import reference
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(b, c, hw, hw, generator=gen).to(device)
    attrs = torch.rand(b, p, generator=gen).to(device)
    labels = torch.randint(0, classes, (b,), generator=gen).to(device)
    perm = torch.arange(b, device=device).flip(0)
    mask = (torch.rand(k, b, p, generator=gen) < 0.5).float().to(device)
    return x, attrs, perm, mask, reference.mix_targets(labels, perm, mask, classes)


def zero_grads(*objs: Any) -> None:
    """Drops ``.grad`` of modules' parameters and of tensors, so every round allocates its gradients anew."""
    for obj in objs:
        params: Iterable[torch.Tensor] = obj.parameters() if isinstance(obj, torch.nn.Module) else [obj]
        for p in params:
            p.grad = None


def _dtype_name(dtype: Any) -> str | None:
    if dtype is None:
        return None
    return str(dtype).replace("torch.", "")


def _note(entry: dict[str, Any]) -> None:
    """Appends a JSON line to ``C2F_BENCH_NOTES`` (set by the report): what a case could not measure."""
    path = os.environ.get("C2F_BENCH_NOTES")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(entry, default=str) + "\n")


def failure_note(name: str, impl: str, params: dict[str, Any], error: BaseException, what: str) -> str:
    """Records that a case could not run (``what``: e.g. "torch.compile", "bf16 autocast") so the report
    lists it beside the figures, and returns the one-line message (for ``pytest.xfail``)."""
    text = str(error).strip().splitlines()
    message = f"{what} failed: {type(error).__name__}: {text[0][:300] if text else ''}"
    _note({"case": name, "impl": impl, "params": params, "what": what, "error": message})
    return message


def _first_compiled_call(timed: Callable[[], None]) -> dict[str, Any]:
    """Times the first call of a compiled step (compilation plus one step) and counts Dynamo's graph breaks."""
    from torch._dynamo.utils import counters

    breaks = sum(counters["graph_break"].values())
    graphs = counters["stats"]["unique_graphs"]
    start = time.perf_counter()
    timed()
    return {"compile_s": time.perf_counter() - start,
            "graph_breaks": sum(counters["graph_break"].values()) - breaks,
            "graphs": counters["stats"]["unique_graphs"] - graphs}


def _yardstick_times(device: torch.device, info: dict[str, Any], key: str) -> list[float]:
    """Two timings of the case's yardstick GEMM (``key``: "gemm" or "gemm_amp"), already warm."""
    dtype = getattr(torch, info[f"{key}_dtype"])
    return machine.gemm_throughput(device, dtype, tuple(info[f"{key}_shape"]), rounds=2, warmup=False)["times"]


def record(benchmark, fn: Callable[[], Any], *, name: str, impl: str, device: torch.device | str | None = None,
           dtype: Any = None, amp: str = "off", shapes: dict[str, Any] | None = None,
           params: dict[str, Any] | None = None, sweep: str | None = None,
           forward: Callable[[], Any] | None = None, setup: Callable[[], None] | None = None,
           rounds: int | None = None, warmup: int | None = None, measure: bool = True,
           minimal: tuple[int, str] | None = None, extra: dict[str, Any] | None = None) -> None:
    """Times ``fn`` with ``benchmark.pedantic`` and stores its peak memory, FLOPs and ops in ``extra_info``.

    ``fn`` runs once untimed under the live-tensor tracker, the FLOP counter and the op counter (skip
    with ``measure=False`` when that one run is too slow). Compiled impls first run once plain: that
    call is the compile time (``compile_s``, with Dynamo's graph breaks), reported apart from the
    steady state; then memory through the profiler (CPU) or the allocator (CUDA) and FLOPs in an eager
    run, since dispatch modes turn Dynamo off. Then ``warmup`` untimed and ``rounds`` timed rounds
    (``warmup`` defaults to 1, and to 0 in quick mode when the measuring run already warmed the step up);
    ``setup`` (e.g. ``lambda: zero_grads(model)``) runs before each of them, outside the timing.
    ``forward``, if given, runs once more to count the bytes autograd saves for backward. ``amp`` labels
    a case whose ``fn`` runs its forward under ``autocast(device, amp)``. ``minimal``: ``(FLOPs, formula)``
    of the case's minimal algebra (``bench.algebra``), the count behind the report's "GEMM fraction
    (minimal)". ``extra`` adds anything else JSON-serialisable.
    """
    params = _checked_params(impl, amp, params, sweep)
    device = torch.device(device) if device is not None else bench_device()
    setup = setup or (lambda: None)
    timed, cuda_times = _timer(fn, device)
    info, yardsticks = _case_info(name=name, impl=impl, device=device, dtype=dtype, amp=amp, shapes=shapes,
                                  params=params, sweep=sweep, minimal=minimal)
    info.update(_measure(timed, setup, device, impl=impl, measure=measure, forward=forward))
    info.update(extra or {})
    benchmark.extra_info.update(info)
    benchmark.group = name + "".join(f" {k}={v}" for k, v in params.items())
    rounds = rounds or default_rounds()
    if warmup is None:
        warmup = 0 if quick() and measure else 1
    _time_rounds(benchmark, timed, setup, cuda_times, device, info, yardsticks, rounds=rounds, warmup=warmup)


def _checked_params(impl: str, amp: str, params: dict[str, Any] | None, sweep: str | None) -> dict[str, Any]:
    """A copy of the case's ``params``, after checking ``impl``, ``amp`` and that ``sweep`` names a param."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if amp not in AMPS:
        raise ValueError(f"amp must be one of {sorted(AMPS)}, got {amp!r}")
    params = dict(params or {})
    if sweep is not None and sweep not in params:
        raise ValueError(f"sweep={sweep!r} must name one of params {sorted(params)}")
    return params


def _timer(fn: Callable[[], Any], device: torch.device) -> tuple[Callable[[], None], list[float]]:
    """``(timed, cuda_times)``: ``timed()`` runs ``fn`` once; on CUDA it also appends the call's seconds,
    measured with CUDA events, to ``cuda_times`` (on the CPU pytest-benchmark's own clock times it)."""
    cuda_times: list[float] = []

    def timed() -> None:
        if device.type != "cuda":
            fn()
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        cuda_times.append(start.elapsed_time(end) / 1e3)

    return timed, cuda_times


def _case_info(*, name: str, impl: str, device: torch.device, dtype: Any, amp: str, shapes: dict[str, Any] | None,
               params: dict[str, Any], sweep: str | None,
               minimal: tuple[int, str] | None) -> tuple[dict[str, Any], dict[str, str]]:
    """``(info, yardsticks)``: the case's identity, its device and the session throughput of its
    yardstick GEMMs (``yardsticks``: key "gemm", and "gemm_amp" under autocast, to its dtype name)."""
    described = machine.describe(device)
    info: dict[str, Any] = {
        "case": name, "impl": impl, "device": described["label"], "device_kind": described["kind"],
        "isa": described["isa"], "dtype": _dtype_name(dtype), "amp": amp, "shapes": shapes or {}, "params": params,
        "sweep": sweep, "threads": torch.get_num_threads(), "quick": quick(),
    }
    yardsticks = {"gemm": "float32"} if amp == "off" else {"gemm": "float32", "gemm_amp": _dtype_name(AMPS[amp])}
    for key, dtype_name in yardsticks.items():
        session = machine.gemm_reference(str(device), dtype_name)
        info.update({f"{key}_shape": session["shape"], f"{key}_dtype": dtype_name,
                     f"{key}_session_flops_per_s": session["flops_per_s"]})
    if amp != "off":
        info["native_bf16"] = machine.native_bf16(device)
    if minimal is not None:
        info["minimal_flops"], info["minimal_formula"] = minimal
    return info, yardsticks


def _measure(timed: Callable[[], None], setup: Callable[[], None], device: torch.device, *, impl: str,
             measure: bool, forward: Callable[[], Any] | None) -> dict[str, Any]:
    """The untimed runs of a case: compile time (compiled impls), peak bytes, FLOPs and ops (``measure``),
    CUDA kernel launches, the device's used bytes and the bytes saved for backward (``forward``)."""
    info: dict[str, Any] = {}
    if impl in COMPILED_IMPLS:
        setup()
        info.update(_first_compiled_call(timed))
    if measure and impl in COMPILED_IMPLS:
        info.update(_measure_compiled(timed, setup, device))
    elif measure:
        setup()
        start = time.perf_counter()
        info.update(measure_step(timed, device))
        info["first_run_s"] = time.perf_counter() - start
        info["peak_method"] = "allocator" if device.type == "cuda" else "tracker"
    if measure and device.type == "cuda":
        setup()
        info["cuda_kernels"] = cuda_kernel_launches(timed)
    info["device_used_bytes"] = device_used_bytes(device)
    if forward is not None:
        setup()
        info["saved_bytes"] = saved_tensor_bytes(forward)
    return info


def _measure_compiled(timed: Callable[[], None], setup: Callable[[], None], device: torch.device) -> dict[str, Any]:
    """Peak bytes and FLOPs of a compiled step, in two runs. Any TorchDispatchMode (tracker, FLOP counter)
    makes Dynamo run the code eagerly: memory is measured without one (the CUDA allocator, or the profiler's
    allocator events on CPU), FLOPs in a second run."""
    info: dict[str, Any] = {}
    setup()
    start = time.perf_counter()
    if device.type == "cuda":
        with LiveTensorTracker(device) as tracker:
            timed()
        info["peak_bytes"] = tracker.peak_bytes
    else:
        info["peak_bytes"] = profiler_peak_bytes(timed)
    info["first_run_s"] = time.perf_counter() - start
    info["peak_method"] = "allocator" if device.type == "cuda" else "profiler"
    setup()
    info["flops"] = count_flops(timed)
    return info


def _time_rounds(benchmark, timed: Callable[[], None], setup: Callable[[], None], cuda_times: list[float],
                 device: torch.device, info: dict[str, Any], yardsticks: dict[str, str], *, rounds: int,
                 warmup: int) -> None:
    """Times ``rounds`` rounds after ``warmup`` with ``benchmark.pedantic``, between two timings of the
    yardstick GEMMs, and stores their throughput (and on CUDA the median of the CUDA-event times)."""

    def setup_round():
        setup()
        return (), {}

    # The yardstick GEMM right before and right after the timed rounds: on a shared machine the load
    # drifts, and the case's GEMM fraction must compare it with what the GEMM did meanwhile.
    gemm_times = {key: _yardstick_times(device, info, key) for key in yardsticks}
    cuda_times.clear()
    benchmark.pedantic(timed, setup=setup_round, rounds=rounds, warmup_rounds=warmup, iterations=1)
    for key in yardsticks:
        times = gemm_times[key] + _yardstick_times(device, info, key)
        m, k, n = info[f"{key}_shape"]
        benchmark.extra_info[f"{key}_flops_per_s"] = 2 * m * k * n / statistics.median(times)
    if cuda_times:
        benchmark.extra_info.update(median_s=statistics.median(cuda_times[-rounds:]), timer="cuda events")
    else:
        benchmark.extra_info["timer"] = "perf_counter"
