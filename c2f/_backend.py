"""Backend selection: compiled Triton kernels on CUDA/ROCm, the Triton interpreter on CPU, or torch ops.

triton is imported lazily: the torch-op path works where triton cannot be installed (macOS). The
kernels run on CPU tensors only under the Triton interpreter, which triton reads from
``TRITON_INTERPRET=1`` when the kernels are first imported; c2f never sets it (library code writes
no environment variables) and says clearly when it is needed.
"""
from __future__ import annotations

import functools
import importlib.util
import logging

import torch

BACKENDS = ("auto", "triton", "torch")
log = logging.getLogger("c2f")


@torch.compiler.assume_constant_result
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def resolve_backend(backend: str, device: torch.device) -> str:
    """Returns "triton" or "torch" for a requested backend and the device of the inputs.

    "auto" picks the Triton kernels on CUDA devices (ROCm builds of torch call them cuda too) and torch
    ops elsewhere. "triton" on CPU tensors runs the interpreter, which must be on; on a machine with a
    GPU, CPU tensors with "triton" are almost surely a forgotten ``.cuda()``, so that is an error.
    """
    check_backend(backend)
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if not triton_available():
        raise RuntimeError("backend='triton' needs the triton package (pip install 'c2f-fgvc[triton]'); "
                           "use backend='torch' or 'auto'")
    if device.type == "cuda":
        return "triton"
    if device.type != "cpu":
        raise RuntimeError(f"backend='triton' runs on CUDA/ROCm tensors (or CPU tensors under the Triton "
                           f"interpreter), got {device.type} tensors")
    if torch.cuda.is_available():
        raise RuntimeError("backend='triton' got CPU tensors on a machine with a GPU: move the inputs and the "
                           "module to the GPU (.cuda()), or use backend='torch' for the CPU")
    if not _interpreting():
        raise RuntimeError("backend='triton' on CPU tensors runs the kernels under the Triton interpreter, "
                           "which is off: set TRITON_INTERPRET=1 in the environment before c2f's kernels are "
                           "first imported, or use backend='torch' (the same algebra as torch ops)")
    return "triton"


@torch.compiler.assume_constant_result
def _interpreting() -> bool:
    from .kernels.launch import interpreting
    return interpreting()


@functools.cache
def warn_once(message: str) -> None:
    """Logs ``message`` as a warning the first time only."""
    log.warning(message)
