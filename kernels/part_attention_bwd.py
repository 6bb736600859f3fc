"""Part attention backward kernels (folded formulation; docs/design.md, "The algebra" 4).

- ``_part_attention_bwd_dp_kernel``: ``dP_j = rstd * ((dparts_j * gamma) @ Xc)``, a GEMM over the head's
  channels tiled over queries and tokens, written into the dS buffer. (The beta term of dP is constant
  along a row: the softmax backward cancels it.)
- ``_part_attention_bwd_softmax_kernel``: ``dS = probs * (dP' - rowsum(probs * dP'))`` in place, with
  ``dP' = dP + dattn / h``; a few full rows per program.
- ``_part_attention_bwd_dg_kernel``: dG = sum_b (dS_b * rstd_b) @ Xc_b^T, the batch loop inside.
- ``_part_attention_bwd_dxhat_kernel``: per (sample, head, channel block, token block) the values
  gradient ``V = dparts_j^T @ probs_j`` and from it gamma's gradient through the values,
  ``sum_n V * rstd * Xc`` (per-program partial sums, summed afterwards: deterministic, no atomics);
  with dx asked for, also ``dxhat = G^T @ dS + gamma * V`` (then, after the short-row kernel, only that).
- ``_part_attention_bwd_dx_kernel``: the LayerNorm backward from dxhat, only when dx is asked for.

As in the forward, every product is a tiled GEMM whose tiles do not depend on N; only the softmax
backward holds whole rows.

Short rows (N <= ``ROW_TOKENS``, ``plans_part_attention.short_rows``): ``_part_attention_bwd_rows_kernel`` takes the
place of the dP and softmax-backward kernels and of dgamma's pass in dxhat: per (sample, head, query block)
it computes dP, dS and gamma's and beta's partial gradients with the rows on chip; dG (and dxhat, dx) follow
as above.
"""
import triton
import triton.language as tl

from .dots import mma, round_operand
from .part_attention_fwd import block_head_sample


@triton.jit
def rows_times_centred_x(X_ptr, Mean_ptr, Rstd_ptr, R_ptr, stride_rb, p, p_mask, c, c_mask, B, N,
                         stride_xb, stride_xc, stride_xn, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_C: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """``sum_b (R_b[p] * rstd_b) @ Xc_b[c]^T``, ``[BLOCK_P, BLOCK_C]`` fp32, with ``R_b = R_ptr + b *
    stride_rb`` a ``[P, N]`` fp32 block (dS or dZ of one head): a GEMM of reduction length B * N, walked
    in one flat loop over (sample, token chunk), one pipelined loop rather than a loop nest. Each caller's
    program owns its output tile: no atomics, a fixed summation order. (dG here, dWrg in the head.)"""
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    num_nc = tl.cdiv(N, BLOCK_N)
    for t in range(0, B * num_nc):
        b = (t // num_nc).to(tl.int64)
        n = (t % num_nc) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = n < N
        mean = tl.load(Mean_ptr + b * N + n, mask=n_mask, other=0.0)
        rstd = tl.load(Rstd_ptr + b * N + n, mask=n_mask, other=0.0)
        r = tl.load(R_ptr + b * stride_rb + (p[:, None] * N + n[None, :]), mask=p_mask[:, None] & n_mask[None, :],
                    other=0.0)
        xt_mask = n_mask[:, None] & c_mask[None, :]
        xt = tl.load(X_ptr + b * stride_xb + (n[:, None] * stride_xn + c[None, :] * stride_xc), mask=xt_mask,
                     other=0.0)
        xct = tl.where(xt_mask, xt.to(tl.float32) - mean[:, None], 0.0)
        acc = mma(r * rstd[None, :], xct, acc, DOT_PRECISION)
    return acc


@triton.jit(do_not_specialize=["H"])
def _part_attention_bwd_dp_kernel(
    X_ptr,            # [B, C, N] any strides
    Gamma_ptr,        # [C] fp32
    Mean_ptr,         # [B, N] fp32
    Rstd_ptr,         # [B, N] fp32
    DParts_ptr,       # [B, P, C] contiguous, any float dtype
    DP_ptr,           # [B, h, P, N] fp32 out: the gradient of the probabilities (through the parts)
    C, N, P, D, H,
    stride_xb, stride_xc, stride_xn,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # dots.mma precision
):
    # Query block fastest: the programs of one (sample, head, token block) share its x tiles in L2.
    pb, j, b = block_head_sample(P, BLOCK_P, H)
    p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    p_mask = p < P
    n_mask = n < N
    x_base = X_ptr + b * stride_xb
    mean = tl.load(Mean_ptr + b * N + n, mask=n_mask, other=0.0)
    rstd = tl.load(Rstd_ptr + b * N + n, mask=n_mask, other=0.0)
    acc = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    head_end = (j + 1) * D
    for c0 in range(j * D, head_end, BLOCK_K):
        c = c0 + tl.arange(0, BLOCK_K)
        c_mask = c < head_end
        dpar = tl.load(DParts_ptr + b * P * C + (p[:, None] * C + c[None, :]),
                       mask=p_mask[:, None] & c_mask[None, :], other=0.0).to(tl.float32)
        gamma = tl.load(Gamma_ptr + c, mask=c_mask, other=0.0)
        x_mask = c_mask[:, None] & n_mask[None, :]
        x = tl.load(x_base + (c[:, None] * stride_xc + n[None, :] * stride_xn), mask=x_mask, other=0.0)
        xc = tl.where(x_mask, x.to(tl.float32) - mean[None, :], 0.0)
        acc = mma(dpar * gamma[None, :], xc, acc, DOT_PRECISION)
    tl.store(DP_ptr + (b * H + j) * P * N + (p[:, None] * N + n[None, :]), acc * rstd[None, :],
             mask=p_mask[:, None] & n_mask[None, :])


@triton.jit(do_not_specialize=["P", "HP"])
def _part_attention_bwd_softmax_kernel(
    Probs_ptr,        # [R, N] fp32 (R = B * h * P rows)
    DAttn_ptr,        # [B, P, N] contiguous, any float dtype (unused without HAS_DATTN); per head: P = HP = h*P
    DS_ptr,           # [R, N] fp32: dP in, dS out (in place)
    R, N, P, HP,
    inv_h,
    HAS_DATTN: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,   # BLOCK_N >= N: whole rows
):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)    # int32: the launcher checks R < 2^31
    n = tl.arange(0, BLOCK_N)
    mask = (r < R)[:, None] & (n < N)[None, :]
    offs = r.to(tl.int64)[:, None] * N + n[None, :]
    probs = tl.load(Probs_ptr + offs, mask=mask, other=0.0)
    dp = tl.load(DS_ptr + offs, mask=mask, other=0.0)
    if HAS_DATTN:
        # Row r is (sample r // hP, query r % P); attn is the mean of the heads' probabilities.
        attn_row = ((r // HP) * P + r % P).to(tl.int64)
        dattn = tl.load(DAttn_ptr + (attn_row[:, None] * N + n[None, :]), mask=mask, other=0.0)
        dp += dattn.to(tl.float32) * inv_h
    row = tl.sum(probs * dp, axis=1)
    tl.store(DS_ptr + offs, probs * (dp - row[:, None]), mask=mask)


@triton.jit(do_not_specialize=["B", "H"])
def _part_attention_bwd_dg_kernel(
    X_ptr,            # [B, C, N] any strides
    Mean_ptr,         # [B, N] fp32
    Rstd_ptr,         # [B, N] fp32
    DS_ptr,           # [B, h, P, N] fp32 contiguous
    DG_ptr,           # [h, P, C] fp32 out
    B, C, N, P, H,
    stride_xb, stride_xc, stride_xn,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # dots.mma precision
):
    # dG_j = sum_b (dS_b,j * rstd_b) @ Xc_b^T: a GEMM with reduction length B * N (walked in BLOCK_N
    # token chunks, sample by sample); each program owns one output tile, so no atomics and a fixed
    # summation order.
    j = tl.program_id(0)
    pb = tl.program_id(1)
    cb = tl.program_id(2)
    p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    p_mask = p < P
    c_mask = c < C
    acc = rows_times_centred_x(X_ptr, Mean_ptr, Rstd_ptr, DS_ptr + j * P * N, H * P * N, p, p_mask, c, c_mask,
                               B, N, stride_xb, stride_xc, stride_xn, BLOCK_P, BLOCK_N, BLOCK_C, DOT_PRECISION)
    tl.store(DG_ptr + j * P * C + (p[:, None] * C + c[None, :]), acc, mask=p_mask[:, None] & c_mask[None, :])


@triton.jit(do_not_specialize=["H"])
def _part_attention_bwd_dxhat_kernel(
    X_ptr,            # [B, C, N] any strides
    G_ptr,            # [h * P, C] fp32 contiguous (unused without NEEDS_DX)
    Gamma_ptr,        # [C] fp32
    Mean_ptr,         # [B, N] fp32
    Rstd_ptr,         # [B, N] fp32
    Probs_ptr,        # [B, h, P, N] fp32 contiguous
    DS_ptr,           # [B, h, P, N] fp32 contiguous (unused without NEEDS_DX)
    DParts_ptr,       # [B, P, C] contiguous, any float dtype
    DGammaPart_ptr,   # [B * num_nb, C] fp32 out: per-program partial sums of dgamma (unused without DGAMMA)
    DXhat_ptr,        # [B, C, N] fp32 out: gradient of the normalised tokens (unused without NEEDS_DX)
    C, N, P, D, H,
    stride_xb, stride_xc, stride_xn,
    NEEDS_DX: tl.constexpr,
    DGAMMA: tl.constexpr,   # False where the short-row backward has summed gamma's gradient already
    BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # dots.mma precision
):
    # Grid: (channel block within the head fastest, head, sample) x token block. A channel block never
    # straddles two heads.
    cb, j, b = block_head_sample(D, BLOCK_C, H)
    nb = tl.program_id(1)
    c = j * D + cb * BLOCK_C + tl.arange(0, BLOCK_C)
    n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    c_mask = c < (j + 1) * D
    n_mask = n < N
    cn_mask = c_mask[:, None] & n_mask[None, :]
    # V = dparts_j^T @ probs_j: [C, P] x [P, N], the values' gradient.
    probs_base = Probs_ptr + (b * H + j) * P * N
    v = tl.zeros([BLOCK_C, BLOCK_N], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_K):
        p = p0 + tl.arange(0, BLOCK_K)
        p_mask = p < P
        dpt = tl.load(DParts_ptr + b * P * C + (p[None, :] * C + c[:, None]), mask=c_mask[:, None] & p_mask[None, :],
                      other=0.0)
        probs = tl.load(probs_base + (p[:, None] * N + n[None, :]), mask=p_mask[:, None] & n_mask[None, :], other=0.0)
        v = mma(dpt.to(tl.float32), probs, v, DOT_PRECISION)
    if DGAMMA:
        # gamma's gradient through the values: sum_{p, n} dparts[p, c] probs[p, n] rstd[n] Xc[c, n].
        mean = tl.load(Mean_ptr + b * N + n, mask=n_mask, other=0.0)
        rstd = tl.load(Rstd_ptr + b * N + n, mask=n_mask, other=0.0)
        x = tl.load(X_ptr + b * stride_xb + (c[:, None] * stride_xc + n[None, :] * stride_xn), mask=cn_mask,
                    other=0.0)
        xhat = tl.where(cn_mask, (x.to(tl.float32) - mean[None, :]) * rstd[None, :], 0.0)
        tl.store(DGammaPart_ptr + (b * tl.num_programs(1) + nb) * C + c, tl.sum(v * xhat, axis=1), mask=c_mask)
    if NEEDS_DX:
        # dxhat[c, n] = sum_i (G_i^T dS_i)[c, n] + gamma[c] V[c, n]: G as [hP, C] and dS_b as [hP, N],
        # so the sum over heads and queries is one contraction.
        gamma = tl.load(Gamma_ptr + c, mask=c_mask, other=0.0)
        acc = v * gamma[:, None]
        HP = H * P
        for q0 in range(0, HP, BLOCK_K):
            q = q0 + tl.arange(0, BLOCK_K)
            q_mask = q < HP
            gt = tl.load(G_ptr + (q[None, :] * C + c[:, None]), mask=c_mask[:, None] & q_mask[None, :], other=0.0)
            ds = tl.load(DS_ptr + b * HP * N + (q[:, None] * N + n[None, :]), mask=q_mask[:, None] & n_mask[None, :],
                         other=0.0)
            acc = mma(gt, ds, acc, DOT_PRECISION)
        tl.store(DXhat_ptr + b * C * N + (c[:, None] * N + n[None, :]), acc, mask=cn_mask)


@triton.jit
def _part_attention_bwd_dx_kernel(
    X_ptr,            # [B, C, N] any strides
    Mean_ptr,         # [B, N] fp32
    Rstd_ptr,         # [B, N] fp32
    DXhat_ptr,        # [B, C, N] fp32 contiguous
    DX_ptr,           # [B, C, N] out, strides stride_d*
    C, N,
    stride_xb, stride_xc, stride_xn,
    stride_db, stride_dc, stride_dn,
    BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # LayerNorm backward per token: dx = rstd * (dxhat - mean_c(dxhat) - xhat * mean_c(dxhat * xhat)).
    b = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < N
    mean = tl.load(Mean_ptr + b * N + n, mask=n_mask, other=0.0)
    rstd = tl.load(Rstd_ptr + b * N + n, mask=n_mask, other=0.0)
    x_base = X_ptr + b * stride_xb
    dxhat_base = DXhat_ptr + b * C * N
    sum_dy = tl.zeros([BLOCK_N], dtype=tl.float32)
    sum_dy_xhat = tl.zeros([BLOCK_N], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        mask = (c < C)[:, None] & n_mask[None, :]
        x = tl.load(x_base + (c[:, None] * stride_xc + n[None, :] * stride_xn), mask=mask, other=0.0)
        xhat = tl.where(mask, (x.to(tl.float32) - mean[None, :]) * rstd[None, :], 0.0)
        dy = tl.load(dxhat_base + (c[:, None] * N + n[None, :]), mask=mask, other=0.0)
        sum_dy += tl.sum(dy, axis=0)
        sum_dy_xhat += tl.sum(dy * xhat, axis=0)
    mean_dy = sum_dy / C
    mean_dy_xhat = sum_dy_xhat / C
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        mask = (c < C)[:, None] & n_mask[None, :]
        x = tl.load(x_base + (c[:, None] * stride_xc + n[None, :] * stride_xn), mask=mask, other=0.0)
        xhat = (x.to(tl.float32) - mean[None, :]) * rstd[None, :]
        dy = tl.load(dxhat_base + (c[:, None] * N + n[None, :]), mask=mask, other=0.0)
        dx = rstd[None, :] * (dy - mean_dy[None, :] - xhat * mean_dy_xhat[None, :])
        dx_ptrs = DX_ptr + b * stride_db + (c[:, None] * stride_dc + n[None, :] * stride_dn)
        tl.store(dx_ptrs, dx.to(DX_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["H"])
def _part_attention_bwd_rows_kernel(
    X_ptr,            # [B, C, N] any strides
    Gamma_ptr,        # [C] fp32
    Mean_ptr,         # [B, N] fp32
    Rstd_ptr,         # [B, N] fp32
    Probs_ptr,        # [B, h, P, N] fp32 contiguous
    DParts_ptr,       # [B, P, C] contiguous, any float dtype (unused without HAS_DPARTS)
    DAttn_ptr,        # dattn of sample b, head j at b * stride_dab + j * stride_dah, [P, N] contiguous (HAS_DATTN)
    DS_ptr,           # [B, h, P, N] fp32 out: gradient of the scores
    DGammaPart_ptr,   # [B * num_qb, C] fp32 out: per-program partial sums of dgamma (with HAS_DPARTS)
    DBetaPart_ptr,    # [B * num_qb, C] fp32 out: per-program partial sums of dbeta (with HAS_DPARTS)
    C, N, P, D, H,
    stride_xb, stride_xc, stride_xn,
    stride_dab, stride_dah,   # dattn [B, P, N] shared by the heads (P*N, 0), or per head [B, h, P, N]
    inv_h,
    HAS_DPARTS: tl.constexpr, HAS_DATTN: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,   # BLOCK_N >= N: whole rows
    DOT_PRECISION: tl.constexpr,  # dots.mma precision
):
    # Short rows: one program per (sample, head, query block) holds its rows of probabilities and dP on
    # chip. One pass over the head's channels gives dP = rstd * ((dparts * gamma) @ Xc), gamma's gradient
    # through the values, sum_p dparts * ((probs * rstd) @ Xc^T), and beta's, sum_p dparts (per-program
    # partial sums: each program owns its row of the partials, summed afterwards); then the softmax
    # backward in registers. Only dS leaves the chip (dG needs it for every sample).
    qb, j, b = block_head_sample(P, BLOCK_Q, H)
    num_qb = tl.cdiv(P, BLOCK_Q)
    q = qb * BLOCK_Q + tl.arange(0, BLOCK_Q)
    n = tl.arange(0, BLOCK_N)
    q_mask = q < P
    n_mask = n < N
    qn_mask = q_mask[:, None] & n_mask[None, :]
    rows = (b * H + j) * P * N + (q[:, None] * N + n[None, :])
    dp = tl.zeros([BLOCK_Q, BLOCK_N], dtype=tl.float32)
    if HAS_DPARTS:
        x_base = X_ptr + b * stride_xb
        mean = tl.load(Mean_ptr + b * N + n, mask=n_mask, other=0.0)
        rstd = tl.load(Rstd_ptr + b * N + n, mask=n_mask, other=0.0)
        # The loop holds two row tiles, probs * rstd and dP; the probabilities are loaded again after it
        # (the same bytes, from L2): a third tile through the loop spilled.
        # probs * rstd is an operand of every chunk's product: rounded once, held in the operand dtype.
        w = round_operand(tl.load(Probs_ptr + rows, mask=qn_mask, other=0.0) * rstd[None, :], DOT_PRECISION)
        part_row = (b * num_qb + qb) * C
        head_end = (j + 1) * D
        for c0 in range(j * D, head_end, BLOCK_K):
            c = c0 + tl.arange(0, BLOCK_K)
            c_mask = c < head_end
            dpar = tl.load(DParts_ptr + b * P * C + (q[:, None] * C + c[None, :]),
                           mask=q_mask[:, None] & c_mask[None, :], other=0.0).to(tl.float32)
            gamma = tl.load(Gamma_ptr + c, mask=c_mask, other=0.0)
            x_mask = c_mask[:, None] & n_mask[None, :]
            x = tl.load(x_base + (c[:, None] * stride_xc + n[None, :] * stride_xn), mask=x_mask, other=0.0)
            # The centred chunk is an operand of both products: rounded once.
            xc = round_operand(tl.where(x_mask, x.to(tl.float32) - mean[None, :], 0.0), DOT_PRECISION)
            dp = mma(dpar * gamma[None, :], xc, dp, DOT_PRECISION)
            values = mma(w, tl.trans(xc), tl.zeros([BLOCK_Q, BLOCK_K], dtype=tl.float32), DOT_PRECISION)
            tl.store(DGammaPart_ptr + part_row + c, tl.sum(dpar * values, axis=0), mask=c_mask)
            tl.store(DBetaPart_ptr + part_row + c, tl.sum(dpar, axis=0), mask=c_mask)
        dp = dp * rstd[None, :]
    if HAS_DATTN:
        dattn = tl.load(DAttn_ptr + b * stride_dab + j * stride_dah + (q[:, None] * N + n[None, :]), mask=qn_mask,
                        other=0.0)
        dp += dattn.to(tl.float32) * inv_h
    # The softmax backward; the beta term of dP is constant along a row and cancels here.
    probs = tl.load(Probs_ptr + rows, mask=qn_mask, other=0.0)
    row = tl.sum(probs * dp, axis=1)
    tl.store(DS_ptr + rows, probs * (dp - row[:, None]), mask=qn_mask)
