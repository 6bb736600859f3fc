"""Launch plans of part mixup (``kernels/part_mixup.py``), by the convention of ``plans.py``.

Mixup streams [B, P, C] once at a few FLOPs per byte: tiles are sized for bytes in flight, not reuse. The
in-place mix reads [8, 512] tiles of both rows of a pair. The pooled mix contracts masks with part chunks
of both samples; its stages, then its channel block, shrink until its bound fits (``plans.shrink_to_fit``).
"""
from __future__ import annotations

import torch

from .launch import KernelPlan, next_pow2
from .plans import cdiv, compile_options, dot_constexpr, fit_tile, shrink_to_fit, tile_bound
from .targets import Target

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
    return KernelPlan(grid=(b, cdiv(p, bp), cdiv(c, bc)), constexprs=dict(BLOCK_P=bp, BLOCK_C=bc),
                      num_warps=PAIR_NUM_WARPS, num_stages=1, smem_bound=tile_bound((bp, bc), (bp, bc)),
                      options=compile_options(target))


def _pool_dot(dtype: torch.dtype, target: Target) -> dict:
    """Mask dots of the pooled mix (``part_mixup._mask_dot``): 16-bit parts are multiplied in their own
    dtype, exact, with the fp32 mask as two 16-bit pieces (``SPLIT``); fp32 parts at an fp32-accurate
    precision: three TF32 products on NVIDIA, fp32 MFMA on AMD, exact under the interpreter."""
    if dtype == torch.float32:
        return dict(PRECISION="tf32x3" if target.backend == "cuda" else "ieee", SPLIT=False)
    return dict(PRECISION=dot_constexpr(target, "bf16" if dtype == torch.bfloat16 else "fp16"), SPLIT=True)


def _pool_plan(grid, extents: dict[str, int], blocks: dict[str, int], contracted: str, stages: int,
               dtype: torch.dtype, target: Target) -> KernelPlan:
    """A pooled-mix plan: ``blocks`` (BLOCK_K, BLOCK_P, BLOCK_C) clamped to ``extents``; a stage holds the
    mask [BLOCK_K, BLOCK_P] and the two samples' rows [``contracted``, BLOCK_C] (``contracted``: the
    extent the product reduces over, parts in the forward, views in the backward)."""
    sizes = {name: fit_tile(block, extents[name]) for name, block in blocks.items()}

    def operands(bc: int) -> int:
        return tile_bound((sizes["BLOCK_K"], sizes["BLOCK_P"]), (sizes[contracted], bc), (sizes[contracted], bc))

    sizes["BLOCK_C"], stages, bound = shrink_to_fit(target, sizes["BLOCK_C"], stages, operands, "pooled-mixup")
    return KernelPlan(grid=grid(sizes), constexprs=dict(**_pool_dot(dtype, target), **sizes),
                      num_warps=POOL_NUM_WARPS, num_stages=stages, smem_bound=bound, options=compile_options(target))


def mixup_pool_fwd(k: int, b: int, p: int, c: int, dtype: torch.dtype, target: Target) -> KernelPlan:
    """Pooled mix: one program per (sample, channel block, view block)."""
    return _pool_plan(lambda s: (b, cdiv(c, s["BLOCK_C"]), cdiv(k, s["BLOCK_K"])),
                      dict(BLOCK_K=k, BLOCK_P=p, BLOCK_C=c),
                      dict(BLOCK_K=POOL_BLOCK_K, BLOCK_P=POOL_FWD_BLOCK_P, BLOCK_C=POOL_FWD_BLOCK_C), "BLOCK_P",
                      POOL_FWD_NUM_STAGES, dtype, target)


def mixup_pool_bwd(k: int, b: int, p: int, c: int, dtype: torch.dtype, target: Target) -> KernelPlan:
    """Gradient of the pooled mix: one program per (sample, part block, channel block)."""
    return _pool_plan(lambda s: (b, cdiv(p, s["BLOCK_P"]), cdiv(c, s["BLOCK_C"])),
                      dict(BLOCK_K=k, BLOCK_P=p, BLOCK_C=c),
                      dict(BLOCK_P=POOL_BWD_BLOCK_P, BLOCK_K=POOL_BLOCK_K, BLOCK_C=POOL_BWD_BLOCK_C), "BLOCK_K",
                      POOL_BWD_NUM_STAGES, dtype, target)
