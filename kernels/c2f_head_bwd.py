"""Fused C2F head backward kernels (docs/design.md, "The algebra" 4 and 8).

From the saved probabilities P_j, readout Zhat_j and token statistics, with the pooled rows' gradient
``dU = drows @ wcg`` and ``dcoef_j = (dU @ Xc_j) * rstd`` (``_c2f_head_pool_kernel``)::

    dP_j = dattn / h + dpred * Zhat_j + M_b^T dcoef_j        dS_j = P_j * (dP_j - rowsum(P_j * dP_j))
    dZ_j = P_j * dpred
    dG_j = sum_b (dS_j * rstd) Xc^T                          dWrg_j = sum_b (dZ_j * rstd) Xc_j^T
    dxhat[c] = sum_i G_i^T dS_i + Wrg_j^T dZ_j + dU_j^T coef_j   (j the head of channel c)

- ``_c2f_head_bwd_kernel``: per (sample, head, query block): dS and dZ; no pass over x (past 256
  tokens two passes over token chunks, so no tile spans all of them).
- ``_c2f_head_bwd_dwrg_kernel``: dWrg with the batch loop inside, one output tile per program
  (several heads; one head stacks dZ under dS for the attention's dG kernel instead).
- ``_c2f_head_bwd_dxhat_kernel``: dxhat per (sample, head, channel block, token block), only when dx
  is asked for;
  the attention's ``_part_attention_bwd_dx_kernel`` turns it into dx.
"""
import triton
import triton.language as tl

from .dots import mma
from .part_attention_bwd import rows_times_centred_x


@triton.jit
def _probs_and_dp(Probs_ptr, Zhat_ptr, M_ptr, DAttn_ptr, DCoef_ptr, b, j, p, p_mask, dpred, n, n_mask, N, P, H, V,
                  stride_dab, stride_dah, inv_h, HAS_DATTN: tl.constexpr, HAS_DPRED: tl.constexpr,
                  HAS_DCOEF: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                  DOT_PRECISION: tl.constexpr):
    """``(P_j, dP_j)`` on the tokens ``n`` of the queries ``p``: [BLOCK_P, BLOCK_N] fp32."""
    pn_mask = p_mask[:, None] & n_mask[None, :]
    pn = p[:, None] * N + n[None, :]
    dp = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    if HAS_DCOEF:
        for v0 in range(0, V, BLOCK_V):
            v = v0 + tl.arange(0, BLOCK_V)
            v_mask = v < V
            mt = tl.load(M_ptr + b * V * P + (p[:, None] + v[None, :] * P), mask=p_mask[:, None] & v_mask[None, :],
                         other=0.0)
            dcoef = tl.load(DCoef_ptr + (b * H + j) * V * N + (v[:, None] * N + n[None, :]),
                            mask=v_mask[:, None] & n_mask[None, :], other=0.0)
            dp = mma(mt, dcoef, dp, DOT_PRECISION)
    if HAS_DATTN:
        dattn = tl.load(DAttn_ptr + b * stride_dab + j * stride_dah + pn, mask=pn_mask, other=0.0)
        dp += dattn.to(tl.float32) * inv_h
    if HAS_DPRED:
        zhat = tl.load(Zhat_ptr + (b * H + j) * P * N + pn, mask=pn_mask, other=0.0)
        dp += zhat * dpred[:, None]
    probs = tl.load(Probs_ptr + (b * H + j) * P * N + pn, mask=pn_mask, other=0.0)
    return probs, dp


@triton.jit(do_not_specialize=["N", "H", "stride_tb"])
def _c2f_head_bwd_kernel(
    Probs_ptr,        # [B, h, P, N] fp32
    Zhat_ptr,         # [B, h, P, N] fp32 (HAS_DPRED)
    M_ptr,            # [B, V, P] fp32 pooling matrix (HAS_DCOEF)
    DAttn_ptr,        # dattn of sample b, head j at b * stride_dab + j * stride_dah, [P, N] contiguous (HAS_DATTN)
    DPred_ptr,        # [B, P] contiguous, any float dtype (HAS_DPRED)
    DCoef_ptr,        # [B, h, V, N] fp32 (HAS_DCOEF)
    DS_ptr,           # [B, *, P, N] fp32 out, sample stride stride_tb, head j at j * P * N
    DZ_ptr,           # [B, *, P, N] fp32 out, same layout (HAS_DPRED)
    N, P, H, V,
    stride_tb,
    stride_dab, stride_dah,   # dattn [B, P, N] shared by the heads (P*N, 0), or per head [B, h, P, N]
    inv_h,
    HAS_DATTN: tl.constexpr, HAS_DPRED: tl.constexpr, HAS_DCOEF: tl.constexpr,
    SINGLE_PASS: tl.constexpr,    # all tokens in one BLOCK_N chunk; else two passes over the chunks
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # dots.mma precision
):
    pid = tl.program_id(0)
    num_pb = tl.cdiv(P, BLOCK_P)
    pb = pid % num_pb
    j = (pid // num_pb) % H
    b = (pid // (num_pb * H)).to(tl.int64)

    p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = p < P
    out_base = b * stride_tb + j * P * N
    dpred = tl.zeros([BLOCK_P], dtype=tl.float32)
    if HAS_DPRED:
        dpred = tl.load(DPred_ptr + b * P + p, mask=p_mask, other=0.0).to(tl.float32)
    # Softmax backward needs rowsum(P dP) over all tokens before any dS: with many tokens ([16, 1024]
    # tiles do not fit beside each other in registers) a first pass sums it, a second recomputes dP.
    row = tl.zeros([BLOCK_P], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_mask = n < N
        pn_mask = p_mask[:, None] & n_mask[None, :]
        pn = p[:, None] * N + n[None, :]
        probs, dp = _probs_and_dp(Probs_ptr, Zhat_ptr, M_ptr, DAttn_ptr, DCoef_ptr, b, j, p, p_mask, dpred, n,
                                  n_mask, N, P, H, V, stride_dab, stride_dah, inv_h, HAS_DATTN, HAS_DPRED,
                                  HAS_DCOEF, BLOCK_P, BLOCK_N, BLOCK_V, DOT_PRECISION)
        row += tl.sum(probs * dp, axis=1)
        if HAS_DPRED:
            tl.store(DZ_ptr + out_base + pn, probs * dpred[:, None], mask=pn_mask)
        if SINGLE_PASS:
            tl.store(DS_ptr + out_base + pn, probs * (dp - row[:, None]), mask=pn_mask)
    if not SINGLE_PASS:
        for n0 in range(0, N, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            n_mask = n < N
            probs, dp = _probs_and_dp(Probs_ptr, Zhat_ptr, M_ptr, DAttn_ptr, DCoef_ptr, b, j, p, p_mask, dpred, n,
                                      n_mask, N, P, H, V, stride_dab, stride_dah, inv_h, HAS_DATTN, HAS_DPRED,
                                      HAS_DCOEF, BLOCK_P, BLOCK_N, BLOCK_V, DOT_PRECISION)
            tl.store(DS_ptr + out_base + (p[:, None] * N + n[None, :]), probs * (dp - row[:, None]),
                     mask=p_mask[:, None] & n_mask[None, :])


@triton.jit(do_not_specialize=["B", "N", "stride_tb"])
def _c2f_head_bwd_dwrg_kernel(
    X_ptr,            # [B, C, N] any strides
    Mean_ptr,         # [B, N] fp32
    Rstd_ptr,         # [B, N] fp32
    DZ_ptr,           # [B, h, P, N] fp32, sample stride stride_tb
    DWrg_ptr,         # [P, C] fp32 out
    B, C, N, P, D,
    stride_tb,
    stride_xb, stride_xc, stride_xn,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # dots.mma precision
):
    # dWrg[:, head j] = sum_b (dZ_b,j * rstd_b) @ Xc_b,j^T: reduction length B * N (walked in BLOCK_N
    # token chunks); each program owns one output tile inside one head: no atomics, a fixed order.
    j = tl.program_id(0)
    pb = tl.program_id(1)
    cb = tl.program_id(2)
    p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    c = j * D + cb * BLOCK_C + tl.arange(0, BLOCK_C)
    p_mask = p < P
    c_mask = c < (j + 1) * D
    acc = rows_times_centred_x(X_ptr, Mean_ptr, Rstd_ptr, DZ_ptr + j * P * N, stride_tb, p, p_mask, c, c_mask,
                               B, N, stride_xb, stride_xc, stride_xn, BLOCK_P, BLOCK_N, BLOCK_C, DOT_PRECISION)
    tl.store(DWrg_ptr + (p[:, None] * C + c[None, :]), acc, mask=p_mask[:, None] & c_mask[None, :])


@triton.jit(do_not_specialize=["N", "H", "stride_tb"])
def _c2f_head_bwd_dxhat_kernel(
    G_ptr,            # [h, P, C] fp32 contiguous
    Wrg_ptr,          # [P, C] fp32 contiguous
    DS_ptr,           # [B, *, P, N] fp32, sample stride stride_tb, heads contiguous ([h * P, N])
    DZ_ptr,           # [B, *, P, N] fp32, same layout (HAS_DPRED)
    DU_ptr,           # [B, V, C] fp32 (HAS_DU)
    Coef_ptr,         # [B, h, V, N] fp32 (HAS_DU)
    DXhat_ptr,        # [B, C, N] fp32 out: gradient of the normalised tokens
    C, N, P, D, H, V,
    stride_tb,
    HAS_DPRED: tl.constexpr, HAS_DU: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_V: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # dots.mma precision
):
    # A channel block never straddles two heads: grid (sample, head x block within the head, token block).
    b = tl.program_id(0).to(tl.int64)
    num_cb = tl.cdiv(D, BLOCK_C)
    j = tl.program_id(1) // num_cb
    cb = tl.program_id(1) % num_cb
    c = j * D + cb * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < (j + 1) * D
    n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < N
    acc = tl.zeros([BLOCK_C, BLOCK_N], dtype=tl.float32)
    t_base = b * stride_tb
    # Scores: every head's queries reach every channel. G as [h * P, C] and dS_b as [h * P, N] (the
    # heads of one sample are contiguous): the sum over heads and queries is one contraction.
    HP = H * P
    for q0 in range(0, HP, BLOCK_P):
        q = q0 + tl.arange(0, BLOCK_P)
        q_mask = q < HP
        gt = tl.load(G_ptr + (q[None, :] * C + c[:, None]), mask=c_mask[:, None] & q_mask[None, :], other=0.0)
        ds = tl.load(DS_ptr + t_base + (q[:, None] * N + n[None, :]), mask=q_mask[:, None] & n_mask[None, :],
                     other=0.0)
        acc = mma(gt, ds, acc, DOT_PRECISION)
    # Readout and pooled rows: head j's only.
    if HAS_DPRED:
        for p0 in range(0, P, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            p_mask = p < P
            wt = tl.load(Wrg_ptr + (p[None, :] * C + c[:, None]), mask=c_mask[:, None] & p_mask[None, :], other=0.0)
            dz = tl.load(DZ_ptr + t_base + j * P * N + (p[:, None] * N + n[None, :]),
                         mask=p_mask[:, None] & n_mask[None, :], other=0.0)
            acc = mma(wt, dz, acc, DOT_PRECISION)
    if HAS_DU:
        for v0 in range(0, V, BLOCK_V):
            v = v0 + tl.arange(0, BLOCK_V)
            v_mask = v < V
            dut = tl.load(DU_ptr + b * V * C + (v[None, :] * C + c[:, None]), mask=c_mask[:, None] & v_mask[None, :],
                          other=0.0)
            coef = tl.load(Coef_ptr + (b * H + j) * V * N + (v[:, None] * N + n[None, :]),
                           mask=v_mask[:, None] & n_mask[None, :], other=0.0)
            acc = mma(dut, coef, acc, DOT_PRECISION)
    tl.store(DXhat_ptr + b * C * N + (c[:, None] * N + n[None, :]), acc, mask=c_mask[:, None] & n_mask[None, :])
