"""Launch plans of the fused C2F head (``kernels/c2f_head.py``), by the convention of ``plans.py``: tiles
from the target's limits, ``smem_bound`` set, ``PlanError`` when nothing fits, options from
``compile_options``. The head also runs three part-attention kernels (statistics, dG, the LayerNorm
backward) with their plans from ``plans_part_attention.py``.

Two of the head's kernels are tiled GEMMs and take ``plans.gemm_plan`` as they are: dWrg (``[P, B*N] x
[B*N, d]`` per head) and dxhat (``[d, hP] x [hP, N]`` plus the readout and pooled-row terms). The pooled
rows (``U = [2K, N] x [N, c]`` and ``dcoef = [2K, c] x [c, N]``) are GEMMs with 2K output rows in
``HEAD_POOL_*`` tiles. Two fuse row-wise work and walk the tokens in chunks of at most ``HEAD_BLOCK_N``,
so no tile depends on N beyond that: the forward (scores and readout, the softmax over the tokens, pred
and the pooling coefficients; past one chunk two passes, an online softmax) and dS / dZ (the softmax
backward; two passes past one chunk). Their rule (the channel chunk and stages also the pooled rows'):

- rows per block: at most the cap below, and as many as keep the row tiles held together (the forward's
  S and Zhat; probs, dP and Zhat in dS / dZ) at ``HEAD_ROW_VALUES`` fp32 values per thread, never below
  ``MIN_DOT``;
- shared memory: ``SMEM_HEADROOM`` x stages x the fp32 operand tiles of a channel loop, as for the
  GEMMs, and one fp32 copy of the operands of a product after the loop (``tile_bound``: its layout
  conversion); stages, then the channel chunk, shrink until that fits the target's per-block limit
  (``plans.shrink_to_fit``); below ``MIN_DOT`` channels: ``PlanError``.
- The interpreter takes all tokens in one chunk and large tiles (few Python-level ops).

The one-pass forward (the plan flag ``head_fwd_one_pass``, ``plans.PLAN_FLAGS``) is the forward's plan with
the pooled rows after the loop, in the pool kernel's own tiles (``POOL_BLOCK_N``, ``POOL_BLOCK_C``: the
forward's 256-token chunks spilled there on every NVIDIA target and gfx942, 8-728 B); its shared-memory
bound takes one staged copy of those operands too.
"""
from __future__ import annotations

import torch

from .launch import KernelPlan, next_pow2
from .plans import (
    FP32_BYTES,
    MAX_TOKENS,
    MIN_DOT,
    SMEM_HEADROOM,
    PlanError,
    cdiv,
    compile_options,
    dot_constexpr,
    fit_tile,
    gemm_plan,
    is_interpreter,
    plan_flag,
    rows_per_block,
    shrink_to_fit,
    tile_bound,
)
from .targets import Target

HEAD_VIEWS_BLOCK = 16       # rows of the pooling matrix M (2K: own views, then the partner's) per block:
                            # K <= 8 in one block; [64, 256] coefficient tiles spill
HEAD_WARPS = 8
HEAD_ROW_VALUES = 64        # fp32 values per thread in the row tiles held together: the forward's S and
                            # Zhat at [32, 256] with 8 warps of 32 lanes (no spills on sm_80 / sm_90)
HEAD_FWD_BLOCK_P = 32       # forward: queries per program (cap) ...
HEAD_FWD_BLOCK_C = 32       # ... and the channel chunk of S = G Xc, Zhat = Wrg_j Xc_j (cap)
HEAD_FWD_STAGES = 2         # one x chunk in flight while the other is consumed
HEAD_FWD_TWO_PASS_TILES = 3  # past one token chunk the forward also holds the rows' exponentials: at 32
                             # rows it spilled (sm_90, 44-920 B), so it takes 16, unpipelined (2 stages
                             # spilled 300 B with fp32 x, sm_90)
HEAD_FWD_TWO_PASS_BLOCK_C_SM90 = 16  # ... and on sm_90 a 16-channel chunk: at 32 Triton 3.6 used 255 registers
                                     # and spilled 8 B (fp32 x, N = 324); at 16, 204-214 on Triton 3.6 and 3.9
HEAD_FWD_ONE_PASS_NARROW = ("sm_80", "sm_86", "sm_89")  # the one-pass forward at N <= 256 holds 16 rows there,
                            # as past one chunk: at 32 it spilled 8-68 B (Triton 3.9; 48 B with 32-channel pool
                            # tiles), where sm_90, sm_100, sm_120 and AMD compile 32 rows without spills
HEAD_POOL_SPLIT = 256       # pooled rows: channels per program (a head's channels split over grid axis 1)
HEAD_POOL_BLOCK_C = 64      # ... U in [2K, 64] output tiles reducing over 64-token chunks, dcoef in
HEAD_POOL_BLOCK_N = 64      # [2K, 64] tiles reducing over the channels ([., 256] token chunks spilled)
HEAD_POOL_STAGES = 1        # x in one orientation per loop, unpipelined
HEAD_POOL_BLOCK_C_HIP = 32  # AMD: the dU pass at 64 spilled 4 B on gfx942 (16-bit x, N % 16 == 0)
HEAD_BWD_BLOCK_P = 16       # dS / dZ: queries per program (cap; probs, dP and Zhat tiles)
HEAD_BWD_ROW_TILES = 3
HEAD_BLOCK_N = 256          # tokens per chunk of the row kernels: N = 196 (14 x 14 maps) in one chunk

INTERPRETER_FWD = (128, 256)        # (BLOCK_P, BLOCK_C): few programs and loop trips on CPU
INTERPRETER_POOL = (4096, 256)      # (channels per program, BLOCK_C)
INTERPRETER_BWD_P = 128


def head_block_n(n: int, target: Target) -> int:
    """Tokens per chunk of the row kernels: all N up to ``HEAD_BLOCK_N`` (up to ``MAX_TOKENS`` in the
    interpreter), in a power-of-two block."""
    return max(MIN_DOT, min(next_pow2(n), MAX_TOKENS if is_interpreter(target) else HEAD_BLOCK_N))


def _head_fwd_stages(target: Target, dtype: torch.dtype, dot_precision: str, one_pass: bool = False) -> int:
    """Pipeline stages of the forward with all tokens in one chunk (``SINGLE_PASS``; ``one_pass``: with the
    plan flag ``head_fwd_one_pass``, which pools in the same launch). Measured (``kernels.inspect``, N = 196,
    32 x 256 rows): AMD takes 1 (gfx950, where the LDS allows 2: 274-284 VGPRs, no 8-wave workgroup fits a CU; 1 stage:
    149-185), and so does sm_100 with 16-bit x under fp32 dots (x widened in registers: 254 registers and
    12 B of spills at 2 stages, 239 and none at 1); sm_80 to sm_90 and sm_120 keep 2 without spills."""
    widened = dtype.itemsize == 2 and dot_precision in ("tf32", "ieee")
    if target.backend == "hip" or (target.name == "sm_100" and widened):
        return 1
    if one_pass and target.name == "sm_90" and widened:   # the one-pass forward: 8 B of spills at 2 (Triton 3.6)
        return 1
    return HEAD_FWD_STAGES


def head_fwd(b: int, c: int, n: int, p: int, h: int, views: int, dtype: torch.dtype, target: Target,
             dot_precision: str = "tf32", one_pass: bool | None = None) -> KernelPlan:
    """Scores, softmax, readout and pooling coefficients: one program per (sample, head, query block).
    ``one_pass`` (None: the plan flag ``head_fwd_one_pass``): the last query block of each (sample, head)
    also pools the rows, in ``[BLOCK_V, POOL_BLOCK_N] x [POOL_BLOCK_N, POOL_BLOCK_C]`` products after the loop."""
    one_pass = plan_flag("head_fwd_one_pass") if one_pass is None else one_pass
    bn = head_block_n(n, target)
    bv = fit_tile(HEAD_VIEWS_BLOCK, views)
    if is_interpreter(target):
        bp, bc = fit_tile(INTERPRETER_FWD[0], p), fit_tile(INTERPRETER_FWD[1], c)
    else:
        narrow = bn < n or (one_pass and target.name in HEAD_FWD_ONE_PASS_NARROW)
        bp = rows_per_block(HEAD_FWD_BLOCK_P, p, HEAD_FWD_TWO_PASS_TILES if narrow else 2, bn, target,
                            HEAD_ROW_VALUES, HEAD_WARPS)
        two_pass_sm90 = bn < n and target.name == "sm_90"
        bc = fit_tile(HEAD_FWD_TWO_PASS_BLOCK_C_SM90 if two_pass_sm90 else HEAD_FWD_BLOCK_C, c)
    # A stage: the g and wrg chunks [BLOCK_P, BLOCK_C] and an x chunk [BLOCK_C, BLOCK_N]; the epilogue
    # M [BLOCK_V, BLOCK_P] x probs [BLOCK_P, BLOCK_N] reuses the same memory.
    # One pass: the pooled rows after the loop in the pool kernel's tiles (coef [BLOCK_V, POOL_BLOCK_N] x x^T
    # [POOL_BLOCK_N, POOL_BLOCK_C]; the forward's [., 256] token chunks spilled there, 8-728 B), staged once.
    pool_n, pool_c = _pool_tiles(n, c // h, target)
    fixed = max(tile_bound((bv, bp), (bp, bn)), tile_bound((bv, pool_n), (pool_n, pool_c)) if one_pass else 0)
    stages = _head_fwd_stages(target, dtype, dot_precision, one_pass) if bn >= n else 1
    bc, stages, bound = shrink_to_fit(target, bc, stages,
                                       lambda k: (2 * bp * k + k * bn) * FP32_BYTES, "head forward", fixed=fixed)
    return KernelPlan(grid=(b * h * cdiv(p, bp),),
                      constexprs=dict(SINGLE_PASS=bn >= n, POOL_IN_PASS=one_pass, BLOCK_P=bp, BLOCK_N=bn,
                                      BLOCK_C=bc, BLOCK_V=bv, POOL_BLOCK_N=pool_n, POOL_BLOCK_C=pool_c,
                                      DOT_PRECISION=dot_constexpr(target, dot_precision)),
                      num_warps=4 if is_interpreter(target) else HEAD_WARPS, num_stages=stages, smem_bound=bound,
                      options=compile_options(target))


def _pool_tiles(n: int, split: int, target: Target) -> tuple[int, int]:
    """(token chunk, channel chunk) of the pooled rows over ``split`` channels a program."""
    bn = head_block_n(n, target) if is_interpreter(target) else fit_tile(HEAD_POOL_BLOCK_N, n)
    bc = INTERPRETER_POOL[1] if is_interpreter(target) else \
        (HEAD_POOL_BLOCK_C_HIP if target.backend == "hip" else HEAD_POOL_BLOCK_C)
    return bn, fit_tile(bc, split)


def head_pool(b: int, c: int, n: int, h: int, views: int, dtype: torch.dtype, target: Target,
              dot_precision: str = "tf32", has_du: bool = False) -> KernelPlan:
    """Pooled rows (and in backward the coefficient gradient): one program per (sample, head, split)."""
    d = c // h
    bv = fit_tile(HEAD_VIEWS_BLOCK, views)
    split = min(INTERPRETER_POOL[0] if is_interpreter(target) else HEAD_POOL_SPLIT, d)
    bn, bc = _pool_tiles(n, split, target)
    # One product at a time: coef [BLOCK_V, BLOCK_N] x x^T [BLOCK_N, BLOCK_C], then dU [BLOCK_V, BLOCK_C]
    # x x [BLOCK_C, BLOCK_N].
    bc, stages, bound = shrink_to_fit(target, bc, HEAD_POOL_STAGES,
                                       lambda k: (bv * bn + bn * k) * FP32_BYTES, "head pooled-row")
    return KernelPlan(grid=(b * h, cdiv(d, split)),
                      constexprs=dict(HAS_DU=has_du, BLOCK_V=bv, BLOCK_N=bn, BLOCK_C=bc,
                                      DOT_PRECISION=dot_constexpr(target, dot_precision)),
                      num_warps=4 if is_interpreter(target) else HEAD_WARPS, num_stages=stages, smem_bound=bound,
                      options=compile_options(target))


def head_bwd(b: int, c: int, n: int, p: int, h: int, views: int, dtype: torch.dtype, target: Target,
             dot_precision: str = "tf32", has_dattn: bool = True, has_dpred: bool = True,
             has_dcoef: bool = True) -> KernelPlan:
    """dS and dZ per (sample, head, query block); no pass over x."""
    bn = head_block_n(n, target)
    bv = fit_tile(HEAD_VIEWS_BLOCK, views)
    if is_interpreter(target):
        bp = fit_tile(INTERPRETER_BWD_P, p)
    else:
        bp = rows_per_block(HEAD_BWD_BLOCK_P, p, HEAD_BWD_ROW_TILES, bn, target, HEAD_ROW_VALUES, HEAD_WARPS)
    # M^T [BLOCK_P, BLOCK_V] x dcoef [BLOCK_V, BLOCK_N], unpipelined.
    bound = SMEM_HEADROOM * (bp * bv + bv * bn) * FP32_BYTES
    if not is_interpreter(target) and bound > target.smem_per_block:
        raise PlanError(f"no head dS tiles fit {target.name}: {target.smem_per_block / 1024:.0f} KiB of shared "
                        f"memory per block, the plan needs {bound / 1024:.0f} KiB")
    return KernelPlan(grid=(b * h * cdiv(p, bp),),
                      constexprs=dict(HAS_DATTN=has_dattn, HAS_DPRED=has_dpred, HAS_DCOEF=has_dcoef,
                                      SINGLE_PASS=bn >= n, BLOCK_P=bp, BLOCK_N=bn, BLOCK_V=bv,
                                      DOT_PRECISION=dot_constexpr(target, dot_precision)),
                      num_warps=4 if is_interpreter(target) else HEAD_WARPS, num_stages=1, smem_bound=bound,
                      options=compile_options(target))


def head_dwrg(b: int, c: int, n: int, p: int, h: int, dtype: torch.dtype, target: Target,
              dot_precision: str = "tf32") -> KernelPlan:
    """dWrg_j = sum_b (dZ_b,j * rstd_b) @ Xc_b,j^T: [P, B*N] x [B*N, d] per head (h > 1; one head stacks
    dZ under dS and runs the attention's dG kernel); grid (head, query block, channel block)."""
    d = c // h
    return gemm_plan(lambda tm, tn: (h, cdiv(p, tm), cdiv(d, tn)), target, p, d, n,
                      ("BLOCK_P", "BLOCK_C", "BLOCK_N"), dot_constexpr(target, dot_precision))


def head_dxhat(b: int, c: int, n: int, p: int, h: int, views: int, dtype: torch.dtype, target: Target,
               dot_precision: str = "tf32", has_dpred: bool = True, has_du: bool = True) -> KernelPlan:
    """dxhat = G^T dS + Wrg_j^T dZ_j + dU_j^T coef_j: [d, hP] x [hP, N] per sample and head, plus the
    readout and pooled-row terms; grid (sample, head x channel block, token block)."""
    d = c // h
    return gemm_plan(lambda tm, tn: (b, h * cdiv(d, tm), cdiv(n, tn)), target, d, n, p,
                      ("BLOCK_C", "BLOCK_N", "BLOCK_P"), dot_constexpr(target, dot_precision),
                      HAS_DPRED=has_dpred, HAS_DU=has_du, BLOCK_V=fit_tile(HEAD_VIEWS_BLOCK, views))
