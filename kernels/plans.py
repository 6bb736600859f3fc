"""Launch plans: one function per kernel returning its grid, tiles, warps and stages for given shapes,
dtype and target. Launchers launch these plans and ``inspect.py`` compiles the same plans, so every
number below lives here once, with the reason for it.

GPU tiles (sm_80 / sm_90 at N = 196 -> 256 tokens per block), chosen from ptxas -v at production
sizes: every kernel without spills on both architectures.
- Forward holds S / probs [32, 256] fp32 plus a [32, 256] x chunk (BLOCK_P = 32).
- Backward holds three [BLOCK_P, 256] tiles (probs, probs * rstd, dP) plus a [32, 256] x chunk, so
  BLOCK_P = 16. dG walks its B x N reduction in 32-token chunks ([64, 32] dS, [32, 64] x tiles).
- The statistics and the dx epilogue stream x in [64, 32] tiles: 7 programs per sample at N = 196.
- num_stages = 2: one chunk in flight while the other is consumed; more costs shared memory.
- fp32 dots run in TF32 on a GPU by default (``dot_precision="tf32"``, flash-attention's choice):
  about 1e-3 relative error on the logits, below the resolution of the fp16 feature cache;
  ``"ieee"`` gives fp32 products on the FMA units.
The interpreter pays per Triton op (~0.1-1 ms of Python), not per element: big tiles, few programs
and few loop trips make the same kernels 5-10x cheaper on CPU. Correctness does not depend on the
tiles; tests also run the GPU tiles under the interpreter (``launch.plan_for``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .launch import KernelPlan, next_pow2
from .targets import Target

DOT_PRECISIONS = ("tf32", "ieee")
MIN_DOT = 16            # tl.dot wants every dimension >= 16

# ---------------------------------------------------------------------------- part attention
MAX_TOKENS = 1024       # all tokens of a sample sit in one block: up to 32 x 32 maps
TOKENS_AT_BUDGET = 256  # query blocks shrink in proportion beyond 256 padded tokens (GPU)


@dataclass(frozen=True)
class _AttentionTiles:
    fwd_p: int      # queries per forward program
    fwd_c: int      # contraction chunk of S = G (X - mean)
    fwd_d: int      # value-channel chunk of parts = (probs * rstd) (X - mean)^T
    bwd_p: int      # queries per backward program
    bwd_d: int      # channel chunk of the backward's pass over the head's channels
    dg_p: int       # dG output tile rows (queries) ...
    dg_c: int       # ... and columns (channels)
    dg_n: int       # token chunk of dG's reduction over B x N
    dx_c: int       # dxhat output tile rows (channels) ...
    dx_p: int       # ... and the contraction chunk over queries
    stats_c: int    # token statistics tile [stats_c, stats_n]
    stats_n: int
    num_warps: int
    stats_num_warps: int
    num_stages: int


_GPU = _AttentionTiles(fwd_p=32, fwd_c=32, fwd_d=32, bwd_p=16, bwd_d=32, dg_p=64, dg_c=64, dg_n=32, dx_c=64,
                       dx_p=32, stats_c=64, stats_n=32, num_warps=8, stats_num_warps=4, num_stages=2)
_INTERPRETER = _AttentionTiles(fwd_p=128, fwd_c=256, fwd_d=256, bwd_p=128, bwd_d=256, dg_p=128, dg_c=256,
                               dg_n=1024, dx_c=256, dx_p=128, stats_c=512, stats_n=256, num_warps=4,
                               stats_num_warps=4, num_stages=1)


def _tiles(target: Target) -> _AttentionTiles:
    return _INTERPRETER if target.backend == "interpreter" else _GPU


def block_n(n: int) -> int:
    """Tokens per block: all N in one power-of-two block."""
    return max(MIN_DOT, next_pow2(n))


def _block_p(p: int, bn: int, block: int) -> int:
    """Queries per program: ``block``, fewer for small P and past 256 tokens (register tiles)."""
    if bn > TOKENS_AT_BUDGET:
        block = block * TOKENS_AT_BUDGET // bn
    return max(MIN_DOT, min(block, next_pow2(p)))


def _block_d(d: int, block: int) -> int:
    """Channels per chunk: ``block``, fewer when a head (or C) is narrower."""
    return max(MIN_DOT, min(block, next_pow2(d)))


def _precision(target: Target, dot_precision: str) -> str:
    if dot_precision not in DOT_PRECISIONS:
        raise ValueError(f"dot_precision must be one of {DOT_PRECISIONS}, got {dot_precision!r}")
    return "ieee" if target.backend == "interpreter" else dot_precision


def attention_stats(b: int, c: int, n: int, target: Target) -> KernelPlan:
    t = _tiles(target)
    return KernelPlan(grid=(b, -(-n // t.stats_n)), constexprs=dict(BLOCK_C=t.stats_c, BLOCK_N=t.stats_n),
                      num_warps=t.stats_num_warps, num_stages=t.num_stages)


def attention_fwd(b: int, c: int, n: int, p: int, h: int, dtype: torch.dtype, target: Target,
                  dot_precision: str = "tf32") -> KernelPlan:
    t = _tiles(target)
    bn = block_n(n)
    bp = _block_p(p, bn, t.fwd_p)
    return KernelPlan(grid=(b * h * -(-p // bp),),
                      constexprs=dict(BLOCK_P=bp, BLOCK_N=bn, BLOCK_C=_block_d(c, t.fwd_c),
                                      BLOCK_D=_block_d(c // h, t.fwd_d),
                                      DOT_PRECISION=_precision(target, dot_precision)),
                      num_warps=t.num_warps, num_stages=t.num_stages)


def attention_bwd(b: int, c: int, n: int, p: int, h: int, dtype: torch.dtype, target: Target,
                  dot_precision: str = "tf32", has_dattn: bool = True) -> KernelPlan:
    t = _tiles(target)
    bn = block_n(n)
    bp = _block_p(p, bn, t.bwd_p)
    return KernelPlan(grid=(b * h * -(-p // bp),),
                      constexprs=dict(HAS_DATTN=has_dattn, BLOCK_P=bp, BLOCK_N=bn, BLOCK_D=_block_d(c // h, t.bwd_d),
                                      DOT_PRECISION=_precision(target, dot_precision)),
                      num_warps=t.num_warps, num_stages=t.num_stages)


def attention_query_blocks(p: int, n: int, target: Target) -> int:
    """Query blocks per (sample, head) of the backward kernel: rows of its per-program partial sums."""
    bp = _block_p(p, block_n(n), _tiles(target).bwd_p)
    return -(-p // bp)


def attention_dg(b: int, c: int, n: int, p: int, h: int, dtype: torch.dtype, target: Target,
                 dot_precision: str = "tf32") -> KernelPlan:
    t = _tiles(target)
    bn = block_n(n)
    bp = _block_p(p, bn, t.dg_p)
    bc = _block_d(c, t.dg_c)
    return KernelPlan(grid=(h, -(-p // bp), -(-c // bc)),
                      constexprs=dict(BLOCK_P=bp, BLOCK_N=min(bn, t.dg_n), BLOCK_C=bc,
                                      DOT_PRECISION=_precision(target, dot_precision)),
                      num_warps=t.num_warps, num_stages=t.num_stages)


def attention_dxhat(b: int, c: int, n: int, p: int, h: int, dtype: torch.dtype, target: Target,
                    dot_precision: str = "tf32") -> KernelPlan:
    t = _tiles(target)
    bn = block_n(n)
    bc = _block_d(c // h, t.dx_c)
    return KernelPlan(grid=(b, h, -(-(c // h) // bc)),
                      constexprs=dict(BLOCK_C=bc, BLOCK_N=bn, BLOCK_P=_block_p(p, bn, t.dx_p),
                                      DOT_PRECISION=_precision(target, dot_precision)),
                      num_warps=t.num_warps, num_stages=t.num_stages)


def attention_dx(b: int, c: int, n: int, target: Target) -> KernelPlan:
    t = _tiles(target)
    return KernelPlan(grid=(b, -(-n // t.stats_n)), constexprs=dict(BLOCK_C=t.stats_c, BLOCK_N=t.stats_n),
                      num_warps=t.stats_num_warps, num_stages=t.num_stages)


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
POOL_FP32_PRECISION = "tf32x3"  # fp32 parts: three TF32 products give ~fp32 accuracy on tensor cores;
                                # "ieee" runs on FMA units and spills the [32, 128] tiles


def mixup_pairs(b: int, p: int, c: int, dtype: torch.dtype, target: Target) -> KernelPlan:
    """In-place pair mix (forward and backward): one program per (sample, part block, channel block)."""
    bp, bc = min(PAIR_BLOCK_P, next_pow2(p)), min(PAIR_BLOCK_C, next_pow2(c))
    return KernelPlan(grid=(b, -(-p // bp), -(-c // bc)), constexprs=dict(BLOCK_P=bp, BLOCK_C=bc),
                      num_warps=PAIR_NUM_WARPS, num_stages=1)


def _pool_dot(dtype: torch.dtype, target: Target) -> dict:
    """16-bit operands go to tl.dot as stored (exact, tensor cores), fp32 ones at POOL_FP32_PRECISION;
    the interpreter's bf16 dot is broken, so there bf16 is upcast."""
    interp = target.backend == "interpreter"
    upcast = dtype == torch.float32 or (dtype == torch.bfloat16 and interp)
    return dict(UPCAST=upcast, PRECISION="ieee" if interp else POOL_FP32_PRECISION)


def _pool_blocks(k: int, p: int, c: int, block_p: int, block_c: int) -> tuple[int, int, int]:
    return (max(MIN_DOT, min(POOL_BLOCK_K, next_pow2(k))), max(MIN_DOT, min(block_p, next_pow2(p))),
            max(MIN_DOT, min(block_c, next_pow2(c))))


def mixup_pool_fwd(k: int, b: int, p: int, c: int, dtype: torch.dtype, target: Target) -> KernelPlan:
    """Pooled mix: one program per (sample, channel block, view block)."""
    bk, bp, bc = _pool_blocks(k, p, c, POOL_FWD_BLOCK_P, POOL_FWD_BLOCK_C)
    return KernelPlan(grid=(b, -(-c // bc), -(-k // bk)),
                      constexprs=dict(**_pool_dot(dtype, target), BLOCK_K=bk, BLOCK_P=bp, BLOCK_C=bc),
                      num_warps=POOL_NUM_WARPS, num_stages=POOL_FWD_NUM_STAGES)


def mixup_pool_bwd(k: int, b: int, p: int, c: int, dtype: torch.dtype, target: Target) -> KernelPlan:
    """Gradient of the pooled mix: one program per (sample, part block, channel block)."""
    bk, bp, bc = _pool_blocks(k, p, c, POOL_BWD_BLOCK_P, POOL_BWD_BLOCK_C)
    return KernelPlan(grid=(b, -(-p // bp), -(-c // bc)),
                      constexprs=dict(**_pool_dot(dtype, target), BLOCK_K=bk, BLOCK_P=bp, BLOCK_C=bc),
                      num_warps=POOL_NUM_WARPS, num_stages=POOL_BWD_NUM_STAGES)


# ---------------------------------------------------------------------------- c2f head
# The fused head (kernels/c2f_head.py). Its own tiles, so the attention plans can change without it.
# Forward programs hold two [BLOCK_P, BLOCK_N] fp32 accumulators (scores S and readout Zhat) where the
# attention forward holds one, plus the [BLOCK_V, BLOCK_N] pooling coefficients of the query block.
HEAD_MAX_VIEWS_BLOCK = 16   # rows of the pooling matrix M (2K: own views, then the partner's) per block:
                            # K <= 8 in one block; [64, 256] coefficient tiles spill


@dataclass(frozen=True)
class _HeadTiles:
    fwd_p: int        # queries per forward program
    fwd_c: int        # channel chunk of S = G (X - mean) and Zhat = Wrg_j (X_j - mean)
    pool_c: int       # channel chunk of the pooled rows U = (coef * rstd) (X_j - mean)^T ...
    pool_split: int   # ... and channels per pool program: a head's channels split over grid axis 1
    bwd_p: int        # queries per backward program (dS, dZ: elementwise, plus M^T dcoef) ...
    bwd_n: int        # ... and tokens per chunk: two passes over the chunks past one chunk
    dw_p: int         # dWrg output tile rows (queries) ...
    dw_c: int         # ... and columns (channels of one head)
    dw_n: int         # token chunk of dWrg's reduction over B x N
    dx_c: int         # dxhat output tile rows (channels of one head) ...
    dx_p: int         # ... and the contraction chunk over queries
    num_warps: int
    num_stages: int
    pool_num_stages: int  # the pool loops hold x in one orientation each; prefetching a second chunk spills


_HEAD_GPU = _HeadTiles(fwd_p=32, fwd_c=32, pool_c=32, pool_split=256, bwd_p=16, bwd_n=256, dw_p=64, dw_c=64,
                       dw_n=32, dx_c=64, dx_p=32, num_warps=8, num_stages=2, pool_num_stages=1)
_HEAD_INTERPRETER = _HeadTiles(fwd_p=128, fwd_c=256, pool_c=256, pool_split=4096, bwd_p=128, bwd_n=1024, dw_p=128,
                               dw_c=256, dw_n=1024, dx_c=256, dx_p=128, num_warps=4, num_stages=1, pool_num_stages=1)


def _head_tiles(target: Target) -> _HeadTiles:
    return _HEAD_INTERPRETER if target.backend == "interpreter" else _HEAD_GPU


def _head_block(count: int, block: int, bn: int = 0) -> int:
    """Rows (or channels) per block: ``block``, fewer when ``count`` is smaller, and in proportion past
    TOKENS_AT_BUDGET padded tokens when the tile spans ``bn`` tokens (register tiles)."""
    if bn > TOKENS_AT_BUDGET:
        block = block * TOKENS_AT_BUDGET // bn
    return max(MIN_DOT, min(block, next_pow2(count)))


def _head_stages(t: _HeadTiles, target: Target, stage_bytes: int) -> int:
    """Pipeline stages whose operand buffers (``stage_bytes`` each) fit the target's shared memory per block."""
    stages = t.num_stages
    while stages > 1 and stages * stage_bytes > target.smem_per_block:
        stages -= 1
    return stages


def head_query_blocks(p: int, n: int, target: Target) -> int:
    """Query blocks per (sample, head) of the forward kernel: rows of its pooling-coefficient partials."""
    return -(-p // _head_block(p, _head_tiles(target).fwd_p, block_n(n)))


def head_fwd(b: int, c: int, n: int, p: int, h: int, views: int, dtype: torch.dtype, target: Target,
             dot_precision: str = "tf32") -> KernelPlan:
    """Scores, softmax, readout and pooling coefficients: one program per (sample, head, query block)."""
    t = _head_tiles(target)
    bn = block_n(n)
    bp = _head_block(p, t.fwd_p, bn)
    bc = _head_block(c, t.fwd_c, bn)
    # A stage holds an x chunk [BLOCK_C, BLOCK_N] as loaded and the g and wrg chunks [BLOCK_P, BLOCK_C].
    stage_bytes = bc * bn * dtype.itemsize + 2 * bp * bc * 4
    return KernelPlan(grid=(b * h * -(-p // bp),),
                      constexprs=dict(BLOCK_P=bp, BLOCK_N=bn, BLOCK_C=bc,
                                      BLOCK_V=_head_block(views, HEAD_MAX_VIEWS_BLOCK),
                                      DOT_PRECISION=_precision(target, dot_precision)),
                      num_warps=t.num_warps, num_stages=_head_stages(t, target, stage_bytes))


def head_pool_splits(c: int, h: int, target: Target) -> int:
    """Pool programs per (sample, head): grid axis 1 of ``head_pool``."""
    return -(-(c // h) // _head_tiles(target).pool_split)


def head_pool(b: int, c: int, n: int, h: int, views: int, dtype: torch.dtype, target: Target,
              dot_precision: str = "tf32", has_du: bool = False) -> KernelPlan:
    """Pooled rows (and in backward the coefficient gradient): one program per (sample, head, split)."""
    t = _head_tiles(target)
    d = c // h
    split = min(t.pool_split, d)
    return KernelPlan(grid=(b * h, head_pool_splits(c, h, target)),
                      constexprs=dict(HAS_DU=has_du, SPLIT_C=split, BLOCK_V=_head_block(views, HEAD_MAX_VIEWS_BLOCK),
                                      BLOCK_N=block_n(n), BLOCK_C=_head_block(split, t.pool_c, block_n(n)),
                                      DOT_PRECISION=_precision(target, dot_precision)),
                      num_warps=t.num_warps, num_stages=t.pool_num_stages)


def head_bwd(b: int, n: int, p: int, h: int, views: int, target: Target, dot_precision: str = "tf32",
             has_dattn: bool = True, has_dpred: bool = True, has_dcoef: bool = True) -> KernelPlan:
    """dS and dZ per (sample, head, query block); no pass over x."""
    t = _head_tiles(target)
    bn = min(block_n(n), t.bwd_n)
    bp = _head_block(p, t.bwd_p)
    return KernelPlan(grid=(b * h * -(-p // bp),),
                      constexprs=dict(HAS_DATTN=has_dattn, HAS_DPRED=has_dpred, HAS_DCOEF=has_dcoef,
                                      SINGLE_PASS=bn >= n, BLOCK_P=bp, BLOCK_N=bn,
                                      BLOCK_V=_head_block(views, HEAD_MAX_VIEWS_BLOCK),
                                      DOT_PRECISION=_precision(target, dot_precision)),
                      num_warps=t.num_warps, num_stages=t.num_stages)


def head_dwrg(b: int, c: int, n: int, p: int, h: int, dtype: torch.dtype, target: Target,
              dot_precision: str = "tf32") -> KernelPlan:
    """dWrg over B x N, one program per output tile inside one head's channels (h > 1; one head stacks
    dZ under dS and runs the attention's dG kernel)."""
    t = _head_tiles(target)
    bn = block_n(n)
    bp = _head_block(p, t.dw_p, bn)
    bc = _head_block(c // h, t.dw_c)
    return KernelPlan(grid=(h, -(-p // bp), -(-(c // h) // bc)),
                      constexprs=dict(BLOCK_P=bp, BLOCK_N=min(bn, t.dw_n), BLOCK_C=bc,
                                      DOT_PRECISION=_precision(target, dot_precision)),
                      num_warps=t.num_warps, num_stages=t.num_stages)


def head_dxhat(b: int, c: int, n: int, p: int, h: int, views: int, dtype: torch.dtype, target: Target,
               dot_precision: str = "tf32", has_dpred: bool = True, has_du: bool = True) -> KernelPlan:
    """Gradient of the normalised tokens: one program per (sample, head, channel block of the head)."""
    t = _head_tiles(target)
    bn = block_n(n)
    bc = _head_block(c // h, t.dx_c, bn)
    bp = _head_block(p, t.dx_p, bn)
    # A stage holds a g^T chunk [BLOCK_C, BLOCK_P] and a dS chunk [BLOCK_P, BLOCK_N], fp32.
    stage_bytes = (bc * bp + bp * bn) * 4
    return KernelPlan(grid=(b, h, -(-(c // h) // bc)),
                      constexprs=dict(HAS_DPRED=has_dpred, HAS_DU=has_du, BLOCK_C=bc, BLOCK_N=bn, BLOCK_P=bp,
                                      BLOCK_V=_head_block(views, HEAD_MAX_VIEWS_BLOCK),
                                      DOT_PRECISION=_precision(target, dot_precision)),
                      num_warps=t.num_warps, num_stages=_head_stages(t, target, stage_bytes))
