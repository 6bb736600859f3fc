"""Launch plans of part attention (``kernels/part_attention.py``), by the convention of ``plans.py``: tiles
from the target's limits, ``smem_bound`` set, ``PlanError`` when nothing fits.

- The tiled GEMMs (scores, parts, dP, dG, dxhat) take ``plans.gemm_plan`` as they are.
- The row kernels (the softmax and its backward) hold whole rows, ``BLOCK_N = next_pow2(N)`` wide (at most
  ``plans.MAX_TOKENS``), and as many rows as make ``ROW_VALUES`` fp32 values per thread: twice the rows
  with 64-lane wavefronts.
- The streaming kernels (statistics, the LayerNorm backward) read [64, 32] tiles: bytes in flight, not
  reuse. The C2F head runs these two kernels and dG as they are.
- Short rows (``short_rows``: ``next_pow2(N) <= ROW_TOKENS`` and the plans fit): one forward and one
  backward kernel per (sample, head, query block) hold whole rows of scores on chip instead of the tiled
  kernels and their row kernels; their rule is the head's (``plans.rows_per_block``,
  ``plans.shrink_to_fit``), below.
"""
from __future__ import annotations

import torch

from .launch import KernelPlan, next_pow2
from .plans import (
    FP32_BYTES,
    MAX_TOKENS,
    MIN_DOT,
    PlanError,
    cdiv,
    compile_options,
    dot_constexpr,
    fit_tile,
    gemm_plan,
    gemm_tiles,
    is_interpreter,
    rows_per_block,
    shrink_to_fit,
    tile_bound,
)
from .targets import Target

ROW_VALUES = 16         # fp32 values per thread in the row kernels (whole rows, registers only): the
ROW_WARPS = 4           # softmax backward holds three such tiles and its row offsets; 32 spilled (sm_86)
INTERPRETER_ROW_TILE = 1 << 16
STREAM_TILE = (64, 32)  # statistics and dx: [channels, tokens] tiles, 7 programs per sample at N = 196
INTERPRETER_STREAM_TILE = (512, 256)
STREAM_WARPS = 4


def row_block(n: int, target: Target) -> tuple[int, int]:
    """``(BLOCK_R, BLOCK_N)`` of the row kernels: whole rows of ``n`` tokens."""
    if n > MAX_TOKENS:
        raise PlanError(f"the softmax holds whole rows of at most {MAX_TOKENS} tokens, got N = {n}")
    bn = max(MIN_DOT, next_pow2(n))
    tile = INTERPRETER_ROW_TILE if is_interpreter(target) else ROW_VALUES * ROW_WARPS * target.warp_size
    return max(1, tile // bn), bn


def _stream_plan(b: int, n: int, target: Target) -> KernelPlan:
    bc, bn = INTERPRETER_STREAM_TILE if is_interpreter(target) else STREAM_TILE
    return KernelPlan(grid=(b, cdiv(n, bn)), constexprs=dict(BLOCK_C=bc, BLOCK_N=bn), num_warps=STREAM_WARPS,
                      num_stages=1, smem_bound=tile_bound((bc, bn)), options=compile_options(target))


def _row_plan(rows: int, n: int, target: Target, **flags) -> KernelPlan:
    br, bn = row_block(n, target)
    return KernelPlan(grid=(cdiv(rows, br),), constexprs=dict(flags, BLOCK_R=br, BLOCK_N=bn), num_warps=ROW_WARPS,
                      num_stages=1, smem_bound=tile_bound((br, bn)), options=compile_options(target))


# ------------------------------------------------------------------------------------ tiled kernels

def attention_stats(b: int, c: int, n: int, dtype: torch.dtype, target: Target) -> KernelPlan:
    """Token mean / rstd: one program per (sample, token block)."""
    return _stream_plan(b, n, target)


def attention_scores(b: int, c: int, n: int, p: int, h: int, dtype: torch.dtype, target: Target,
                     dot_precision: str = "tf32") -> KernelPlan:
    """S = G @ Xc for all heads: [hP, C] x [C, N] per sample; grid (query block x sample, token block)."""
    return gemm_plan(lambda tm, tn: (cdiv(h * p, tm) * b, cdiv(n, tn)), target, h * p, n, c,
                     ("BLOCK_Q", "BLOCK_N", "BLOCK_K"), dot_constexpr(target, dot_precision))


def attention_softmax(rows: int, n: int, target: Target) -> KernelPlan:
    """Softmax of ``rows`` rows of ``n`` tokens in place."""
    return _row_plan(rows, n, target)


def attention_parts(b: int, c: int, n: int, p: int, h: int, dtype: torch.dtype, target: Target,
                    dot_precision: str = "tf32") -> KernelPlan:
    """parts_j = gamma * ((probs_j * rstd) @ Xc_j^T) + beta: [P, N] x [N, d] per sample and head;
    grid (query block x sample, head x channel block)."""
    d = c // h
    return gemm_plan(lambda tm, tn: (cdiv(p, tm) * b, h * cdiv(d, tn)), target, p, d, n,
                     ("BLOCK_P", "BLOCK_C", "BLOCK_K"), dot_constexpr(target, dot_precision))


def attention_dp(b: int, c: int, n: int, p: int, h: int, dtype: torch.dtype, target: Target,
                 dot_precision: str = "tf32") -> KernelPlan:
    """dP_j = rstd * ((dparts_j * gamma) @ Xc_j): [P, d] x [d, N] per sample and head;
    grid (query block x head x sample, token block)."""
    return gemm_plan(lambda tm, tn: (cdiv(p, tm) * h * b, cdiv(n, tn)), target, p, n, c // h,
                     ("BLOCK_P", "BLOCK_N", "BLOCK_K"), dot_constexpr(target, dot_precision))


def attention_softmax_bwd(rows: int, n: int, target: Target, has_dattn: bool = True) -> KernelPlan:
    """dS = probs * (dP' - rowsum(probs * dP')) in place over ``rows`` rows of ``n`` tokens."""
    return _row_plan(rows, n, target, HAS_DATTN=has_dattn)


def attention_dg(b: int, c: int, n: int, p: int, h: int, dtype: torch.dtype, target: Target,
                 dot_precision: str = "tf32") -> KernelPlan:
    """dG_j = sum_b (dS_b,j * rstd_b) @ Xc_b^T: [P, B*N] x [B*N, C]; grid (head, query block, channel
    block), the batch loop inside."""
    return gemm_plan(lambda tm, tn: (h, cdiv(p, tm), cdiv(c, tn)), target, p, c, n,
                     ("BLOCK_P", "BLOCK_C", "BLOCK_N"), dot_constexpr(target, dot_precision))


def attention_dxhat(b: int, c: int, n: int, p: int, h: int, dtype: torch.dtype, target: Target,
                    dot_precision: str = "tf32", needs_dx: bool = True, dgamma: bool = True) -> KernelPlan:
    """V = dparts_j^T @ probs_j ([d, P] x [P, N]), with ``dgamma`` gamma's partial gradients and, with
    ``needs_dx``, dxhat = G^T @ dS + gamma * V ([C, hP] x [hP, N]); grid (channel block x head x sample,
    token block)."""
    d = c // h
    return gemm_plan(lambda tm, tn: (cdiv(d, tm) * h * b, cdiv(n, tn)), target, d, n, p,
                     ("BLOCK_C", "BLOCK_N", "BLOCK_K"), dot_constexpr(target, dot_precision),
                     accumulators=2 if needs_dx else 1, NEEDS_DX=needs_dx, DGAMMA=dgamma)


def attention_dx(b: int, c: int, n: int, dtype: torch.dtype, target: Target) -> KernelPlan:
    """LayerNorm backward: one program per (sample, token block)."""
    return _stream_plan(b, n, target)


# ---------------------------------------------------------------------------------------- short rows
# Where a whole row of scores fits (N <= ROW_TOKENS), one kernel per direction keeps the rows on chip: the
# forward computes scores, token statistics, softmax and parts; the backward dP, the softmax backward and
# gamma's and beta's partial gradients (dG stays the tiled GEMM: it sums over the batch). Their tiles
# follow the head's rule (kernels/plans_c2f_head.py): rows per block from a per-thread register budget, the
# channel chunk and stages shrunk by ``shrink_to_fit`` until the shared-memory bound fits the target.
ROW_TOKENS = 256        # whole rows of next_pow2(N) <= 256 tokens: N = 196 (14 x 14) in one block
ROWS_WARPS = 8
ROWS_VALUES = 64        # fp32 values per thread in the row tiles held together (the head's budget)
ROWS_FWD_BLOCK_Q = 32   # forward: queries per program (cap); S, then probs and probs * rstd: 2 tiles
ROWS_FWD_TILES = 2
ROWS_BWD_BLOCK_Q = 16   # backward: queries per program (cap); probs * rstd and dP through the channel loop,
ROWS_BWD_TILES = 2      # probs after it
ROWS_FWD_BLOCK_K = 32   # channels per chunk (cap), both passes ...
ROWS_FWD_STAGES = 2     # ... one x chunk in flight while the other is consumed
ROWS_FWD_STATS_STAGES_HIP = 1  # AMD, statistics given: with 2 stages x's chunks are pipelined through LDS and
                               # the kernel took 314-354 VGPRs (gfx950, N=196; zero occupancy), 254 without
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
    if is_interpreter(target):
        bq, bk = fit_tile(INTERPRETER_ROWS[0], p), fit_tile(INTERPRETER_ROWS[1], d)
    else:
        bq = rows_per_block(cap, p, tiles, bn, target, ROWS_VALUES, ROWS_WARPS)
        bk = fit_tile(chunk, d)
    # A stage: a [BLOCK_Q, BLOCK_K] chunk of g (dparts) and a [BLOCK_K, BLOCK_N] chunk of x. Staged for
    # the products besides: the row tile probs * rstd, and the centred x chunk in both orientations (the
    # backward multiplies it from both sides; measured 80 KiB at [16, 256] rows and 32 channels, sm_86).
    bk, stages, bound = shrink_to_fit(target, bk, stages, lambda k: (bq * k + k * bn) * FP32_BYTES,
                                      f"short-row {what}", fixed=lambda k: tile_bound((bq, bn), (k, bn), (bn, k)))
    return KernelPlan(grid=(b * h * cdiv(p, bq),),
                      constexprs=dict(flags, BLOCK_Q=bq, BLOCK_N=bn, BLOCK_K=bk,
                                      DOT_PRECISION=dot_constexpr(target, dot_precision)),
                      num_warps=4 if is_interpreter(target) else ROWS_WARPS, num_stages=stages, smem_bound=bound,
                      options=compile_options(target))


def attention_fwd_rows(b: int, c: int, n: int, p: int, h: int, dtype: torch.dtype, target: Target,
                       dot_precision: str = "tf32", has_stats: bool = False) -> KernelPlan:
    """Short rows: scores with the token statistics (read instead with ``has_stats``), softmax and parts in one
    kernel; grid (query block x head x sample)."""
    stages = ROWS_FWD_STATS_STAGES_HIP if has_stats and target.backend == "hip" else ROWS_FWD_STAGES
    return _rows_plan(b, c, n, p, h, target, dot_precision, ROWS_FWD_BLOCK_Q, ROWS_FWD_TILES, ROWS_FWD_BLOCK_K,
                      stages, "forward", HAS_STATS=has_stats)


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
