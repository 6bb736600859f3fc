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
@dataclass(frozen=True)
class PartAttentionBlocks:
    """Tile sizes of the part-attention kernels (all N tokens of a sample always sit in one block)."""
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
    dot_precision: str  # input_precision of the fp32 tl.dot calls (operands are upcast to fp32)


# GPU (sm_80 / sm_90), at N = 196 -> 256 tokens per block, chosen from ptxas -v at production sizes
# (python -m c2f.kernels.inspect): every kernel without spills on both archs, shared memory < 164 KiB (A100).
# Forward holds S / probs [32, 256] fp32 plus a [32, 256] X chunk (192 / 238 registers on sm_90 /
# sm_80 at BLOCK_P = 32; 64 spilled on sm_80). Backward holds three [BLOCK_P, 256] tiles (probs,
# probs * rstd, dP) plus a [32, 256] X chunk, so BLOCK_P = 16. dG walks its B x N reduction in
# 32-token chunks ([64, 32] dS and [32, 64] X tiles; 64-token chunks sat at 255 registers on sm_80).
# The statistics and the dx epilogue stream X in [64, 32] tiles: 7 programs per sample at N = 196.
# num_stages = 2: one chunk in flight while the other is consumed; more costs shared memory.
# Dots run in TF32 (flash-attention's choice): ~1e-3 relative error on the logits, below the input
# resolution of the fp16 / bf16 feature cache. "tf32x3" spills at these tiles (~700 bytes, sm_80 and
# sm_90): fp32-accurate dots would need smaller query blocks.
PA_GPU_BLOCKS = PartAttentionBlocks(
    fwd_p=32, fwd_c=32, fwd_d=32, bwd_p=16, bwd_d=32, dg_p=64, dg_c=64, dg_n=32, dx_c=64, dx_p=32,
    stats_c=64, stats_n=32, num_warps=8, stats_num_warps=4, num_stages=2, dot_precision="tf32")

# The interpreter pays per Triton op (~0.1-1 ms of Python), not per element: big tiles, few
# programs and few loop trips make the same kernels 5-10x cheaper on CPU. Correctness does not depend
# on the tile sizes; tests also run the GPU sizes on small shapes.
PA_INTERPRETER_BLOCKS = PartAttentionBlocks(
    fwd_p=128, fwd_c=256, fwd_d=256, bwd_p=128, bwd_d=256, dg_p=128, dg_c=256, dg_n=1024, dx_c=256, dx_p=128,
    stats_c=512, stats_n=256, num_warps=4, stats_num_warps=4, num_stages=1, dot_precision="ieee")

PA_MAX_TOKENS = 1024    # up to 32 x 32 maps in one softmax block; spill-checked only at N = 196 (256)
PA_TOKENS_AT_BUDGET = 256   # query blocks shrink in proportion beyond 256 padded tokens (GPU)


def pa_blocks() -> PartAttentionBlocks:
    """The tile sizes for where the kernels run: the interpreter (TRITON_INTERPRET=1) or a GPU."""
    import os  # kept local: this section of the shared config owns no module-level imports
    return PA_INTERPRETER_BLOCKS if os.environ.get("TRITON_INTERPRET", "0") == "1" else PA_GPU_BLOCKS


def pa_block_n(n: int) -> int:
    """Tokens per block: all N in one power-of-two block (tl.dot wants every dim >= 16)."""
    return max(16, _next_pow2(n))


def pa_block_p(p: int, block_n: int, block_p: int) -> int:
    """Queries per program: ``block_p``, fewer for small P, and fewer past 256 tokens to keep the
    [BLOCK_P, BLOCK_N] register tiles in budget."""
    if block_n > PA_TOKENS_AT_BUDGET:
        block_p = block_p * PA_TOKENS_AT_BUDGET // block_n
    return max(16, min(block_p, _next_pow2(p)))


def pa_block_d(d: int, block_d: int) -> int:
    """Channels per chunk: ``block_d``, fewer when a head (or C) is narrower."""
    return max(16, min(block_d, _next_pow2(d)))


def _next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()

# ---- part mixup (kernels/part_mixup.py) ----
# Mixup streams [B, P, C] once at a few FLOPs per byte: tiles are sized for bytes in flight, not reuse.
PM_PAIR_BLOCK_P = 8             # in-place mix: [8, 512] tiles of both rows of a pair, 16 fp32 values
PM_PAIR_BLOCK_C = 512           # per thread and row with 8 warps: 64 KiB of a pair in flight per program
PM_PAIR_NUM_WARPS = 8
PM_MIN_DOT = 16                 # tl.dot wants every dim >= 16: K = 1..15 views are padded to 16 rows
PM_POOL_BLOCK_K = 32            # views per program; K = 32 fits one block, more views add grid axis 2
PM_POOL_FWD_BLOCK_P = 16        # forward: [BLOCK_K, 16] masks x [16, 128] parts of both samples per step
PM_POOL_FWD_BLOCK_C = 128       # into an fp32 [BLOCK_K, 128] accumulator; [.., 32] chunks spilled
PM_POOL_FWD_NUM_STAGES = 3      # the forward loops over P / 16 part chunks: two in flight while one is used
PM_POOL_BWD_BLOCK_P = 32        # backward writes d parts in [32, 128] tiles contracting over the views;
PM_POOL_BWD_BLOCK_C = 128       # [64, 128] tiles spilled at K = 32 (fp32 and bf16, sm_80)
PM_POOL_BWD_NUM_STAGES = 1      # its loop runs over view blocks, once for K <= 32: nothing to pipeline
PM_POOL_NUM_WARPS = 8           # with 4 warps the fp32 (3xTF32) tiles need > 255 registers and spill
PM_FP32_DOT_PRECISION = "tf32x3"  # fp32 parts: three TF32 products give ~fp32 accuracy on tensor cores;
                                  # "ieee" runs on FMA units and spills the [32, 128] tiles


def _pm_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def pm_pair_blocks(p: int, c: int) -> tuple[int, int]:
    """(BLOCK_P, BLOCK_C) of the in-place pair kernels: the configured tile, smaller for tiny P or C."""
    return min(PM_PAIR_BLOCK_P, _pm_pow2(p)), min(PM_PAIR_BLOCK_C, _pm_pow2(c))


def pm_pool_blocks(k: int, p: int, c: int, backward: bool = False) -> tuple[int, int, int]:
    """(BLOCK_K, BLOCK_P, BLOCK_C) of the pooled kernels; each at least ``PM_MIN_DOT`` for tl.dot."""
    block_p = PM_POOL_BWD_BLOCK_P if backward else PM_POOL_FWD_BLOCK_P
    block_c = PM_POOL_BWD_BLOCK_C if backward else PM_POOL_FWD_BLOCK_C
    return (max(PM_MIN_DOT, min(PM_POOL_BLOCK_K, _pm_pow2(k))),
            max(PM_MIN_DOT, min(block_p, _pm_pow2(p))),
            max(PM_MIN_DOT, min(block_c, _pm_pow2(c))))
