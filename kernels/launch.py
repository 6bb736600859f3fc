"""How every kernel is launched: a plan, one ``launch`` call, and a recorder for offline compiles.

A launcher computes each kernel's ``KernelPlan`` (grid, constexprs, warps, stages) with the kernel's
plan function in its op's ``plans_<op>.py`` and calls ``launch(kernel, plan, **args)``. Inside ``recording(target)``
the same launcher, called on ``meta`` tensors, records its launches instead of running them:
``inspect.py`` compiles exactly those, with the argument types and divisibility the JIT would infer
from the very same arguments. What is inspected is what runs.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

# One dtype map for the whole package: storage dtypes the kernels accept, with Triton's names.
TL_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
FLOAT_DTYPES = tuple(TL_DTYPES)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


@functools.cache
def interpreting() -> bool:
    """True when the kernels were decorated for the Triton interpreter: triton reads
    ``TRITON_INTERPRET=1`` when a kernel module is first imported. Every kernel module imports ``dots``
    (the one matrix product), so its functions are decorated as the kernels are (here, if not before)."""
    from triton.runtime.jit import JITFunction

    from .dots import mma
    return not isinstance(mma, JITFunction)


# The oldest Triton c2f supports (pyproject.toml's triton extra; `make test-compat` runs the suite on it).
MIN_TRITON = (3, 6)


def version_tuple(text: str) -> tuple[int, ...]:
    """``(major, minor)`` of a version string such as ``3.6.0`` or ``3.10.1+git``."""
    return tuple(int(part) for part in re.findall(r"\d+", text)[:2])


@functools.cache
def check_interpreter() -> None:
    """Raises, in one line, where this Triton's interpreter cannot run the kernels: before 3.7 it turns a
    scalar argument into a Python int with ``int(array)``, which numpy 2.4 refuses for 1-element arrays."""
    import numpy
    import triton
    if version_tuple(triton.__version__) < (3, 7) and version_tuple(numpy.__version__) >= (2, 4):
        raise RuntimeError(f"the Triton {triton.__version__} interpreter needs numpy < 2.4 (numpy "
                           f"{numpy.__version__} is installed): pip install 'numpy<2.4', or triton >= 3.7")


@dataclass(frozen=True)
class KernelPlan:
    """How one kernel is launched for given shapes, dtype and target."""
    grid: tuple[int, ...]
    constexprs: dict[str, Any] = field(hash=False)
    num_warps: int = 4
    num_stages: int = 2
    smem_bound: int | None = None   # bytes of shared memory the plan's own rule allows (plans.py)
    options: dict[str, Any] = field(default_factory=dict, hash=False)   # backend compile options (maxnreg)


@dataclass
class Launch:
    """A recorded launch: the kernel, its plan and its runtime arguments by name."""
    kernel: Any
    plan: KernelPlan
    args: dict[str, Any]

    @property
    def name(self) -> str:
        return getattr(self.kernel, "__name__", None) or self.kernel.fn.__name__


_RECORD: contextvars.ContextVar[list[Launch] | None] = contextvars.ContextVar("c2f_kernel_record", default=None)
_TARGET: contextvars.ContextVar[Any | None] = contextvars.ContextVar("c2f_kernel_target", default=None)


def launch(kernel, plan: KernelPlan, **args: Any) -> None:
    """Launches ``kernel`` with ``plan``; inside ``recording()`` appends the launch instead."""
    record = _RECORD.get()
    if record is not None:
        record.append(Launch(kernel, plan, dict(args)))
        return
    if interpreting():
        check_interpreter()
    kernel[plan.grid](**args, **plan.constexprs, num_warps=plan.num_warps, num_stages=plan.num_stages, **plan.options)


@contextlib.contextmanager
def plan_for(target) -> Iterator[None]:
    """Plans every launch inside for ``target`` (a ``targets.Target``) instead of the current device:
    e.g. a GPU's tiles run under the interpreter, or a smaller shared-memory limit."""
    token = _TARGET.set(target)
    try:
        yield
    finally:
        _TARGET.reset(token)


@contextlib.contextmanager
def recording(target) -> Iterator[list[Launch]]:
    """Records the launches made inside (launchers called on ``meta`` tensors), planned for ``target``."""
    token = _RECORD.set([])
    try:
        with plan_for(target):
            yield _RECORD.get()
    finally:
        _RECORD.reset(token)


def planned_target():
    """The target set by ``plan_for`` or ``recording``, or None."""
    return _TARGET.get()
