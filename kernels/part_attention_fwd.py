"""Part attention forward kernels: token statistics, scores, softmax, parts.

Folded formulation (docs/design.md, "The algebra" 1-3): the caller folds the key projection into the
queries, ``g [h, P, C] = (scale * Q_j @ Wk_j) * gamma``. With ``X_b`` one sample's map as ``[C, N]``
(read in place, any strides), ``Xc = X_b - mean`` per token and ``rstd`` its inverse std::

    S_j = rstd * (G_j @ Xc)                 (the LayerNorm-ed keys are never formed)
    probs_j = softmax_n(S_j)
    parts_j = gamma * ((probs_j * rstd) @ Xc^T) + beta      (head-j channels; sum_n probs = 1)

- ``_part_attention_stats_kernel``: token mean / rstd, one pass over C with Chan's chunk merge.
- ``_part_attention_fwd_scores_kernel``: S for all heads at once, a GEMM ``[hP, C] x [C, N]`` per
  sample tiled over queries and tokens (the scores land in the probabilities' buffer).
- ``_part_attention_fwd_softmax_kernel``: softmax of those rows in place, a few full rows per program.
- ``_part_attention_fwd_parts_kernel``: parts, a GEMM ``[P, N] x [N, d]`` per sample and head tiled
  over queries and channels, walking the tokens in chunks.

Every product is a tiled GEMM whose tiles do not depend on N (``plans.py``), so every supported N fits
every target; only the softmax holds a whole row of N <= ``plans.MAX_TOKENS`` tokens, in registers.

- ``_part_attention_fwd_rows_kernel``: short rows (N <= ``ROW_TOKENS``, ``plans_part_attention.short_rows``): all of
  the above in one kernel per (sample, head, query block), the scores never leaving the chip; x_b is read
  by both of its passes and by every query block of the sample at about the same time (from L2). With
  ``HAS_STATS`` (the statistics given with x, e.g. cached with frozen features) it reads them instead.
"""
import triton
import triton.language as tl

from .dots import mma, round_operand

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def block_head_sample(extent, BLOCK: tl.constexpr, H):
    """``(block, head, sample)`` of this program along grid axis 0, ordered block fastest, then head, then
    sample: ``cdiv(extent, BLOCK)`` blocks per (sample, head), so a sample's programs run side by side
    and share its x tiles in L2. The sample is int64 (it multiplies per-sample strides)."""
    num_blocks = tl.cdiv(extent, BLOCK)
    pid = tl.program_id(0)
    return pid % num_blocks, (pid // num_blocks) % H, (pid // num_blocks // H).to(tl.int64)


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


@triton.jit(do_not_specialize=["HP"])
def _part_attention_fwd_scores_kernel(
    X_ptr,            # [B, C, N] any strides
    G_ptr,            # [h * P, C] fp32 contiguous
    Mean_ptr,         # [B, N] fp32
    Rstd_ptr,         # [B, N] fp32
    S_ptr,            # [B, h * P, N] fp32 out: the scores (the softmax kernel turns them into probs)
    C, N, HP,
    stride_xb, stride_xc, stride_xn,
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # dots.mma precision
):
    # Query block fastest: the programs of one (sample, token block) run together and share its
    # x tiles through L2.
    num_qb = tl.cdiv(HP, BLOCK_Q)
    pid = tl.program_id(0)
    qb = pid % num_qb
    b = (pid // num_qb).to(tl.int64)
    # Per-sample bases in int64 (B x hP x N overflows int32); offsets inside one sample stay int32
    # (the launcher checks they fit), which halves the registers of every offset tile.
    q = qb * BLOCK_Q + tl.arange(0, BLOCK_Q)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    q_mask = q < HP
    n_mask = n < N
    x_base = X_ptr + b * stride_xb
    mean = tl.load(Mean_ptr + b * N + n, mask=n_mask, other=0.0)
    rstd = tl.load(Rstd_ptr + b * N + n, mask=n_mask, other=0.0)
    acc = tl.zeros([BLOCK_Q, BLOCK_N], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_K):
        c = c0 + tl.arange(0, BLOCK_K)
        c_mask = c < C
        g = tl.load(G_ptr + (q[:, None] * C + c[None, :]), mask=q_mask[:, None] & c_mask[None, :], other=0.0)
        x_mask = c_mask[:, None] & n_mask[None, :]
        x = tl.load(x_base + (c[:, None] * stride_xc + n[None, :] * stride_xn), mask=x_mask, other=0.0)
        # The centring is a subtraction on load: exact, and offset-proof.
        xc = tl.where(x_mask, x.to(tl.float32) - mean[None, :], 0.0)
        acc = mma(g, xc, acc, DOT_PRECISION)
    tl.store(S_ptr + b * HP * N + (q[:, None] * N + n[None, :]), acc * rstd[None, :],
             mask=q_mask[:, None] & n_mask[None, :])


@triton.jit
def _part_attention_fwd_softmax_kernel(
    S_ptr,            # [R, N] fp32: scores in, probabilities out (in place)
    R, N,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,   # BLOCK_N >= N: whole rows
):
    r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    n = tl.arange(0, BLOCK_N)
    mask = (r < R)[:, None] & (n < N)[None, :]
    ptrs = S_ptr + (r[:, None] * N + n[None, :])
    s = tl.where((n < N)[None, :], tl.load(ptrs, mask=mask, other=0.0), float("-inf"))
    e = tl.exp2((s - tl.max(s, axis=1)[:, None]) * LOG2E)
    tl.store(ptrs, e / tl.sum(e, axis=1)[:, None], mask=mask)


@triton.jit(do_not_specialize=["H"])
def _part_attention_fwd_parts_kernel(
    X_ptr,            # [B, C, N] any strides
    Probs_ptr,        # [B, h, P, N] fp32 contiguous
    Gamma_ptr,        # [C] fp32
    Beta_ptr,         # [C] fp32
    Mean_ptr,         # [B, N] fp32
    Rstd_ptr,         # [B, N] fp32
    Parts_ptr,        # [B, P, C] contiguous out
    C, N, P, D, H,
    stride_xb, stride_xc, stride_xn,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # dots.mma precision
):
    # parts_j = gamma * ((probs_j * rstd) @ Xc^T) + beta over head j's channels. Grid: (query block
    # fastest, sample) x (head, channel block within the head): a block never straddles two heads.
    num_pb = tl.cdiv(P, BLOCK_P)
    pid = tl.program_id(0)
    pb = pid % num_pb
    b = (pid // num_pb).to(tl.int64)
    num_cb = tl.cdiv(D, BLOCK_C)
    j = tl.program_id(1) // num_cb
    cb = tl.program_id(1) % num_cb
    p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    c = j * D + cb * BLOCK_C + tl.arange(0, BLOCK_C)
    p_mask = p < P
    c_mask = c < (j + 1) * D
    x_base = X_ptr + b * stride_xb
    probs_base = Probs_ptr + (b * H + j) * P * N
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_K):
        n = n0 + tl.arange(0, BLOCK_K)
        n_mask = n < N
        mean = tl.load(Mean_ptr + b * N + n, mask=n_mask, other=0.0)
        rstd = tl.load(Rstd_ptr + b * N + n, mask=n_mask, other=0.0)
        probs = tl.load(probs_base + (p[:, None] * N + n[None, :]), mask=p_mask[:, None] & n_mask[None, :],
                        other=0.0)
        xt_mask = n_mask[:, None] & c_mask[None, :]
        xt = tl.load(x_base + (n[:, None] * stride_xn + c[None, :] * stride_xc), mask=xt_mask, other=0.0)
        xct = tl.where(xt_mask, xt.to(tl.float32) - mean[:, None], 0.0)
        acc = mma(probs * rstd[None, :], xct, acc, DOT_PRECISION)
    gamma = tl.load(Gamma_ptr + c, mask=c_mask, other=0.0)
    beta = tl.load(Beta_ptr + c, mask=c_mask, other=0.0)
    out = acc * gamma[None, :] + beta[None, :]
    tl.store(Parts_ptr + b * P * C + (p[:, None] * C + c[None, :]), out.to(Parts_ptr.dtype.element_ty),
             mask=p_mask[:, None] & c_mask[None, :])


@triton.jit(do_not_specialize=["H"])
def _part_attention_fwd_rows_kernel(
    X_ptr,            # [B, C, N] any strides
    G_ptr,            # [h, P, C] fp32 contiguous
    Gamma_ptr,        # [C] fp32
    Beta_ptr,         # [C] fp32
    Mean_ptr,         # [B, N] fp32 out (in with HAS_STATS)
    Rstd_ptr,         # [B, N] fp32 out (in with HAS_STATS)
    Probs_ptr,        # [B, h, P, N] fp32 out
    Parts_ptr,        # [B, P, C] contiguous out
    C, N, P, D, H,
    stride_xb, stride_xc, stride_xn,
    eps,
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,   # BLOCK_N >= N: whole rows
    DOT_PRECISION: tl.constexpr,  # dots.mma precision
    HAS_STATS: tl.constexpr,      # the token statistics come with x: read, not computed
):
    # Short rows (N <= plans_part_attention.ROW_TOKENS): one program per (sample, head, query block) keeps its rows of
    # scores on chip from the product to the parts. Pass 1 over all C channels: S and the token
    # statistics together; the softmax in registers; pass 2 over the head's channels: the parts. The
    # programs of one sample run side by side (query block fastest), so both passes read x_b from L2.
    qb, j, b = block_head_sample(P, BLOCK_Q, H)
    q = qb * BLOCK_Q + tl.arange(0, BLOCK_Q)
    n = tl.arange(0, BLOCK_N)
    q_mask = q < P
    n_mask = n < N
    x_base = X_ptr + b * stride_xb
    g_base = G_ptr + j * P * C
    if HAS_STATS:
        # Given statistics: the product contracts the centred tokens x - mean themselves.
        shift = tl.load(Mean_ptr + b * N + n, mask=n_mask, other=0.0)
        rstd = tl.load(Rstd_ptr + b * N + n, mask=n_mask, other=0.0)
    else:
        # The mean is not known until the pass ends, so the product contracts x - shift (shift = the token's
        # first channel, as the statistics kernel): G (X - mean) = G (X - shift) - rowsum(G) (mean - shift).
        # With a large common offset (x + 1000) x - shift is O(std): nothing cancels in the product.
        shift = tl.load(x_base + n * stride_xn, mask=n_mask, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_Q, BLOCK_N], dtype=tl.float32)
    g_sum = tl.zeros([BLOCK_Q], dtype=tl.float32)
    mean = tl.zeros([BLOCK_N], dtype=tl.float32)     # of x - shift, merged chunk by chunk (Chan et al.)
    m2 = tl.zeros([BLOCK_N], dtype=tl.float32)
    count = 0.0
    for c0 in range(0, C, BLOCK_K):
        c = c0 + tl.arange(0, BLOCK_K)
        c_mask = c < C
        g = tl.load(g_base + (q[:, None] * C + c[None, :]), mask=q_mask[:, None] & c_mask[None, :], other=0.0)
        x_mask = c_mask[:, None] & n_mask[None, :]
        x = tl.load(x_base + (c[:, None] * stride_xc + n[None, :] * stride_xn), mask=x_mask, other=0.0)
        xs = tl.where(x_mask, x.to(tl.float32) - shift[None, :], 0.0)
        acc = mma(g, xs, acc, DOT_PRECISION)
        if not HAS_STATS:
            g_sum += tl.sum(g, axis=1)
            chunk_count = tl.minimum(C - c0, BLOCK_K).to(tl.float32)
            chunk_mean = tl.sum(xs, axis=0) / chunk_count
            centred = tl.where(x_mask, xs - chunk_mean[None, :], 0.0)
            total = count + chunk_count
            delta = chunk_mean - mean
            mean += delta * (chunk_count / total)
            m2 += tl.sum(centred * centred, axis=0) + delta * delta * (count * chunk_count / total)
            count = total
    if HAS_STATS:
        s = acc * rstd[None, :]
        mean = shift
    else:
        rstd = 1.0 / tl.sqrt(m2 / C + eps)
        s = (acc - g_sum[:, None] * mean[None, :]) * rstd[None, :]
        mean += shift
        # Every program of the sample computes the same statistics in the same order; one stores them.
        if (qb == 0) & (j == 0):
            tl.store(Mean_ptr + b * N + n, mean, mask=n_mask)
            tl.store(Rstd_ptr + b * N + n, rstd, mask=n_mask)

    s = tl.where(n_mask[None, :], s, float("-inf"))
    e = tl.exp2((s - tl.max(s, axis=1)[:, None]) * LOG2E)
    probs = e / tl.sum(e, axis=1)[:, None]
    tl.store(Probs_ptr + (b * H + j) * P * N + (q[:, None] * N + n[None, :]), probs,
             mask=q_mask[:, None] & n_mask[None, :])

    # parts_j = gamma * ((probs_j * rstd) @ Xc^T) + beta over the head's channels, x_b again (from L2).
    w = round_operand(probs * rstd[None, :], DOT_PRECISION)    # rounded once, held in the operand dtype
    head_end = (j + 1) * D
    for c0 in range(j * D, head_end, BLOCK_K):
        c = c0 + tl.arange(0, BLOCK_K)
        c_mask = c < head_end
        xt_mask = n_mask[:, None] & c_mask[None, :]
        xt = tl.load(x_base + (n[:, None] * stride_xn + c[None, :] * stride_xc), mask=xt_mask, other=0.0)
        xct = tl.where(xt_mask, xt.to(tl.float32) - mean[:, None], 0.0)
        out = mma(w, xct, tl.zeros([BLOCK_Q, BLOCK_K], dtype=tl.float32), DOT_PRECISION)
        gamma = tl.load(Gamma_ptr + c, mask=c_mask, other=0.0)
        beta = tl.load(Beta_ptr + c, mask=c_mask, other=0.0)
        out = out * gamma[None, :] + beta[None, :]
        tl.store(Parts_ptr + b * P * C + (q[:, None] * C + c[None, :]), out.to(Parts_ptr.dtype.element_ty),
                 mask=q_mask[:, None] & c_mask[None, :])
