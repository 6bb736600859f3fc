"""Block sizes and warps for every kernel, in one place, with the reason for each choice.

Launchers and the static GPU check (``kernels.inspect``) read the same numbers. Each kernel module
exposes ``compile_specs() -> list[KernelSpec]``: its kernels at production shapes, for ahead-of-time
compilation with no GPU.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class KernelSpec:
    """One kernel at its production block sizes, as ``triton.compile(ASTSource(...))`` wants it.

    ``signature`` maps every argument name to a Triton type string ("*fp32", "*fp16", "i32", "i64",
    "fp32") or "constexpr"; ``constexprs`` gives the constexpr values; ``aligned`` names the pointer
    and integer arguments the JIT would see as divisible by 16 (production tensors and sizes are).
    """
    name: str
    fn: Callable
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int
    aligned: tuple[str, ...] = field(default_factory=tuple)


# ---- part attention (kernels/part_attention.py) ----

# ---- part mixup (kernels/part_mixup.py) ----
