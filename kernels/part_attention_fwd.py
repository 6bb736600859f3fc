"""Part attention forward kernels: token statistics, and scores + softmax + weighted sum.

Folded formulation (docs/design.md, "The algebra" 1-3): the caller folds the key projection into the
queries, ``g [h, P, C] = (scale * Q_j @ Wk_j) * gamma``. With ``X_b`` one sample's map as ``[C, N]``
(read in place, any strides), ``Xc = X_b - mean`` per token and ``rstd`` its inverse std::

    S_j = rstd * (G_j @ Xc)                 (the LayerNorm-ed keys are never formed)
    probs_j = softmax_n(S_j)
    parts_j = gamma * ((probs_j * rstd) @ Xc^T) + beta      (head-j channels; sum_n probs = 1)

- ``_part_attention_stats_kernel``: token mean / rstd, one pass over C with Chan's chunk merge.
- ``_part_attention_fwd_kernel``: per (sample, head, query block): S, softmax, probs, parts.
"""
import triton
import triton.language as tl

@triton.jit
def _part_attention_stats_kernel(
    X_ptr,            # [B, C, N] any strides
    Mean_ptr,         # [B, N] fp32
    Rstd_ptr,         # [B, N] fp32
    C, N,
    stride_xb, stride_xc, stride_xn,
    eps,
    BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < N
    x_base = X_ptr + pid_b * stride_xb
    # Statistics of x - shift, shift = the token's first channel: with a large common offset
    # (x + 1000) the shifted values are O(std), so chunk sums lose nothing to the offset.
    shift = tl.load(x_base + n * stride_xn, mask=n_mask, other=0.0).to(tl.float32)
    mean = tl.zeros([BLOCK_N], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_N], dtype=tl.float32)
    count = 0.0
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        mask = (c < C)[:, None] & n_mask[None, :]
        x = tl.load(x_base + (c[:, None] * stride_xc + n[None, :] * stride_xn), mask=mask, other=0.0)
        x = tl.where(mask, x.to(tl.float32) - shift[None, :], 0.0)
        # Chan et al.: merge this chunk's (count, mean, M2) into the running ones; no sum of squares.
        chunk_count = tl.minimum(C - c0, BLOCK_C).to(tl.float32)
        chunk_mean = tl.sum(x, axis=0) / chunk_count
        centred = tl.where(mask, x - chunk_mean[None, :], 0.0)
        chunk_m2 = tl.sum(centred * centred, axis=0)
        total = count + chunk_count
        delta = chunk_mean - mean
        mean += delta * (chunk_count / total)
        m2 += chunk_m2 + delta * delta * (count * chunk_count / total)
        count = total
    rstd = 1.0 / tl.sqrt(m2 / C + eps)
    tl.store(Mean_ptr + pid_b * N + n, mean + shift, mask=n_mask)
    tl.store(Rstd_ptr + pid_b * N + n, rstd, mask=n_mask)


@triton.jit
def _part_attention_fwd_kernel(
    X_ptr,            # [B, C, N] any strides
    G_ptr,            # [h, P, C] fp32 contiguous
    Gamma_ptr,        # [C] fp32
    Beta_ptr,         # [C] fp32
    Mean_ptr,         # [B, N] fp32
    Rstd_ptr,         # [B, N] fp32
    Parts_ptr,        # [B, P, C] contiguous
    Probs_ptr,        # [B, h, P, N] fp32 contiguous
    C, N, P, D, H,
    stride_xb, stride_xc, stride_xn,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # fp32 tl.dot on a GPU: "tf32", "tf32x3" or "ieee"
):
    # Sample-major order (query block fastest): programs of one sample run together and re-read
    # X_b from L2, not HBM.
    pid = tl.program_id(0)
    num_pb = tl.cdiv(P, BLOCK_P)
    pb = pid % num_pb
    j = (pid // num_pb) % H
    b = (pid // (num_pb * H)).to(tl.int64)

    # Per-sample bases in int64 (B x P x C overflows int32); offsets inside one sample's [C, N],
    # [P, C] or [h, P, N] stay int32, which halves the registers of every [*, BLOCK_N] offset tile.
    p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    n = tl.arange(0, BLOCK_N)
    p_mask = p < P
    n_mask = n < N
    x_base = X_ptr + b * stride_xb
    g_base = G_ptr + j * P * C
    mean = tl.load(Mean_ptr + b * N + n, mask=n_mask, other=0.0)
    rstd = tl.load(Rstd_ptr + b * N + n, mask=n_mask, other=0.0)

    # S = G_j @ (X - mean): the centring is a subtraction on load, exact and offset-proof.
    s = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_mask = c < C
        g = tl.load(g_base + (p[:, None] * C + c[None, :]), mask=p_mask[:, None] & c_mask[None, :], other=0.0)
        x_mask = c_mask[:, None] & n_mask[None, :]
        x = tl.load(x_base + (c[:, None] * stride_xc + n[None, :] * stride_xn), mask=x_mask, other=0.0)
        xc = tl.where(x_mask, x.to(tl.float32) - mean[None, :], 0.0)
        s += tl.dot(g.to(tl.float32), xc, input_precision=DOT_PRECISION)

    s = s * rstd[None, :]
    s = tl.where(n_mask[None, :], s, float("-inf"))
    row_max = tl.max(s, axis=1)
    e = tl.exp2((s - row_max[:, None]) * 1.4426950408889634)  # log2(e)
    probs = e / tl.sum(e, axis=1)[:, None]
    pn_mask = p_mask[:, None] & n_mask[None, :]
    tl.store(Probs_ptr + (b * H + j) * P * N + (p[:, None] * N + n[None, :]), probs, mask=pn_mask)

    # parts_j = gamma * ((probs * rstd) @ Xc^T) + beta over the head's channels.
    w = probs * rstd[None, :]
    head_end = (j + 1) * D
    for c0 in range(j * D, head_end, BLOCK_D):
        c = c0 + tl.arange(0, BLOCK_D)
        c_mask = c < head_end
        xt_mask = n_mask[:, None] & c_mask[None, :]
        xt = tl.load(x_base + (n[:, None] * stride_xn + c[None, :] * stride_xc), mask=xt_mask, other=0.0)
        xct = tl.where(xt_mask, xt.to(tl.float32) - mean[:, None], 0.0)
        acc = tl.dot(w, xct, input_precision=DOT_PRECISION)
        gamma = tl.load(Gamma_ptr + c, mask=c_mask, other=0.0)
        beta = tl.load(Beta_ptr + c, mask=c_mask, other=0.0)
        out = acc * gamma[None, :] + beta[None, :]
        out_ptrs = Parts_ptr + b * P * C + (p[:, None] * C + c[None, :])
        tl.store(out_ptrs, out.to(Parts_ptr.dtype.element_ty), mask=p_mask[:, None] & c_mask[None, :])
