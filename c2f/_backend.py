"""Backend selection: compiled Triton on CUDA, the Triton interpreter on CPU, or plain torch ops.

triton is imported lazily: the torch-op path works where triton cannot be installed (macOS).
On a machine without CUDA the kernels can only run under the interpreter, so the first import of
a kernel module there sets ``TRITON_INTERPRET=1`` (the flag is read when kernels are decorated).
"""
from __future__ import annotations

import importlib
import os
import sys

import torch

BACKENDS = ("auto", "triton", "torch")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: str, device: torch.device) -> str:
    """Returns "triton" or "torch" for a requested backend and the device of the inputs."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if not triton_available():
        raise RuntimeError("backend='triton' needs the triton package (pip install triton); "
                           "use backend='torch' or 'auto'")
    if device.type == "cpu" and not interpreter_enabled() and _kernels_loaded() and torch.cuda.is_available():
        raise RuntimeError("backend='triton' on CPU tensors runs the kernels under the Triton interpreter: "
                           "set TRITON_INTERPRET=1 before importing c2f (kernels here were compiled for CUDA)")
    if device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"backend='triton' supports CPU (interpreter) and CUDA tensors, got {device.type}")
    return "triton"


def _kernels_loaded() -> bool:
    return any(name.startswith("c2f.kernels.") for name in sys.modules)


def load_kernels(name: str):
    """Imports ``kernels.<name>``, in interpreter mode when this machine has no CUDA."""
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
    return importlib.import_module(f"c2f.kernels.{name}")
