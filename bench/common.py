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
``sweep`` names the param that the report plots on the x axis.

Quick mode (``C2F_BENCH_QUICK=1``, set by ``python -m bench.report --quick``) thins sweeps and rounds
so the whole report stays within minutes on a 2-core CPU.
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable, Iterable, Optional, Sequence

import torch

from .memtrack import LiveTensorTracker, count_flops, nvml_used_bytes, profiler_peak_bytes, saved_tensor_bytes

__all__ = ["B_SWEEP", "K_SWEEP", "IMPLS", "quick", "sweep", "default_rounds", "bench_device", "record",
           "zero_grads", "synchronize"]

# Sweeps of the report's plots: batch sizes up to a realistic training batch, mixup views up to 32.
B_SWEEP = (8, 16, 32, 64)
K_SWEEP = (1, 2, 4, 8, 16, 32)
IMPLS = ("fused", "reference", "compiled")


def quick() -> bool:
    """True when the report asked for a short run (``C2F_BENCH_QUICK=1``)."""
    return os.environ.get("C2F_BENCH_QUICK", "0") == "1"


def sweep(values: Sequence[Any], quick_values: Optional[Sequence[Any]] = None) -> list[Any]:
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
    """Timed rounds per case: the median of 5 (3 in quick mode) after one warmup round."""
    return 3 if quick() else 5


def bench_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def zero_grads(*objs: Any) -> None:
    """Drops ``.grad`` of modules' parameters and of tensors, so every round allocates its gradients anew."""
    for obj in objs:
        params: Iterable[torch.Tensor] = obj.parameters() if isinstance(obj, torch.nn.Module) else [obj]
        for p in params:
            p.grad = None


def _dtype_name(dtype: Any) -> Optional[str]:
    if dtype is None:
        return None
    return str(dtype).replace("torch.", "")


def record(benchmark, fn: Callable[[], Any], *, name: str, impl: str, device: torch.device | str | None = None,
           dtype: Any = None, shapes: Optional[dict[str, Any]] = None, params: Optional[dict[str, Any]] = None,
           sweep: Optional[str] = None, forward: Optional[Callable[[], Any]] = None,
           setup: Optional[Callable[[], None]] = None, rounds: Optional[int] = None, warmup: int = 1,
           measure: bool = True, extra: Optional[dict[str, Any]] = None) -> None:
    """Times ``fn`` with ``benchmark.pedantic`` and stores its peak memory and FLOPs in ``extra_info``.

    ``fn`` runs once untimed under the live-tensor tracker and the FLOP counter (skip with
    ``measure=False`` when that one run is too slow; ``impl="compiled"`` measures memory through the
    profiler and FLOPs in a second run, since dispatch modes turn Dynamo off), then ``warmup`` untimed and ``rounds`` timed
    rounds; ``setup`` (e.g. ``lambda: zero_grads(model)``) runs before each of them, outside the
    timing. ``forward``, if given, runs once more to count the bytes autograd saves for backward.
    ``params`` identify the case among its ``impl`` siblings; ``sweep`` names the param on the x axis.
    ``extra`` adds anything else JSON-serialisable.
    """
    from torch.utils.flop_counter import FlopCounterMode

    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    params = dict(params or {})
    if sweep is not None and sweep not in params:
        raise ValueError(f"sweep={sweep!r} must name one of params {sorted(params)}")
    device = torch.device(device) if device is not None else bench_device()
    setup = setup or (lambda: None)

    def timed() -> None:
        fn()
        synchronize(device)

    info: dict[str, Any] = {
        "case": name, "impl": impl, "device": _device_name(device), "dtype": _dtype_name(dtype),
        "shapes": shapes or {}, "params": params, "sweep": sweep, "threads": torch.get_num_threads(),
        "quick": quick(),
    }
    if measure and impl == "compiled":
        # Any TorchDispatchMode (tracker, FLOP counter) makes Dynamo run the code eagerly: measure memory
        # without one (CUDA allocator, or the profiler's allocator events on CPU), FLOPs in a second run.
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
        info["nvml_used_bytes"] = nvml_used_bytes()
    elif measure:
        setup()
        flops = FlopCounterMode(display=False)
        start = time.perf_counter()
        with LiveTensorTracker(device) as tracker, flops:
            timed()
        info["first_run_s"] = time.perf_counter() - start
        info["peak_bytes"] = tracker.peak_bytes
        info["peak_method"] = "allocator" if device.type == "cuda" else "tracker"
        info["flops"] = flops.get_total_flops()
        info["nvml_used_bytes"] = nvml_used_bytes()
    if forward is not None:
        setup()
        info["saved_bytes"] = saved_tensor_bytes(forward)
    info.update(extra or {})
    benchmark.extra_info.update(info)
    benchmark.group = name + "".join(f" {k}={v}" for k, v in params.items())

    def setup_round():
        setup()
        return (), {}

    benchmark.pedantic(timed, setup=setup_round, rounds=rounds or default_rounds(), warmup_rounds=warmup,
                       iterations=1)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    import platform
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
