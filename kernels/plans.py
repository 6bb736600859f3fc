"""Launch plans: one function per kernel returning its grid, tiles, warps and stages for given shapes,
dtype and target. Launchers launch these plans and ``inspect.py`` compiles the same plans, so every
number below lives here once, with the reason for it.

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
  state their register budget (``maxnreg``, see ``_options``), or ptxas spills on its own.
- The tiers that result: 227 KiB (sm_90, sm_100) and 163 / 160 KiB (sm_80, gfx950) run [128, 64, 32]
  tiles; 99 KiB (sm_86, sm_89, sm_120) [64, 64, 32] with 3 stages; 64 KiB (gfx90a, gfx942) [64, 64, 32]
  with 2 stages; all with 8 warps. AMD runs at most 2 stages (``HIP_MAX_STAGES``). Below 32 KiB of
  shared memory per block: ``PlanError``.
- Tiles shrink to the problem (a head of 25 channels, 7 queries) but never below ``MIN_DOT``.
- Short rows (``short_rows``: ``next_pow2(N) <= ROW_TOKENS`` and the plans fit): one forward and one
  backward kernel per (sample, head, query block) hold whole rows of scores on chip instead of the tiled
  kernels and their row kernels; their rule is the head's (``rows_per_block``, ``fit_channels``), below.
- The row kernels hold whole rows, ``BLOCK_N = next_pow2(N)`` wide (at most ``MAX_TOKENS``), and as
  many rows as make ``ROW_VALUES`` fp32 values per thread: twice the rows with 64-lane wavefronts. The
  streaming kernels (statistics, the LayerNorm backward, the in-place mix) read [64, 32] or [8, 512]
  tiles: bytes in flight, not reuse. The pooled mix shrinks its stages, then its channel block, until
  its bound fits.
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
``def <op>_<kernel>(<shape ints>, dtype, target, dot_precision="tf32", <flags>) -> KernelPlan``, placed
after the existing ones. A GEMM kernel returns ``_gemm_plan(grid, target, m, n, k, names,
dot_constexpr(target, dot_precision), accumulators=..., **flags)``: tiles from ``gemm_tiles``, clamped
with ``fit_tile``, ``smem_bound`` and ``options`` set, ``PlanError`` when nothing fits. A kernel without
dots sets ``smem_bound=tile_bound(...)`` and ``options=_options(target)`` itself. Its kernel multiplies
with ``dots.mma(a, b, acc, DOT_PRECISION)``, never ``tl.dot`` directly. The launcher makes all its plans
before it allocates or launches anything, and the op's shape grid goes into ``inspect.cases()``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .launch import KernelPlan, interpreting, next_pow2
from .targets import Target

DOT_PRECISIONS = ("tf32", "ieee", "bf16", "fp16")
MIN_DOT = 16            # tl.dot wants M, N >= 16 for tensor cores and K >= 16 for 16-bit operands
FP32_BYTES = 4


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
MAX_REGISTERS = 255     # NVIDIA: registers per thread a plan allows (.maxnreg; see _options)
GEMM_LADDER = (
    GemmTiles(128, 64, 32, stages=3, warps=8),   # 72 KiB footprint: needs >= 144 KiB per block
    GemmTiles(64, 64, 32, stages=3, warps=8),    # 48 KiB: >= 96 KiB
    GemmTiles(64, 64, 32, stages=2, warps=8),    # 32 KiB: >= 64 KiB
    GemmTiles(32, 32, 32, stages=2, warps=4),    # 16 KiB: >= 32 KiB
)
INTERPRETER_GEMM = GemmTiles(128, 256, 128, stages=1, warps=4)
MAX_TOKENS = 1024       # the row kernels hold a whole row of N tokens: 32 x 32 maps at most
ROW_VALUES = 16         # fp32 values per thread in the row kernels (whole rows, registers only): the
ROW_WARPS = 4           # softmax backward holds three such tiles and its row offsets; 32 spilled (sm_86)
INTERPRETER_ROW_TILE = 1 << 16
STREAM_TILE = (64, 32)  # statistics and dx: [channels, tokens] tiles, 7 programs per sample at N = 196
INTERPRETER_STREAM_TILE = (512, 256)
STREAM_WARPS = 4


def _interpreting(target: Target) -> bool:
    return target.backend == "interpreter"


def _stages(target: Target, stages: int) -> int:
    return min(stages, HIP_MAX_STAGES) if target.backend == "hip" else stages


def _options(target: Target) -> dict:
    """Backend compile options of every plan. NVIDIA: ``maxnreg`` states the register budget. Without it
    ptxas (run by Triton with ``--regAllocOptLevel=2``) picks a register target of its own for occupancy
    and spills below it: measured, the parts kernel on sm_80 at 128 registers with 12 B of spills, with
    ``.maxnreg 255`` at 167 registers and none; the softmax backward on sm_120 likewise at 48 / 62."""
    return {"maxnreg": MAX_REGISTERS} if target.backend == "cuda" else {}


def gemm_tiles(target: Target, accumulators: int = 1) -> GemmTiles:
    """The largest ``GEMM_LADDER`` entry whose ``smem_bound`` fits ``target``'s per-block limit and whose
    ``accumulators`` [m, n] fp32 accumulators come to at most ``ACC_VALUES`` per thread."""
    if _interpreting(target):
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


def _gemm_plan(grid, target: Target, m: int, n: int, k: int, names: tuple[str, str, str], precision: str,
               accumulators: int = 1, **flags) -> KernelPlan:
    """A GEMM kernel's plan on ``target``: tiles clamped to the problem (m x n output, k reduction)."""
    tiles = gemm_tiles(target, accumulators)
    tm, tn, tk = fit_tile(tiles.m, m), fit_tile(tiles.n, n), fit_tile(tiles.k, k)
    sized = GemmTiles(tm, tn, tk, _stages(target, tiles.stages), tiles.warps)
    return KernelPlan(grid=grid(tm, tn), constexprs=dict(flags, **dict(zip(names, (tm, tn, tk))),
                                                          DOT_PRECISION=precision),
                      num_warps=sized.warps, num_stages=sized.stages, smem_bound=sized.smem_bound(),
                      options=_options(target))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def row_block(n: int, target: Target) -> tuple[int, int]:
    """``(BLOCK_R, BLOCK_N)`` of the row kernels: whole rows of ``n`` tokens."""
    if n > MAX_TOKENS:
        raise PlanError(f"the softmax holds whole rows of at most {MAX_TOKENS} tokens, got N = {n}")
    bn = max(MIN_DOT, next_pow2(n))
    tile = INTERPRETER_ROW_TILE if _interpreting(target) else ROW_VALUES * ROW_WARPS * target.warp_size
    return max(1, tile // bn), bn


def rows_per_block(cap: int, extent: int, tiles: int, bn: int, target: Target, values: int, warps: int) -> int:
    """Rows per block of a kernel holding ``tiles`` [rows, bn] fp32 tiles together: ``cap`` or fewer, so
    that they stay at ``values`` per thread with ``warps`` warps; at least ``MIN_DOT``; clamped to the extent."""
    rows = cap
    while rows > MIN_DOT and tiles * rows * bn > values * warps * target.warp_size:
        rows //= 2
    return fit_tile(rows, extent)


def fit_channels(target: Target, bc: int, stages: int, operands, what: str, fixed=0) -> tuple[int, int, int]:
    """``(BLOCK_C, stages, smem_bound)`` of a kernel looping over channel chunks: stages, then the chunk,
    shrink until ``SMEM_HEADROOM`` x ``stages`` x ``operands(bc)`` (bytes of one stage's fp32 operand
    tiles), and ``fixed`` (one copy of the operands of the products, staged for their layout conversion;
    bytes, or a function of the chunk), fit the per-block limit; ``PlanError`` below ``MIN_DOT`` channels."""
    def bound_at(k: int, s: int) -> int:
        return max(SMEM_HEADROOM * s * operands(k), fixed(k) if callable(fixed) else fixed)

    stages = _stages(target, stages)
    if _interpreting(target):
        return bc, 1, bound_at(bc, 1)
    while True:
        while stages > 1 and bound_at(bc, stages) > target.smem_per_block:
            stages -= 1
        bound = bound_at(bc, stages)
        if bound <= target.smem_per_block:
            return bc, stages, bound
        if bc <= MIN_DOT:
            raise PlanError(f"no {what} tiles fit {target.name}: {target.smem_per_block / 1024:.0f} KiB of shared "
                            f"memory per block, the smallest plan needs {bound / 1024:.0f} KiB")
        bc //= 2


def _stream_plan(b: int, n: int, target: Target) -> KernelPlan:
    bc, bn = INTERPRETER_STREAM_TILE if _interpreting(target) else STREAM_TILE
    return KernelPlan(grid=(b, _cdiv(n, bn)), constexprs=dict(BLOCK_C=bc, BLOCK_N=bn), num_warps=STREAM_WARPS,
                      num_stages=1, smem_bound=tile_bound((bc, bn)), options=_options(target))


# ---------------------------------------------------------------------------- part attention

def attention_stats(b: int, c: int, n: int, dtype: torch.dtype, target: Target) -> KernelPlan:
    """Token mean / rstd: one program per (sample, token block)."""
    return _stream_plan(b, n, target)


def attention_scores(b: int, c: int, n: int, p: int, h: int, dtype: torch.dtype, target: Target,
                     dot_precision: str = "tf32") -> KernelPlan:
    """S = G @ Xc for all heads: [hP, C] x [C, N] per sample; grid (query block x sample, token block)."""
    return _gemm_plan(lambda tm, tn: (_cdiv(h * p, tm) * b, _cdiv(n, tn)), target, h * p, n, c,
                      ("BLOCK_Q", "BLOCK_N", "BLOCK_K"), dot_constexpr(target, dot_precision))


def attention_softmax(rows: int, n: int, target: Target) -> KernelPlan:
    """Softmax of ``rows`` rows of ``n`` tokens in place."""
    br, bn = row_block(n, target)
    return KernelPlan(grid=(_cdiv(rows, br),), constexprs=dict(BLOCK_R=br, BLOCK_N=bn), num_warps=ROW_WARPS,
                      num_stages=1, smem_bound=tile_bound((br, bn)), options=_options(target))


def attention_parts(b: int, c: int, n: int, p: int, h: int, dtype: torch.dtype, target: Target,
                    dot_precision: str = "tf32") -> KernelPlan:
    """parts_j = gamma * ((probs_j * rstd) @ Xc_j^T) + beta: [P, N] x [N, d] per sample and head;
    grid (query block x sample, head x channel block)."""
    d = c // h
    return _gemm_plan(lambda tm, tn: (_cdiv(p, tm) * b, h * _cdiv(d, tn)), target, p, d, n,
                      ("BLOCK_P", "BLOCK_C", "BLOCK_K"), dot_constexpr(target, dot_precision))


def attention_dp(b: int, c: int, n: int, p: int, h: int, dtype: torch.dtype, target: Target,
                 dot_precision: str = "tf32") -> KernelPlan:
    """dP_j = rstd * ((dparts_j * gamma) @ Xc_j): [P, d] x [d, N] per sample and head;
    grid (query block x head x sample, token block)."""
    return _gemm_plan(lambda tm, tn: (_cdiv(p, tm) * h * b, _cdiv(n, tn)), target, p, n, c // h,
                      ("BLOCK_P", "BLOCK_N", "BLOCK_K"), dot_constexpr(target, dot_precision))


def attention_softmax_bwd(rows: int, n: int, target: Target, has_dattn: bool = True) -> KernelPlan:
    """dS = probs * (dP' - rowsum(probs * dP')) in place over ``rows`` rows of ``n`` tokens."""
    br, bn = row_block(n, target)
    return KernelPlan(grid=(_cdiv(rows, br),), constexprs=dict(HAS_DATTN=has_dattn, BLOCK_R=br, BLOCK_N=bn),
                      num_warps=ROW_WARPS, num_stages=1, smem_bound=tile_bound((br, bn)), options=_options(target))


def attention_dg(b: int, c: int, n: int, p: int, h: int, dtype: torch.dtype, target: Target,
                 dot_precision: str = "tf32") -> KernelPlan:
    """dG_j = sum_b (dS_b,j * rstd_b) @ Xc_b^T: [P, B*N] x [B*N, C]; grid (head, query block, channel
    block), the batch loop inside."""
    return _gemm_plan(lambda tm, tn: (h, _cdiv(p, tm), _cdiv(c, tn)), target, p, c, n,
                      ("BLOCK_P", "BLOCK_C", "BLOCK_N"), dot_constexpr(target, dot_precision))


def attention_dxhat(b: int, c: int, n: int, p: int, h: int, dtype: torch.dtype, target: Target,
                    dot_precision: str = "tf32", needs_dx: bool = True, dgamma: bool = True) -> KernelPlan:
    """V = dparts_j^T @ probs_j ([d, P] x [P, N]), with ``dgamma`` gamma's partial gradients and, with
    ``needs_dx``, dxhat = G^T @ dS + gamma * V ([C, hP] x [hP, N]); grid (channel block x head x sample,
    token block)."""
    d = c // h
    return _gemm_plan(lambda tm, tn: (_cdiv(d, tm) * h * b, _cdiv(n, tn)), target, d, n, p,
                      ("BLOCK_C", "BLOCK_N", "BLOCK_K"), dot_constexpr(target, dot_precision),
                      accumulators=2 if needs_dx else 1, NEEDS_DX=needs_dx, DGAMMA=dgamma)


def attention_dx(b: int, c: int, n: int, dtype: torch.dtype, target: Target) -> KernelPlan:
    """LayerNorm backward: one program per (sample, token block)."""
    return _stream_plan(b, n, target)


# ------------------------------------------------------------------ part attention, short rows
# Where a whole row of scores fits (N <= ROW_TOKENS), one kernel per direction keeps the rows on chip: the
# forward computes scores, token statistics, softmax and parts; the backward dP, the softmax backward and
# gamma's and beta's partial gradients (dG stays the tiled GEMM: it sums over the batch). Their tiles
# follow the head's rule (kernels/plans_c2f_head.py): rows per block from a per-thread register budget, the
# channel chunk and stages shrunk by ``fit_channels`` until the shared-memory bound fits the target.
ROW_TOKENS = 256        # whole rows of next_pow2(N) <= 256 tokens: N = 196 (14 x 14) in one block
ROWS_WARPS = 8
ROWS_VALUES = 64        # fp32 values per thread in the row tiles held together (the head's budget)
ROWS_FWD_BLOCK_Q = 32   # forward: queries per program (cap); S, then probs and probs * rstd: 2 tiles
ROWS_FWD_TILES = 2
ROWS_BWD_BLOCK_Q = 16   # backward: queries per program (cap); probs * rstd and dP through the channel loop,
ROWS_BWD_TILES = 2      # probs after it
ROWS_FWD_BLOCK_K = 32   # channels per chunk (cap), both passes ...
ROWS_FWD_STAGES = 2     # ... one x chunk in flight while the other is consumed
ROWS_BWD_BLOCK_K = 32
ROWS_BWD_STAGES = 2
ROWS_BWD_STAGES_HIP = 1  # AMD: 2 stages spilled 25-33 B at 256 VGPRs (gfx950, fp32 operands)
INTERPRETER_ROWS = (128, 256)   # (BLOCK_Q, BLOCK_K): few programs and loop trips on CPU


def _rows_plan(b: int, c: int, n: int, p: int, h: int, target: Target, dot_precision: str, cap: int, tiles: int,
               chunk: int, stages: int, what: str, **flags) -> KernelPlan:
    """A short-row kernel's plan: one program per (sample, head, query block) over whole rows of N tokens."""
    bn = max(MIN_DOT, next_pow2(n))
    if bn > ROW_TOKENS:
        raise PlanError(f"the {what} kernel holds whole rows of at most {ROW_TOKENS} tokens, got N = {n}")
    d = c // h
    if _interpreting(target):
        bq, bk = fit_tile(INTERPRETER_ROWS[0], p), fit_tile(INTERPRETER_ROWS[1], d)
    else:
        bq = rows_per_block(cap, p, tiles, bn, target, ROWS_VALUES, ROWS_WARPS)
        bk = fit_tile(chunk, d)
    # A stage: a [BLOCK_Q, BLOCK_K] chunk of g (dparts) and a [BLOCK_K, BLOCK_N] chunk of x. Staged for
    # the products besides: the row tile probs * rstd, and the centred x chunk in both orientations (the
    # backward multiplies it from both sides; measured 80 KiB at [16, 256] rows and 32 channels, sm_86).
    bk, stages, bound = fit_channels(target, bk, stages, lambda k: (bq * k + k * bn) * FP32_BYTES,
                                     f"short-row {what}", fixed=lambda k: tile_bound((bq, bn), (k, bn), (bn, k)))
    return KernelPlan(grid=(b * h * _cdiv(p, bq),),
                      constexprs=dict(flags, BLOCK_Q=bq, BLOCK_N=bn, BLOCK_K=bk,
                                      DOT_PRECISION=dot_constexpr(target, dot_precision)),
                      num_warps=4 if _interpreting(target) else ROWS_WARPS, num_stages=stages, smem_bound=bound,
                      options=_options(target))


def attention_fwd_rows(b: int, c: int, n: int, p: int, h: int, dtype: torch.dtype, target: Target,
                       dot_precision: str = "tf32") -> KernelPlan:
    """Short rows: scores with the token statistics, softmax and parts in one kernel; grid (query block x
    head x sample)."""
    return _rows_plan(b, c, n, p, h, target, dot_precision, ROWS_FWD_BLOCK_Q, ROWS_FWD_TILES, ROWS_FWD_BLOCK_K,
                      ROWS_FWD_STAGES, "forward")


def attention_bwd_rows(b: int, c: int, n: int, p: int, h: int, dtype: torch.dtype, target: Target,
                       dot_precision: str = "tf32", has_dparts: bool = True, has_dattn: bool = True) -> KernelPlan:
    """Short rows: dP, the softmax backward and gamma's and beta's partial sums in one kernel; grid (query
    block x head x sample)."""
    return _rows_plan(b, c, n, p, h, target, dot_precision, ROWS_BWD_BLOCK_Q, ROWS_BWD_TILES, ROWS_BWD_BLOCK_K,
                      ROWS_BWD_STAGES_HIP if target.backend == "hip" else ROWS_BWD_STAGES, "backward",
                      HAS_DPARTS=has_dparts, HAS_DATTN=has_dattn)


def short_rows(n: int, target: Target) -> bool:
    """Whether part attention over ``n`` tokens takes the short-row kernels on ``target``: a whole row fits
    (``next_pow2(n) <= ROW_TOKENS``), both short-row plans fit the target's limits at their full tiles, and
    so do the tiled GEMMs the backward still runs after them (dG; dxhat for dx): an op whose forward runs
    must have a backward. Elsewhere the tiled kernels run (tiles independent of N, every target)."""
    try:
        gemm_tiles(target, accumulators=2)
        attention_fwd_rows(1, ROWS_FWD_BLOCK_K, n, ROWS_FWD_BLOCK_Q, 1, torch.float32, target)
        attention_bwd_rows(1, ROWS_BWD_BLOCK_K, n, ROWS_BWD_BLOCK_Q, 1, torch.float32, target)
    except PlanError:
        return False
    return True


# ---------------------------------------------------------------------------- part mixup
# Mixup streams [B, P, C] once at a few FLOPs per byte: tiles are sized for bytes in flight, not reuse.
PAIR_BLOCK_P = 8           # in-place mix: [8, 512] tiles of both rows of a pair, 16 fp32 values
PAIR_BLOCK_C = 512         # per thread and row with 8 warps: 64 KiB of a pair in flight per program
PAIR_NUM_WARPS = 8
POOL_BLOCK_K = 32          # views per program; K = 32 fits one block, more views add grid axis 2
POOL_FWD_BLOCK_P = 16      # forward: [BLOCK_K, 16] masks x [16, 128] parts of both samples per step
POOL_FWD_BLOCK_C = 128     # into an fp32 [BLOCK_K, 128] accumulator; [.., 32] chunks spilled
POOL_FWD_NUM_STAGES = 3    # the forward loops over P / 16 part chunks: two in flight while one is used
POOL_BWD_BLOCK_P = 32      # backward writes d parts in [32, 128] tiles contracting over the views;
POOL_BWD_BLOCK_C = 128     # [64, 128] tiles spilled at K = 32 (fp32 and bf16, sm_80)
POOL_BWD_NUM_STAGES = 1    # its loop runs over view blocks, once for K <= 32: nothing to pipeline
POOL_NUM_WARPS = 8         # with 4 warps the fp32 (3xTF32) tiles need > 255 registers and spill


def mixup_pairs(b: int, p: int, c: int, dtype: torch.dtype, target: Target) -> KernelPlan:
    """In-place pair mix (forward and backward): one program per (sample, part block, channel block)."""
    bp, bc = min(PAIR_BLOCK_P, next_pow2(p)), min(PAIR_BLOCK_C, next_pow2(c))
    return KernelPlan(grid=(b, _cdiv(p, bp), _cdiv(c, bc)), constexprs=dict(BLOCK_P=bp, BLOCK_C=bc),
                      num_warps=PAIR_NUM_WARPS, num_stages=1, smem_bound=tile_bound((bp, bc), (bp, bc)),
                      options=_options(target))


def _pool_dot(dtype: torch.dtype, target: Target) -> dict:
    """Mask dots of the pooled mix (``part_mixup._mask_dot``): 16-bit parts are multiplied in their own
    dtype, exact, with the fp32 mask as two 16-bit pieces (``SPLIT``); fp32 parts at an fp32-accurate
    precision: three TF32 products on NVIDIA, fp32 MFMA on AMD, exact under the interpreter."""
    if dtype == torch.float32:
        return dict(PRECISION="tf32x3" if target.backend == "cuda" else "ieee", SPLIT=False)
    return dict(PRECISION=dot_constexpr(target, "bf16" if dtype == torch.bfloat16 else "fp16"), SPLIT=True)


def _pool_plan(grid, extents: dict[str, int], blocks: dict[str, int], stages: int, dtype, target) -> KernelPlan:
    """A pooled-mix plan: ``blocks`` (BLOCK_K, BLOCK_P, BLOCK_C) clamped to ``extents``; on a GPU, stages
    and then the channel block shrink until the bound (``SMEM_HEADROOM`` x stages x the fp32 operand
    tiles: the mask and the two samples' rows) fits the target's per-block limit."""
    sizes = {name: fit_tile(block, extents[name]) for name, block in blocks.items()}
    stages = _stages(target, stages)
    while True:
        operands = tile_bound(*_pool_operands(blocks, sizes))
        while not _interpreting(target) and stages > 1 and SMEM_HEADROOM * stages * operands > target.smem_per_block:
            stages -= 1
        if _interpreting(target) or SMEM_HEADROOM * stages * operands <= target.smem_per_block:
            break
        if sizes["BLOCK_C"] <= MIN_DOT:
            raise PlanError(f"no pooled-mixup tiles fit {target.name}: {target.smem_per_block / 1024:.0f} KiB of "
                            f"shared memory per block, the smallest plan needs {SMEM_HEADROOM * operands / 1024:.0f} KiB")
        sizes["BLOCK_C"] //= 2
    return KernelPlan(grid=grid(sizes), constexprs=dict(**_pool_dot(dtype, target), **sizes),
                      num_warps=POOL_NUM_WARPS, num_stages=stages, smem_bound=SMEM_HEADROOM * stages * operands,
                      options=_options(target))


def _pool_operands(blocks: dict[str, int], sizes: dict[str, int]):
    """The operand tiles of a pool kernel: the mask and the two samples' rows, the first dot extent
    being the output rows (views in the forward, parts in the backward) and BLOCK_C the columns."""
    k, p, c = sizes["BLOCK_K"], sizes["BLOCK_P"], sizes["BLOCK_C"]
    inner = p if next(iter(blocks)) == "BLOCK_K" else k      # the contracted extent
    return (k, p), (inner, c), (inner, c)


def mixup_pool_fwd(k: int, b: int, p: int, c: int, dtype: torch.dtype, target: Target) -> KernelPlan:
    """Pooled mix: one program per (sample, channel block, view block)."""
    return _pool_plan(lambda s: (b, _cdiv(c, s["BLOCK_C"]), _cdiv(k, s["BLOCK_K"])), dict(BLOCK_K=k, BLOCK_P=p, BLOCK_C=c),
                      dict(BLOCK_K=POOL_BLOCK_K, BLOCK_P=POOL_FWD_BLOCK_P, BLOCK_C=POOL_FWD_BLOCK_C),
                      POOL_FWD_NUM_STAGES, dtype, target)


def mixup_pool_bwd(k: int, b: int, p: int, c: int, dtype: torch.dtype, target: Target) -> KernelPlan:
    """Gradient of the pooled mix: one program per (sample, part block, channel block)."""
    return _pool_plan(lambda s: (b, _cdiv(p, s["BLOCK_P"]), _cdiv(c, s["BLOCK_C"])), dict(BLOCK_K=k, BLOCK_P=p, BLOCK_C=c),
                      dict(BLOCK_P=POOL_BWD_BLOCK_P, BLOCK_K=POOL_BLOCK_K, BLOCK_C=POOL_BWD_BLOCK_C),
                      POOL_BWD_NUM_STAGES, dtype, target)
