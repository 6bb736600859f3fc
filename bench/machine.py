"""What the bench runs on, and what that machine's GEMMs can do.

``describe(device)`` names the device: the GPU (and its compute capability or ROCm arch), or the CPU
model with its instruction set and thread count. The ISA matters for every dtype figure: bf16 GEMMs
run natively only with AVX-512 BF16 or AMX (x86) or on a GPU; with AVX2 alone oneDNN emulates them at
a small fraction of the fp32 throughput, so a bf16 speed target cannot be met there.

``gemm_throughput(device, dtype)`` times one large GEMM (median of several runs, the same threads as
the cases), the yardstick of the report's GEMM-efficiency column: a case's FLOPs over its median
time, as a fraction of this throughput.
"""
from __future__ import annotations

import functools
import os
import platform
import statistics
import time
from typing import Any

import torch

__all__ = ["cpu_flags", "cpu_isa", "cpu_model", "native_bf16", "describe", "device_label", "gemm_throughput",
           "gemm_reference", "HEAD_GEMM", "SMALL_GEMM", "BF16_NOTE"]

# The head's batched product at B=16: [2P, C] x [C, B*N] (the fused head's largest GEMM).
HEAD_GEMM = (624, 2048, 3136)
# One sample's product: used for dtypes this machine emulates, where HEAD_GEMM would take minutes.
SMALL_GEMM = (312, 2048, 196)
BF16_NOTE = ("bf16 GEMMs are emulated on a CPU without AVX-512 BF16 or AMX: bf16 figures here check that the "
             "path runs, not its speed; the bf16 speed target (issue 12) needs AVX-512 BF16 / AMX or a GPU.")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags from ``/proc/cpuinfo`` (empty off Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_isa(flags: frozenset[str] | None = None) -> str:
    """The widest matrix-relevant instruction set: "AMX", "AVX-512 BF16", "AVX-512", "AVX2", or torch's
    own reading of the CPU when the flags are unknown."""
    flags = cpu_flags() if flags is None else flags
    if "amx_bf16" in flags or "amx_tile" in flags:
        return "AMX"
    if "avx512_bf16" in flags:
        return "AVX-512 BF16"
    if "avx512f" in flags:
        return "AVX-512"
    if "avx2" in flags:
        return "AVX2"
    if flags:
        return "pre-AVX2" if platform.machine() in ("x86_64", "AMD64") else platform.machine()
    try:
        return torch.backends.cpu.get_cpu_capability()
    except AttributeError:
        return "unknown"


@functools.cache
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def native_bf16(device: torch.device | str) -> bool:
    """True where bf16 GEMMs run in hardware: a GPU that supports bf16, or a CPU with AVX-512 BF16 or AMX."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return cpu_isa() in ("AMX", "AVX-512 BF16")


def describe(device: torch.device | str) -> dict[str, Any]:
    """``{"kind", "name", "isa", "threads", "cores", "label"}``: what the report prints next to every figure."""
    device = torch.device(device)
    threads = int(os.environ.get("C2F_BENCH_THREADS") or torch.get_num_threads())
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        arch = getattr(props, "gcnArchName", None) if torch.version.hip else f"sm_{props.major}{props.minor}"
        runtime = f"ROCm {torch.version.hip}" if torch.version.hip else f"CUDA {torch.version.cuda}"
        info = {"kind": "cuda", "name": props.name, "isa": arch, "threads": threads, "cores": os.cpu_count(),
                "memory_gib": round(props.total_memory / 2**30, 1)}
        info["label"] = f"GPU {props.name} ({arch}, {info['memory_gib']} GiB, {runtime})"
        return info
    isa = cpu_isa()
    info = {"kind": "cpu", "name": cpu_model(), "isa": isa, "threads": threads, "cores": os.cpu_count()}
    bf16 = "native bf16" if native_bf16(device) else "bf16 emulated"
    plural = "thread" if threads == 1 else "threads"
    info["label"] = (f"CPU {info['name']} ({platform.machine()}, ISA {isa}: {bf16}; "
                     f"{threads} {plural} of {os.cpu_count()} cores)")
    return info


def device_label(device: torch.device | str) -> str:
    return describe(device)["label"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gemm_throughput(device: torch.device | str, dtype: torch.dtype = torch.float32,
                    shape: tuple[int, int, int] = HEAD_GEMM, rounds: int = 5, warmup: bool = True) -> dict[str, Any]:
    """Times ``[M, K] x [K, N]`` in ``dtype`` (one warmup unless ``warmup=False``, then ``rounds``);
    returns its median FLOP/s.

    ``{"shape", "dtype", "flops_per_s", "median_s", "times", "rounds", "timer"}``; CUDA times with CUDA events.
    """
    device = torch.device(device)
    m, k, n = shape
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=gen).to(device, dtype)
    b = torch.randn(k, n, generator=gen).to(device, dtype)
    out = torch.empty(m, n, device=device, dtype=dtype)
    if warmup:
        torch.mm(a, b, out=out)
    _sync(device)
    times = []
    for _ in range(rounds):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.mm(a, b, out=out)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            torch.mm(a, b, out=out)
            times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    timer = "cuda events" if device.type == "cuda" else "perf_counter"
    return {"shape": list(shape), "dtype": str(dtype).replace("torch.", ""), "flops_per_s": 2 * m * k * n / median,
            "median_s": median, "times": times, "rounds": rounds, "timer": timer}


@functools.cache
def gemm_reference(device_str: str, dtype_name: str = "float32") -> dict[str, Any]:
    """The yardstick GEMM for one device and dtype, measured once per process (the bench's threads).

    HEAD_GEMM, except for a dtype the machine emulates (bf16 on a CPU without AVX-512 BF16/AMX), where
    SMALL_GEMM with 3 rounds keeps it to seconds.
    """
    device, dtype = torch.device(device_str), getattr(torch, dtype_name)
    slow = dtype in (torch.bfloat16, torch.float16) and not native_bf16(device)
    return gemm_throughput(device, dtype, SMALL_GEMM if slow else HEAD_GEMM, rounds=3 if slow else 5)
