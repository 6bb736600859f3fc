"""Launch-plan machinery shared by every op's plans (``plans_part_attention.py``, ``plans_part_mixup.py``,
``plans_c2f_head.py``: one plan function per kernel, returning its grid, tiles, warps and stages for given
shapes, dtype and target). Launchers launch these plans and ``inspect.py`` compiles the same plans, so every
number lives in a plan module once, with the reason for it.

How tiles are chosen
--------------------
Every product in the kernels is a tiled GEMM ``[M, K] x [K, N]`` whose tiles do not depend on the
number of tokens: the kernels that once held all N tokens of a sample in one block (and needed 114 KiB
at N = 196, 450 KiB at N = 1024) are split into tiled GEMMs plus two row kernels (the softmax and its
backward), which hold whole rows but no dot operands. So one rule sizes every GEMM for a target, from
its per-block shared memory (LDS) limit alone:

- ``GEMM_LADDER`` lists tile shapes from large to small. A plan takes the first whose *pipelined
  operand footprint*, ``stages * (M + N) * K * 4`` bytes (fp32 operand tiles, the widest a kernel
  stages), is at most half the target's per-block limit (``SMEM_HEADROOM``). The other half is for what
  Triton adds besides the pipeline buffers: the dot operands' layout conversion, the B operand copy a
  wgmma reads from shared memory, the epilogue. ``inspect`` checks that bound at every grid point on
  every target (``KernelPlan.smem_bound``: compiled shared memory <= 2 x footprint <= the limit), so
  the rule is an upper bound of the compiled figure, not a guess; a device not in the table (read at
  run time, ``targets.device_target``) gets tiles by the same rule from its own limit.
- Registers: a plan also holds its fp32 accumulators to ``ACC_VALUES`` per thread, all accumulators
  together: a [128, 64] tile is 32 values per thread at 8 warps of 32 lanes (16 with 64-lane
  wavefronts), so the dxhat kernel with dx (two accumulators) takes [64, 64] where the others take
  [128, 64]. Operand tiles and their offsets take about as much again: measured with ptxas, [64, 64]
  tiles at 4 warps reached 252 of 255 registers (dxhat, sm_86), at 8 warps 200; dxhat's two [128, 64]
  accumulators spilled on sm_90; a [128, 128] tile spilled at 8 warps on sm_80 and sm_90. NVIDIA plans
  state their register budget (``maxnreg``, see ``compile_options``), or ptxas spills on its own.
- The tiers that result: 227 KiB (sm_90, sm_100) and 163 / 160 KiB (sm_80, gfx950) run [128, 64, 32]
  tiles; 99 KiB (sm_86, sm_89, sm_120) [64, 64, 32] with 3 stages; 64 KiB (gfx90a, gfx942) [64, 64, 32]
  with 2 stages; all with 8 warps. AMD runs at most 2 stages (``HIP_MAX_STAGES``). Below 32 KiB of
  shared memory per block: ``PlanError``.
- Tiles shrink to the problem (a head of 25 channels, 7 queries) but never below ``MIN_DOT``.
- Kernels that loop over channel chunks with whole rows or fused work (the short-row attention, the
  head, the pooled mix) size their chunk with one rule, ``shrink_to_fit``: the stages, then the chunk,
  shrink until ``SMEM_HEADROOM`` x the pipelined operand tiles (and one staged copy of the operands of
  the products after the loop) fit the target's per-block limit. Their rows per block come from a
  per-thread register budget (``rows_per_block``).
- The interpreter pays per Triton op (~0.1-1 ms of Python), not per element: big tiles, few programs
  and few loop trips make the same kernels 5-10x cheaper on CPU. Correctness does not depend on the
  tiles; tests also run the GPU tiles under the interpreter (``launch.plan_for``).

Dot precision
-------------
``dot_precision`` (``DOT_PRECISIONS``, a user option): ``"tf32"`` (default, flash-attention's choice:
fp32 operands on tensor cores, ~1e-3 relative error on the logits; docs/design.md "Precision"),
``"ieee"`` (fp32 products: FMA units on NVIDIA, fp32 MFMA on AMD), ``"bf16"`` / ``"fp16"`` (operands cast
to that dtype, fp32 accumulation: what ``torch.autocast`` does to a GEMM). ``dot_constexpr()`` maps
it to what a target compiles (``kernels/dots.py``): AMD has TF32 (XF32) on gfx942 only, so "tf32" is
"ieee" on gfx90a and gfx950 (Triton 3.9 ``HIPOptions.allowed_dot_input_precisions``); the
interpreter's bf16 dot is broken, so there "bf16" rounds operands to bf16 and multiplies in fp32.

Adding a plan function (the convention every kernel follows)
-----------------------------------------------------------
``def <op>_<kernel>(<shape ints>, dtype, target, dot_precision="tf32", <flags>) -> KernelPlan`` in
``plans_<op>.py``, the op's plan module. A GEMM kernel returns ``gemm_plan(grid, target, m, n, k, names,
dot_constexpr(target, dot_precision), accumulators=..., **flags)``: tiles from ``gemm_tiles``, clamped
with ``fit_tile``, ``smem_bound`` and ``options`` set, ``PlanError`` when nothing fits. A kernel looping
over channel chunks takes its chunk, stages and bound from ``shrink_to_fit``; a kernel without dots sets
``smem_bound=tile_bound(...)``; every plan sets ``options=compile_options(target)``. Its kernel multiplies
with ``dots.mma(a, b, acc, DOT_PRECISION)``, never ``tl.dot`` directly. The launcher makes all its plans
(``common.make_plans``) before it allocates or launches anything, and the op's shape grid goes into
``inspect_cases.cases()``.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from .launch import KernelPlan, interpreting, next_pow2
from .targets import Target

__all__ = ["PLAN_FLAGS", "plan_flags", "plan_flag",
           "DOT_PRECISIONS", "MIN_DOT", "FP32_BYTES", "MAX_TOKENS", "SMEM_HEADROOM", "GEMM_LADDER", "GemmTiles",
           "PlanError", "dot_constexpr", "is_interpreter", "pipeline_stages", "compile_options", "gemm_tiles",
           "fit_tile", "tile_bound", "gemm_plan", "cdiv", "rows_per_block", "shrink_to_fit"]

# Plan flags: plan choices that are off by default until a GPU has measured them, each with the environment
# variable that turns it on for a process ("1"); ``plan_flags(name=True)`` sets them for a block of code.
PLAN_FLAGS = {
    # The head forward in one launch: the last query block of each (sample, head), found by an atomic
    # counter, pools the rows (kernels/c2f_head_fwd.py, POOL_IN_PASS); off: a second kernel pools them.
    "head_fwd_one_pass": "C2F_HEAD_FWD_ONE_PASS",
}
_PLAN_FLAGS_SET: contextvars.ContextVar[dict | None] = contextvars.ContextVar("c2f_plan_flags", default=None)


@contextlib.contextmanager
def plan_flags(**flags: bool) -> Iterator[None]:
    """Sets plan flags (``PLAN_FLAGS``' names) for the plans made inside the block."""
    unknown = sorted(set(flags) - set(PLAN_FLAGS))
    if unknown:
        raise ValueError(f"unknown plan flag(s) {unknown}: expected some of {sorted(PLAN_FLAGS)}")
    token = _PLAN_FLAGS_SET.set({**(_PLAN_FLAGS_SET.get() or {}), **{k: bool(v) for k, v in flags.items()}})
    try:
        yield
    finally:
        _PLAN_FLAGS_SET.reset(token)


def plan_flag(name: str) -> bool:
    """A plan flag's value: set by ``plan_flags``, else its environment variable ("1" on), else off."""
    if name not in PLAN_FLAGS:
        raise ValueError(f"unknown plan flag {name!r}: expected one of {sorted(PLAN_FLAGS)}")
    value = (_PLAN_FLAGS_SET.get() or {}).get(name)
    if value is None:
        env = os.environ.get(PLAN_FLAGS[name], "")
        if env not in ("", "0", "1"):
            raise ValueError(f"{PLAN_FLAGS[name]}={env!r}: expected 1 (on) or 0 (off)")
        value = env == "1"
    return value


DOT_PRECISIONS = ("tf32", "ieee", "bf16", "fp16")
MIN_DOT = 16            # tl.dot wants M, N >= 16 for tensor cores and K >= 16 for 16-bit operands
FP32_BYTES = 4
MAX_TOKENS = 1024       # kernels holding a whole row of N tokens (the softmax): 32 x 32 maps at most


class PlanError(ValueError):
    """No plan of a kernel fits a target (raised before anything is launched)."""


# --------------------------------------------------------------------------------- dot precision

def _has_tf32(target: Target) -> bool:
    """TF32 dots: NVIDIA sm_80+, AMD gfx942 (XF32); elsewhere Triton 3.9 rejects "tf32"."""
    if target.backend == "cuda":
        return isinstance(target.arch, int) and target.arch >= 80
    if target.backend == "hip":
        return target.arch == "gfx942"
    return True     # the interpreter accepts it (and multiplies exactly: tests emulate the rounding)


def dot_constexpr(target: Target, requested: str) -> str:
    """The ``DOT_PRECISION`` constexpr (``dots.mma``) for a user's ``dot_precision`` on ``target``."""
    if requested not in DOT_PRECISIONS:
        raise ValueError(f"dot_precision must be one of {DOT_PRECISIONS}, got {requested!r}")
    if requested == "tf32" and not _has_tf32(target):
        return "ieee"
    if requested == "bf16" and (target.backend == "interpreter" or interpreting()):
        return "bf16_rounded"       # interpreted kernels, whatever target they are planned for
    return requested


# --------------------------------------------------------------------------------------- tiles

@dataclass(frozen=True)
class GemmTiles:
    """An output tile [m, n] walking the reduction in k-wide chunks, with its warps and stages."""
    m: int
    n: int
    k: int
    stages: int
    warps: int

    def footprint(self) -> int:
        """Bytes of the pipelined operand tiles: ``stages`` buffers of an [m, k] and a [k, n] fp32 tile."""
        return self.stages * (self.m + self.n) * self.k * FP32_BYTES

    def smem_bound(self) -> int:
        """The shared memory a GEMM kernel with these tiles may use: ``SMEM_HEADROOM`` x footprint."""
        return SMEM_HEADROOM * self.footprint()


SMEM_HEADROOM = 2       # pipeline buffers <= half the limit; the other half for conversions, epilogue
ACC_VALUES = 32         # fp32 accumulator values per thread (all accumulators of a kernel together)
HIP_MAX_STAGES = 2      # AMD's stream pipeliner holds stages beyond two in registers: 3 spilled (gfx950, pool)
MAX_REGISTERS = 255     # NVIDIA: registers per thread a plan allows (.maxnreg; see compile_options)
GEMM_LADDER = (
    GemmTiles(128, 64, 32, stages=3, warps=8),   # 72 KiB footprint: needs >= 144 KiB per block
    GemmTiles(64, 64, 32, stages=3, warps=8),    # 48 KiB: >= 96 KiB
    GemmTiles(64, 64, 32, stages=2, warps=8),    # 32 KiB: >= 64 KiB
    GemmTiles(32, 32, 32, stages=2, warps=4),    # 16 KiB: >= 32 KiB
)
INTERPRETER_GEMM = GemmTiles(128, 256, 128, stages=1, warps=4)


def is_interpreter(target: Target) -> bool:
    """Whether plans for ``target`` are sized for the interpreter (Python overhead, no limits)."""
    return target.backend == "interpreter"


def pipeline_stages(target: Target, stages: int) -> int:
    """``stages``, at most ``HIP_MAX_STAGES`` on AMD."""
    return min(stages, HIP_MAX_STAGES) if target.backend == "hip" else stages


def compile_options(target: Target) -> dict:
    """Backend compile options of every plan. NVIDIA: ``maxnreg`` states the register budget. Without it
    ptxas (run by Triton with ``--regAllocOptLevel=2``) picks a register target of its own for occupancy
    and spills below it: measured, the parts kernel on sm_80 at 128 registers with 12 B of spills, with
    ``.maxnreg 255`` at 167 registers and none; the softmax backward on sm_120 likewise at 48 / 62."""
    return {"maxnreg": MAX_REGISTERS} if target.backend == "cuda" else {}


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def gemm_tiles(target: Target, accumulators: int = 1) -> GemmTiles:
    """The largest ``GEMM_LADDER`` entry whose ``smem_bound`` fits ``target``'s per-block limit and whose
    ``accumulators`` [m, n] fp32 accumulators come to at most ``ACC_VALUES`` per thread."""
    if is_interpreter(target):
        return INTERPRETER_GEMM
    for tiles in GEMM_LADDER:
        acc_per_thread = accumulators * tiles.m * tiles.n // (tiles.warps * target.warp_size)
        if tiles.smem_bound() <= target.smem_per_block and acc_per_thread <= ACC_VALUES:
            return tiles
    raise PlanError(f"no GEMM tiles fit {target.name}: {target.smem_per_block / 1024:.0f} KiB of shared memory "
                    f"per block, the smallest plan needs {GEMM_LADDER[-1].smem_bound() / 1024:.0f} KiB")


def fit_tile(block: int, extent: int) -> int:
    """``block``, or the extent rounded up to a power of two when smaller, never below ``MIN_DOT``."""
    return max(MIN_DOT, min(block, next_pow2(extent)))


def tile_bound(*tiles: tuple[int, int]) -> int:
    """Shared memory bound of a kernel without dots: layout conversions and cross-warp reductions
    stage at most one fp32 copy of each live tile."""
    return sum(r * c for r, c in tiles) * FP32_BYTES


def gemm_plan(grid: Callable[[int, int], tuple[int, ...]], target: Target, m: int, n: int, k: int,
              names: tuple[str, str, str], precision: str, accumulators: int = 1, **flags) -> KernelPlan:
    """A GEMM kernel's plan on ``target``: tiles clamped to the problem (m x n output, k reduction),
    ``names`` the constexprs of the three tile sizes, ``grid(tile_m, tile_n)`` the launch grid."""
    tiles = gemm_tiles(target, accumulators)
    tm, tn, tk = fit_tile(tiles.m, m), fit_tile(tiles.n, n), fit_tile(tiles.k, k)
    sized = GemmTiles(tm, tn, tk, pipeline_stages(target, tiles.stages), tiles.warps)
    return KernelPlan(grid=grid(tm, tn), constexprs=dict(flags, **dict(zip(names, (tm, tn, tk), strict=True)),
                                                          DOT_PRECISION=precision),
                      num_warps=sized.warps, num_stages=sized.stages, smem_bound=sized.smem_bound(),
                      options=compile_options(target))


def rows_per_block(cap: int, extent: int, tiles: int, bn: int, target: Target, values: int, warps: int) -> int:
    """Rows per block of a kernel holding ``tiles`` [rows, bn] fp32 tiles together: ``cap`` or fewer, so
    that they stay at ``values`` per thread with ``warps`` warps; at least ``MIN_DOT``; clamped to the extent."""
    rows = cap
    while rows > MIN_DOT and tiles * rows * bn > values * warps * target.warp_size:
        rows //= 2
    return fit_tile(rows, extent)


def shrink_to_fit(target: Target, block: int, stages: int, operands: Callable[[int], int], what: str,
                  fixed: int | Callable[[int], int] = 0) -> tuple[int, int, int]:
    """``(block, stages, smem_bound)`` of a kernel looping over ``block``-wide chunks (of channels): on a
    GPU the stages, then the chunk, shrink until ``SMEM_HEADROOM`` x ``stages`` x ``operands(block)``
    (bytes of one stage's fp32 operand tiles), and ``fixed`` (one copy of the operands of the products,
    staged for their layout conversion; bytes, or a function of the chunk), fit the per-block limit;
    ``PlanError`` naming ``what`` below ``MIN_DOT``. The interpreter keeps the chunk, unpipelined."""
    def bound_at(k: int, s: int) -> int:
        return max(SMEM_HEADROOM * s * operands(k), fixed(k) if callable(fixed) else fixed)

    stages = pipeline_stages(target, stages)
    if is_interpreter(target):
        return block, 1, bound_at(block, 1)
    while True:
        while stages > 1 and bound_at(block, stages) > target.smem_per_block:
            stages -= 1
        bound = bound_at(block, stages)
        if bound <= target.smem_per_block:
            return block, stages, bound
        if block <= MIN_DOT:
            raise PlanError(f"no {what} tiles fit {target.name}: {target.smem_per_block / 1024:.0f} KiB of shared "
                            f"memory per block, the smallest plan needs {bound / 1024:.0f} KiB")
        block //= 2
