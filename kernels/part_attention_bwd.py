"""Part attention backward kernels (folded formulation; docs/design.md, "The algebra" 4).

- ``_part_attention_bwd_kernel``: per (sample, head, query block): dS, and per-program partial sums
  of dgamma / dbeta (summed afterwards: deterministic, no atomics).
- ``_part_attention_bwd_dg_kernel``: dG = sum_b (dS_b * rstd_b) @ Xc_b^T, the batch loop inside.
- ``_part_attention_bwd_dxhat_kernel`` + ``_part_attention_bwd_dx_kernel``: the gradient of x, only
  when asked for.
"""
import triton
import triton.language as tl

@triton.jit
def _part_attention_bwd_kernel(
    X_ptr,            # [B, C, N] any strides
    Gamma_ptr,        # [C] fp32
    Mean_ptr,         # [B, N] fp32
    Rstd_ptr,         # [B, N] fp32
    Probs_ptr,        # [B, h, P, N] fp32 contiguous
    DParts_ptr,       # [B, P, C] contiguous, any float dtype
    DAttn_ptr,        # [B, P, N] contiguous, any float dtype (unused without HAS_DATTN)
    DS_ptr,           # [B, h, P, N] fp32 out: gradient of the logits S
    DGammaPart_ptr,   # [B * num_pb, C] fp32 out: per-program partial sums of dgamma
    DBetaPart_ptr,    # [B * num_pb, C] fp32 out: per-program partial sums of dbeta
    C, N, P, D, H,
    stride_xb, stride_xc, stride_xn,
    inv_h,
    HAS_DATTN: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # fp32 tl.dot on a GPU: "tf32", "tf32x3" or "ieee"
):
    pid = tl.program_id(0)
    num_pb = tl.cdiv(P, BLOCK_P)
    pb = pid % num_pb
    j = (pid // num_pb) % H
    b = (pid // (num_pb * H)).to(tl.int64)

    p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    n = tl.arange(0, BLOCK_N)
    p_mask = p < P
    n_mask = n < N
    pn_mask = p_mask[:, None] & n_mask[None, :]
    x_base = X_ptr + b * stride_xb
    mean = tl.load(Mean_ptr + b * N + n, mask=n_mask, other=0.0)
    rstd = tl.load(Rstd_ptr + b * N + n, mask=n_mask, other=0.0)
    probs_ptrs = Probs_ptr + (b * H + j) * P * N + (p[:, None] * N + n[None, :])
    probs = tl.load(probs_ptrs, mask=pn_mask, other=0.0)
    w = probs * rstd[None, :]

    # One pass over the head's channels: dP = (dparts * gamma) @ Xc (times rstd below), and the
    # gamma gradient through the values, dparts * ((probs * rstd) @ Xc^T), summed over this block's queries.
    dp = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    head_end = (j + 1) * D
    part_row = (b * num_pb + pb) * C
    for c0 in range(j * D, head_end, BLOCK_D):
        c = c0 + tl.arange(0, BLOCK_D)
        c_mask = c < head_end
        dpar = tl.load(DParts_ptr + b * P * C + (p[:, None] * C + c[None, :]),
                       mask=p_mask[:, None] & c_mask[None, :], other=0.0).to(tl.float32)
        gamma = tl.load(Gamma_ptr + c, mask=c_mask, other=0.0)
        x_mask = c_mask[:, None] & n_mask[None, :]
        x = tl.load(x_base + (c[:, None] * stride_xc + n[None, :] * stride_xn), mask=x_mask, other=0.0)
        xc = tl.where(x_mask, x.to(tl.float32) - mean[None, :], 0.0)
        dp += tl.dot(dpar * gamma[None, :], xc, input_precision=DOT_PRECISION)
        values = tl.dot(w, tl.trans(xc), input_precision=DOT_PRECISION)
        tl.store(DGammaPart_ptr + part_row + c, tl.sum(dpar * values, axis=0), mask=c_mask)
        tl.store(DBetaPart_ptr + part_row + c, tl.sum(dpar, axis=0), mask=c_mask)

    dp = dp * rstd[None, :]
    if HAS_DATTN:
        dattn = tl.load(DAttn_ptr + b * P * N + (p[:, None] * N + n[None, :]), mask=pn_mask, other=0.0)
        dp += dattn.to(tl.float32) * inv_h
    # Softmax backward; the beta term of dP is constant along a row and cancels here.
    row = tl.sum(probs * dp, axis=1)
    ds = probs * (dp - row[:, None])
    tl.store(DS_ptr + (b * H + j) * P * N + (p[:, None] * N + n[None, :]), ds, mask=pn_mask)


@triton.jit
def _part_attention_bwd_dg_kernel(
    X_ptr,            # [B, C, N] any strides
    Mean_ptr,         # [B, N] fp32
    Rstd_ptr,         # [B, N] fp32
    DS_ptr,           # [B, h, P, N] fp32 contiguous
    DG_ptr,           # [h, P, C] fp32 out
    B, C, N, P, H,
    stride_xb, stride_xc, stride_xn,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # fp32 tl.dot on a GPU: "tf32", "tf32x3" or "ieee"
):
    # dG_j = sum_b (dS_b,j * rstd_b) @ Xc_b^T: a GEMM with reduction length B * N (walked in BLOCK_N
    # token chunks); each program owns one output tile, so no atomics and a fixed summation order.
    j = tl.program_id(0)
    pb = tl.program_id(1)
    cb = tl.program_id(2)
    p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    p_mask = p < P
    c_mask = c < C
    x_base = X_ptr
    ds_base = DS_ptr + j * P * N
    stats_base = 0
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for _ in range(0, B):
        for n0 in range(0, N, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            n_mask = n < N
            mean = tl.load(Mean_ptr + stats_base + n, mask=n_mask, other=0.0)
            rstd = tl.load(Rstd_ptr + stats_base + n, mask=n_mask, other=0.0)
            ds = tl.load(ds_base + (p[:, None] * N + n[None, :]), mask=p_mask[:, None] & n_mask[None, :], other=0.0)
            xt_mask = n_mask[:, None] & c_mask[None, :]
            xt = tl.load(x_base + (n[:, None] * stride_xn + c[None, :] * stride_xc), mask=xt_mask, other=0.0)
            xct = tl.where(xt_mask, xt.to(tl.float32) - mean[:, None], 0.0)
            acc += tl.dot(ds * rstd[None, :], xct, input_precision=DOT_PRECISION)
        # Bases advance per sample (64-bit pointer arithmetic: no int32 offset overflow).
        x_base += stride_xb
        ds_base += H * P * N
        stats_base += N
    tl.store(DG_ptr + j * P * C + (p[:, None] * C + c[None, :]), acc, mask=p_mask[:, None] & c_mask[None, :])


@triton.jit
def _part_attention_bwd_dxhat_kernel(
    G_ptr,            # [h, P, C] fp32 contiguous
    Gamma_ptr,        # [C] fp32
    Probs_ptr,        # [B, h, P, N] fp32 contiguous
    DS_ptr,           # [B, h, P, N] fp32 contiguous
    DParts_ptr,       # [B, P, C] contiguous, any float dtype
    DXhat_ptr,        # [B, C, N] fp32 out: gradient of the normalised tokens (before gamma, beta)
    C, N, P, D, H,
    BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # fp32 tl.dot on a GPU: "tf32", "tf32x3" or "ieee"
):
    # dxhat[c, n] = sum_i (G_i^T dS_i)[c, n] + gamma[c] * (dparts_j^T probs_j)[c, n], j = head of c.
    # A channel block never straddles two heads: the grid is (sample, head, block within the head).
    b = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    cb = tl.program_id(2)
    c = j * D + cb * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = (c < (j + 1) * D) & (c < C)
    n = tl.arange(0, BLOCK_N)
    n_mask = n < N
    gamma = tl.load(Gamma_ptr + c, mask=c_mask, other=0.0)
    acc = tl.zeros([BLOCK_C, BLOCK_N], dtype=tl.float32)
    # G as [h * P, C] and dS_b as [h * P, N]: the sum over heads and queries is one contraction.
    HP = H * P
    for q0 in range(0, HP, BLOCK_P):
        q = q0 + tl.arange(0, BLOCK_P)
        q_mask = q < HP
        gt = tl.load(G_ptr + (q[None, :] * C + c[:, None]), mask=c_mask[:, None] & q_mask[None, :], other=0.0)
        ds = tl.load(DS_ptr + b * HP * N + (q[:, None] * N + n[None, :]),
                     mask=q_mask[:, None] & n_mask[None, :], other=0.0)
        acc += tl.dot(gt, ds, input_precision=DOT_PRECISION)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        p_mask = p < P
        dpt = tl.load(DParts_ptr + b * P * C + (p[None, :] * C + c[:, None]),
                      mask=c_mask[:, None] & p_mask[None, :], other=0.0).to(tl.float32)
        probs = tl.load(Probs_ptr + (b * H + j) * P * N + (p[:, None] * N + n[None, :]),
                        mask=p_mask[:, None] & n_mask[None, :], other=0.0)
        acc += tl.dot(dpt * gamma[:, None], probs, input_precision=DOT_PRECISION)
    tl.store(DXhat_ptr + b * C * N + (c[:, None] * N + n[None, :]), acc, mask=c_mask[:, None] & n_mask[None, :])


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
