"""The GPU verdict's view of the machine: what it is, what its datasheet promises, what it measures, and
how a step is timed and its peak memory read.

``describe(device)`` names the device (GPU: name, capability, memory, driver and runtime; CPU: model and
ISA from ``bench.machine``, and whether the Triton interpreter runs the kernels). ``datasheet_peaks(name)``
looks the GPU up in ``PEAKS`` (dense figures, no sparsity). ``yardsticks(device)`` measures the copy
bandwidth and the GEMM throughput per precision in the same process, so a case's achieved GB/s and TFLOP/s
can be read against both. ``time_step`` and ``peak_bytes`` run a step the same way on CUDA (CUDA events,
the allocator's high-water mark) and on CPU (``time.perf_counter``, ``bench.memtrack``'s tracker).

Standard library and torch only: this runs on a GPU box with nothing else installed.
"""
from __future__ import annotations

import contextlib
import gc
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from . import machine

__all__ = ["Peaks", "PEAKS", "datasheet_peaks", "describe", "yardsticks", "matmul_precision", "synchronize",
           "time_step", "peak_bytes", "free_memory", "is_oom"]


@dataclass(frozen=True)
class Peaks:
    """Dense datasheet peaks (no sparsity): memory bandwidth in GB/s, FLOP rates in TFLOP/s. ``fp32``: the
    rate of fp32 dots without tensor cores (Triton's "ieee" dots: FMA units on NVIDIA, fp32 MFMA on AMD);
    ``tf32``: tensor-core TF32 (XF32 on MI300); ``bf16``: tensor-core bf16 with fp32 accumulation."""
    name: str
    memory_gbps: float
    fp32_tflops: float
    tf32_tflops: float
    bf16_tflops: float
    source: str


# Matched in order on the lower-cased device name (the first entry whose every word occurs in it).
# Sources: NVIDIA's product datasheets (H100/H200 "Tensor Core GPU" datasheets, A100 datasheet, L40S
# datasheet, Ada architecture whitepaper for the RTX 4090: bf16 with fp32 accumulate) and AMD's MI300X
# datasheet; the sparse figures they print are halved to dense. bench/roofline.py uses the same A100,
# H100 SXM and RTX 4090 figures.
PEAKS: tuple[tuple[tuple[str, ...], Peaks], ...] = (
    (("h200", "nvl"), Peaks("H200 NVL", 4800, 60.0, 417.5, 835.5, "NVIDIA H200 NVL datasheet")),
    (("h200",), Peaks("H200 SXM", 4800, 66.9, 494.7, 989.4, "NVIDIA H200 datasheet")),
    (("h100", "nvl"), Peaks("H100 NVL", 3900, 60.0, 417.5, 835.5, "NVIDIA H100 NVL datasheet")),
    (("h100", "pcie"), Peaks("H100 PCIe", 2000, 51.2, 378.0, 756.0, "NVIDIA H100 datasheet")),
    (("h100",), Peaks("H100 SXM", 3350, 66.9, 494.7, 989.4, "NVIDIA H100 datasheet")),
    (("a100", "40gb"), Peaks("A100 40GB", 1555, 19.5, 156.0, 312.0, "NVIDIA A100 datasheet")),
    (("a100", "pcie"), Peaks("A100 80GB PCIe", 1935, 19.5, 156.0, 312.0, "NVIDIA A100 datasheet")),
    (("a100",), Peaks("A100 SXM 80GB", 2039, 19.5, 156.0, 312.0, "NVIDIA A100 datasheet")),
    (("l40s",), Peaks("L40S", 864, 91.6, 183.0, 362.1, "NVIDIA L40S datasheet")),
    (("4090",), Peaks("RTX 4090", 1008, 82.6, 82.6, 165.2, "NVIDIA Ada whitepaper (RTX 4090)")),
    (("mi300x",), Peaks("MI300X", 5300, 163.4, 653.7, 1307.4, "AMD Instinct MI300X datasheet")),
)
# The precision names of the verdict's cases, and the peak each one's dots run at.
PEAK_FIELD = {"fp32-ieee": "fp32_tflops", "fp32-tf32": "tf32_tflops", "bf16": "bf16_tflops"}


def datasheet_peaks(name: str) -> Peaks | None:
    """The ``PEAKS`` entry for a device name (``torch.cuda.get_device_properties(...).name``), or None."""
    lowered = name.lower()
    for words, peaks in PEAKS:
        if all(w in lowered for w in words):
            return peaks
    return None


def _nvidia_smi(field: str) -> str | None:
    """One ``nvidia-smi --query-gpu`` field of the first GPU, or None where the tool is missing or slow."""
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10, check=True).stdout
        return out.strip().splitlines()[0].strip() or None
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def _triton_target() -> dict[str, Any]:
    """What Triton compiles for here (backend, arch, warp size) and the per-block shared memory limit."""
    try:
        from triton.runtime import driver
        target = driver.active.get_current_target()
        info = {"backend": target.backend, "arch": str(target.arch), "warp_size": target.warp_size}
        props = driver.active.utils.get_device_properties(torch.cuda.current_device())
        info["max_shared_mem"] = props.get("max_shared_mem")
        return info
    except Exception as e:  # noqa: BLE001  (a Triton without these internals: the rest still stands)
        return {"error": f"{type(e).__name__}: {e}"}


def describe(device: torch.device, interpreter: bool) -> dict[str, Any]:
    """The JSON's ``device``: name, kind and, on a GPU, capability, memory, driver and runtime versions;
    on a CPU the model, ISA and threads. ``interpreter``: whether Triton's interpreter runs the kernels."""
    info = machine.describe(device)
    info.update(interpreter=interpreter, platform=platform.platform())
    if device.type != "cuda":
        return info
    props = torch.cuda.get_device_properties(device)
    info.update(
        capability=f"{props.major}.{props.minor}", total_memory_bytes=props.total_memory,
        multiprocessors=props.multi_processor_count, l2_cache_bytes=getattr(props, "L2_cache_size", None),
        cuda_runtime=torch.version.cuda, hip_runtime=torch.version.hip,
        driver=_nvidia_smi("driver_version"), power_limit=_nvidia_smi("power.limit"),
        clocks_max_sm_mhz=_nvidia_smi("clocks.max.sm"), triton_target=_triton_target(),
        visible_devices=torch.cuda.device_count(), cuda_visible=os.environ.get("CUDA_VISIBLE_DEVICES"))
    peaks = datasheet_peaks(props.name)
    info["datasheet"] = asdict(peaks) if peaks else None
    return info


@contextlib.contextmanager
def matmul_precision(precision: str, device: torch.device):
    """``torch.set_float32_matmul_precision`` inside ("highest": fp32 GEMMs; "high": TF32), restored after;
    on a GPU only (on a CPU "high" lets oneDNN use bf16 arithmetic, which is no TF32 and slow without AMX)."""
    if device.type != "cuda":
        yield
        return
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _copy_bandwidth(device: torch.device, nbytes: int, rounds: int) -> dict[str, Any]:
    """GB/s of ``dst.copy_(src)``, counted as one read and one write of ``nbytes`` (median of ``rounds``)."""
    src = torch.empty(nbytes // 4, device=device, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    times = time_step(lambda: None, lambda: dst.copy_(src), device, warmup=1, repeats=rounds)
    median = statistics.median(times)
    return {"bytes": 2 * nbytes, "median_s": median, "gbps": 2 * nbytes / median / 1e9, "rounds": rounds}


def yardsticks(device: torch.device, small: bool) -> dict[str, Any]:
    """Measured in this process: copy bandwidth, and the GEMM throughput of fp32 ("highest"), TF32 ("high";
    the same as fp32 where the device has no TF32) and bf16 (``small``: sizes for a CPU smoke run)."""
    out: dict[str, Any] = {}
    try:
        out["copy"] = _copy_bandwidth(device, (16 if small else 1024) << 20, 3 if small else 10)
    except Exception as e:  # noqa: BLE001  (a yardstick that fails leaves the cases to run)
        out["copy"] = {"error": f"{type(e).__name__}: {e}"}
    shape = (256, 256, 256) if small else (8192, 8192, 8192)
    for name, dtype, precision in (("fp32-ieee", torch.float32, "highest"), ("fp32-tf32", torch.float32, "high"),
                                   ("bf16", torch.bfloat16, "highest")):
        try:
            with matmul_precision(precision, device):
                r = machine.gemm_throughput(device, dtype, shape, rounds=3 if small else 5)
            out[f"gemm_{name}"] = {"shape": r["shape"], "median_s": r["median_s"], "tflops": r["flops_per_s"] / 1e12}
        except Exception as e:  # noqa: BLE001
            out[f"gemm_{name}"] = {"error": f"{type(e).__name__}: {e}"}
    free_memory(device)
    return out


def time_step(setup: Callable[[], Any], run: Callable[[], Any], device: torch.device, warmup: int,
              repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``run`` after ``warmup`` untimed ones; ``setup`` before
    every call, outside the timing. CUDA: events around ``run`` alone, read after the last call."""
    for _ in range(warmup):
        setup()
        run()
    synchronize(device)
    if device.type != "cuda":
        times = []
        for _ in range(repeats):
            setup()
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        return times
    events = []
    for _ in range(repeats):
        setup()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) / 1e3 for start, end in events]


def peak_bytes(setup: Callable[[], Any], run: Callable[[], Any], device: torch.device) -> dict[str, Any]:
    """Peak memory of one ``run`` (after ``setup``): ``bytes`` above what was allocated at its start, and on
    CUDA ``total`` (``max_memory_allocated``, reset right before). CPU: ``bench.memtrack``'s live-tensor
    tracker (storages created during the run); None with the reason where it cannot follow the step."""
    setup()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        run()
        torch.cuda.synchronize(device)
        total = torch.cuda.max_memory_allocated(device)
        return {"bytes": total - base, "total": total, "method": "cuda max_memory_allocated"}
    from .memtrack import LiveTensorTracker
    try:
        with LiveTensorTracker(device) as tracker:
            run()
        return {"bytes": tracker.peak_bytes, "total": None, "method": "bench.memtrack.LiveTensorTracker"}
    except Exception as e:  # noqa: BLE001  (the timing does not depend on it)
        return {"bytes": None, "total": None, "method": f"unavailable: {type(e).__name__}: {e}"}


def free_memory(device: torch.device) -> None:
    """On CUDA (between cases, after an OOM): collects garbage (an exception's traceback holds tensors in
    cycles) and returns the allocator's cached blocks. A no-op on CPU, where tensors are freed as their
    last reference goes and a collection costs a tenth of a second."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def is_oom(error: BaseException) -> bool:
    """True for the allocator running out of device (or host) memory."""
    oom = getattr(torch.cuda, "OutOfMemoryError", ())
    return isinstance(error, (MemoryError, oom)) or "out of memory" in str(error).lower()
