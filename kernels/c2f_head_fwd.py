"""Fused C2F head forward kernels (docs/design.md, "The algebra" 8: the head never forms F).

With ``X_b`` one sample's map as ``[C, N]`` (read in place, any strides), ``Xc = X_b - mean`` per
token, ``rstd`` its inverse std, the folded weights ``g [h, P, C]``, ``wrg [P, C]`` and the pooling
matrix ``M_b [2K, P]`` (``[mask[:, b]; 1 - mask[:, perm^-1 b]] / P``)::

    S_j    = rstd * (G_j @ Xc)              P_j = softmax_n(S_j)            (the attention maps)
    Zhat_j = rstd * (Wrg_j @ Xc_j)          (head-j channels)               pred = sum_{j,n} P_j Zhat_j
    coef_j = M_b @ P_j                      U = (coef_j * rstd) @ Xc_j^T    (the pooled mixed-view rows)

- ``_c2f_head_fwd_kernel``: per (sample, head, query block): S and Zhat in one pass over the channels,
  the softmax, P (the saved probabilities), Zhat, the head's share of pred and the query block's share
  of coef (partials summed afterwards: deterministic, no atomics).
- ``_c2f_head_pool_kernel``: per (sample, head, channel split): U from coef; in backward also
  ``dcoef = (dU @ Xc_j) * rstd`` in the same pass over x (per-split partials).
"""
import triton
import triton.language as tl


@triton.jit
def _centred(x_base, c, c_mask, n, n_mask, mean, stride_xc, stride_xn):
    """``x[c, n] - mean[n]`` in fp32, ``[len(c), len(n)]``, zero outside the masks."""
    mask = c_mask[:, None] & n_mask[None, :]
    x = tl.load(x_base + (c[:, None] * stride_xc + n[None, :] * stride_xn), mask=mask, other=0.0)
    return tl.where(mask, x.to(tl.float32) - mean[None, :], 0.0)


@triton.jit
def _centred_t(x_base, n, n_mask, c, c_mask, mean, stride_xc, stride_xn):
    """``x[c, n] - mean[n]`` in fp32 as ``[len(n), len(c)]``, zero outside the masks."""
    mask = n_mask[:, None] & c_mask[None, :]
    x = tl.load(x_base + (n[:, None] * stride_xn + c[None, :] * stride_xc), mask=mask, other=0.0)
    return tl.where(mask, x.to(tl.float32) - mean[:, None], 0.0)


@triton.jit
def _c2f_head_fwd_kernel(
    X_ptr,            # [B, C, N] any strides
    G_ptr,            # [h, P, C] fp32 contiguous: scale * Q Wk * gamma
    Wrg_ptr,          # [P, C] fp32 contiguous: Wr * gamma
    M_ptr,            # [B, V, P] fp32 contiguous: pooling matrix, V = 2K views
    Mean_ptr,         # [B, N] fp32
    Rstd_ptr,         # [B, N] fp32
    Probs_ptr,        # [B, h, P, N] fp32 out
    Zhat_ptr,         # [B, h, P, N] fp32 out
    Pred_ptr,         # [B, h, P] fp32 out: each head's share of pred
    CoefPart_ptr,     # [B, h, num_pb, V, N] fp32 out: each query block's share of coef = M P_j
    C, N, P, D, H, V,
    stride_xb, stride_xc, stride_xn,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_V: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # fp32 tl.dot on a GPU: "tf32", "tf32x3" or "ieee"
):
    # Sample-major order (query block fastest): programs of one sample run together and re-read
    # X_b from L2, not HBM.
    pid = tl.program_id(0)
    num_pb = tl.cdiv(P, BLOCK_P)
    pb = pid % num_pb
    j = (pid // num_pb) % H
    b = (pid // (num_pb * H)).to(tl.int64)

    # Per-sample bases in int64; offsets inside one sample (and within g) stay int32.
    p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    n = tl.arange(0, BLOCK_N)
    p_mask = p < P
    n_mask = n < N
    x_base = X_ptr + b * stride_xb
    g_rows = G_ptr + j * P * C + p[:, None] * C
    w_rows = Wrg_ptr + p[:, None] * C
    mean = tl.load(Mean_ptr + b * N + n, mask=n_mask, other=0.0)
    rstd = tl.load(Rstd_ptr + b * N + n, mask=n_mask, other=0.0)

    # One pass over the channels: the scores contract all of them, the readout only head j's, so
    # the pass is split at the head's edges and each x chunk is read once.
    s = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    z = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    head_start = j * D
    head_end = head_start + D
    for c0 in range(0, head_start, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_mask = c < head_start
        g = tl.load(g_rows + c[None, :], mask=p_mask[:, None] & c_mask[None, :], other=0.0)
        s += tl.dot(g, _centred(x_base, c, c_mask, n, n_mask, mean, stride_xc, stride_xn),
                    input_precision=DOT_PRECISION)
    for c0 in range(head_start, head_end, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_mask = c < head_end
        pc_mask = p_mask[:, None] & c_mask[None, :]
        xc = _centred(x_base, c, c_mask, n, n_mask, mean, stride_xc, stride_xn)
        g = tl.load(g_rows + c[None, :], mask=pc_mask, other=0.0)
        w = tl.load(w_rows + c[None, :], mask=pc_mask, other=0.0)
        s += tl.dot(g, xc, input_precision=DOT_PRECISION)
        z += tl.dot(w, xc, input_precision=DOT_PRECISION)
    for c0 in range(head_end, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_mask = c < C
        g = tl.load(g_rows + c[None, :], mask=p_mask[:, None] & c_mask[None, :], other=0.0)
        s += tl.dot(g, _centred(x_base, c, c_mask, n, n_mask, mean, stride_xc, stride_xn),
                    input_precision=DOT_PRECISION)

    s = s * rstd[None, :]
    s = tl.where(n_mask[None, :], s, float("-inf"))
    row_max = tl.max(s, axis=1)
    e = tl.exp2((s - row_max[:, None]) * 1.4426950408889634)  # log2(e)
    probs = e / tl.sum(e, axis=1)[:, None]
    zhat = z * rstd[None, :]
    pn_mask = p_mask[:, None] & n_mask[None, :]
    rows = (b * H + j) * P * N + (p[:, None] * N + n[None, :])
    tl.store(Probs_ptr + rows, probs, mask=pn_mask)
    tl.store(Zhat_ptr + rows, zhat, mask=pn_mask)
    tl.store(Pred_ptr + (b * H + j) * P + p, tl.sum(probs * zhat, axis=1), mask=p_mask)

    # This query block's share of coef_j = M_b @ P_j (M is zero on padded queries: their uniform
    # probabilities drop out).
    part_base = CoefPart_ptr + ((b * H + j) * num_pb + pb) * V * N
    for v0 in range(0, V, BLOCK_V):
        v = v0 + tl.arange(0, BLOCK_V)
        v_mask = v < V
        m = tl.load(M_ptr + b * V * P + (v[:, None] * P + p[None, :]), mask=v_mask[:, None] & p_mask[None, :],
                    other=0.0)
        coef = tl.dot(m, probs, input_precision=DOT_PRECISION)
        tl.store(part_base + (v[:, None] * N + n[None, :]), coef, mask=v_mask[:, None] & n_mask[None, :])


@triton.jit
def _c2f_head_pool_kernel(
    X_ptr,            # [B, C, N] any strides
    Mean_ptr,         # [B, N] fp32
    Rstd_ptr,         # [B, N] fp32
    Coef_ptr,         # [B, h, V, N] fp32: coef_j = M_b P_j
    U_ptr,            # [B, V, C] fp32 out: pooled rows (coef_j * rstd) Xc_j^T over head j's channels
    DU_ptr,           # [B, V, C] fp32: their gradient (HAS_DU)
    DCoefPart_ptr,    # [B, h, num_splits, V, N] fp32 out: each split's share of dcoef (HAS_DU)
    C, N, D, H, V,
    stride_xb, stride_xc, stride_xn,
    HAS_DU: tl.constexpr,
    SPLIT_C: tl.constexpr,        # channels per program
    BLOCK_V: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # fp32 tl.dot on a GPU: "tf32", "tf32x3" or "ieee"
):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    j = bh % H
    b = (bh // H).to(tl.int64)
    c_start = j * D + split * SPLIT_C
    c_end = tl.minimum(c_start + SPLIT_C, (j + 1) * D)
    n = tl.arange(0, BLOCK_N)
    n_mask = n < N
    x_base = X_ptr + b * stride_xb
    mean = tl.load(Mean_ptr + b * N + n, mask=n_mask, other=0.0)
    rstd = tl.load(Rstd_ptr + b * N + n, mask=n_mask, other=0.0)
    for v0 in range(0, V, BLOCK_V):
        v = v0 + tl.arange(0, BLOCK_V)
        v_mask = v < V
        vn_mask = v_mask[:, None] & n_mask[None, :]
        coef = tl.load(Coef_ptr + (b * H + j) * V * N + (v[:, None] * N + n[None, :]), mask=vn_mask, other=0.0)
        coef = coef * rstd[None, :]
        for c0 in range(c_start, c_end, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            c_mask = c < c_end
            xct = _centred_t(x_base, n, n_mask, c, c_mask, mean, stride_xc, stride_xn)
            u = tl.dot(coef, xct, input_precision=DOT_PRECISION)
            tl.store(U_ptr + b * V * C + (v[:, None] * C + c[None, :]), u, mask=v_mask[:, None] & c_mask[None, :])
        if HAS_DU:
            # A second pass over the same channels (L2-resident) with x in the other orientation: one
            # orientation per loop keeps each loop's tiles in registers.
            dcoef = tl.zeros([BLOCK_V, BLOCK_N], dtype=tl.float32)
            for c0 in range(c_start, c_end, BLOCK_C):
                c = c0 + tl.arange(0, BLOCK_C)
                c_mask = c < c_end
                du = tl.load(DU_ptr + b * V * C + (v[:, None] * C + c[None, :]), mask=v_mask[:, None] & c_mask[None, :],
                             other=0.0)
                xc = _centred(x_base, c, c_mask, n, n_mask, mean, stride_xc, stride_xn)
                dcoef += tl.dot(du, xc, input_precision=DOT_PRECISION)
            part = DCoefPart_ptr + ((b * H + j) * num_splits + split) * V * N
            tl.store(part + (v[:, None] * N + n[None, :]), dcoef * rstd[None, :], mask=vn_mask)
