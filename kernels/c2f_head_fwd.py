"""Fused C2F head forward kernels (docs/design.md, "The algebra" 8: the head never forms F).

With ``X_b`` one sample's map as ``[C, N]`` (read in place, any strides), ``Xc = X_b - mean`` per
token, ``rstd`` its inverse std, the folded weights ``g [h, P, C]``, ``wrg [P, C]`` and the pooling
matrix ``M_b [2K, P]`` (``[mask[:, b]; 1 - mask[:, perm^-1 b]] / P``)::

    S_j    = rstd * (G_j @ Xc)              P_j = softmax_n(S_j)            (the attention maps)
    Zhat_j = rstd * (Wrg_j @ Xc_j)          (head-j channels)               pred = sum_{j,n} P_j Zhat_j
    coef_j = M_b @ P_j                      U = (coef_j * rstd) @ Xc_j^T    (the pooled mixed-view rows)

- ``_c2f_head_fwd_kernel``: per (sample, head, query block): S and Zhat in one pass over the channels,
  the softmax, P (the saved probabilities), Zhat, the head's share of pred and the query block's share
  of coef (partials summed afterwards: deterministic, no atomics). Past one chunk of tokens, two passes
  over the chunks (an online softmax), so no tile spans all N. With the plan flag ``head_fwd_one_pass``
  (``POOL_IN_PASS``, off by default) the last query block of each (sample, head), found by an atomic
  counter, sums the partials in a fixed order and computes the pooled rows itself: no pool launch.
- ``_c2f_head_pool_kernel``: per (sample, head, channel split): U from coef; in backward also
  ``dcoef = (dU @ Xc_j) * rstd`` over the same channels (per-split partials); tokens in chunks.
"""
import triton
import triton.language as tl

from .dots import mma

LOG2E = tl.constexpr(1.4426950408889634)


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
def _scores_readout(x_base, g_rows, w_rows, p_mask, n, n_mask, mean, rstd, C, head_start, head_end,
                    stride_xc, stride_xn, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
                    DOT_PRECISION: tl.constexpr):
    """``(S, Zhat)`` on the tokens ``n``: [BLOCK_P, len(n)] fp32, S = -inf outside ``n_mask``."""
    # One pass over the channels: the scores contract all of them, the readout only head j's, so
    # the pass is split at the head's edges and each x chunk is read once.
    s = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    z = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    for c0 in range(0, head_start, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_mask = c < head_start
        g = tl.load(g_rows + c[None, :], mask=p_mask[:, None] & c_mask[None, :], other=0.0)
        s = mma(g, _centred(x_base, c, c_mask, n, n_mask, mean, stride_xc, stride_xn), s, DOT_PRECISION)
    for c0 in range(head_start, head_end, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_mask = c < head_end
        pc_mask = p_mask[:, None] & c_mask[None, :]
        xc = _centred(x_base, c, c_mask, n, n_mask, mean, stride_xc, stride_xn)
        g = tl.load(g_rows + c[None, :], mask=pc_mask, other=0.0)
        w = tl.load(w_rows + c[None, :], mask=pc_mask, other=0.0)
        s = mma(g, xc, s, DOT_PRECISION)
        z = mma(w, xc, z, DOT_PRECISION)
    for c0 in range(head_end, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_mask = c < C
        g = tl.load(g_rows + c[None, :], mask=p_mask[:, None] & c_mask[None, :], other=0.0)
        s = mma(g, _centred(x_base, c, c_mask, n, n_mask, mean, stride_xc, stride_xn), s, DOT_PRECISION)
    return tl.where(n_mask[None, :], s * rstd[None, :], float("-inf")), z * rstd[None, :]


@triton.jit
def _emit(probs, zhat, M_ptr, Probs_ptr, part_base, rows, pn_mask, b, p, p_mask, n, n_mask, N, P, V,
          BLOCK_V: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Stores the probabilities and this query block's share of coef_j = M_b @ P_j on the tokens ``n``
    (M is zero on padded queries: their probabilities drop out); returns the rows' share of pred."""
    tl.store(Probs_ptr + rows, probs, mask=pn_mask)
    for v0 in range(0, V, BLOCK_V):
        v = v0 + tl.arange(0, BLOCK_V)
        v_mask = v < V
        m = tl.load(M_ptr + b * V * P + (v[:, None] * P + p[None, :]), mask=v_mask[:, None] & p_mask[None, :],
                    other=0.0)
        coef = mma(m, probs, tl.zeros([BLOCK_V, BLOCK_N], dtype=tl.float32), DOT_PRECISION)
        tl.store(part_base + (v[:, None] * N + n[None, :]), coef, mask=v_mask[:, None] & n_mask[None, :])
    return tl.sum(probs * zhat, axis=1)


@triton.jit
def _pooled_rows(x_base, mean_base, rstd_base, coef_base, u_base, v, v_mask, c_start, c_end, C, N, stride_xc,
                 stride_xn, BLOCK_V: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):
    """``U[v, c] = (coef[v] * rstd) Xc[c]^T`` on the channels ``[c_start, c_end)``: [BLOCK_V, BLOCK_C] output
    tiles, the tokens walked in BLOCK_N chunks; ``coef_base`` [V, N], ``u_base`` [V, C]."""
    for c0 in range(c_start, c_end, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_mask = c < c_end
        u = tl.zeros([BLOCK_V, BLOCK_C], dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            n_mask = n < N
            mean = tl.load(mean_base + n, mask=n_mask, other=0.0)
            rstd = tl.load(rstd_base + n, mask=n_mask, other=0.0)
            # .cg: in the one-pass forward other programs wrote coef; never from a stale L1 line.
            coef = tl.load(coef_base + (v[:, None] * N + n[None, :]), mask=v_mask[:, None] & n_mask[None, :],
                           other=0.0, cache_modifier=".cg")
            xct = _centred_t(x_base, n, n_mask, c, c_mask, mean, stride_xc, stride_xn)
            u = mma(coef * rstd[None, :], xct, u, DOT_PRECISION)
        tl.store(u_base + (v[:, None] * C + c[None, :]), u, mask=v_mask[:, None] & c_mask[None, :])


@triton.jit
def _sum_partials(part_base, num_parts, V, N, BLOCK_V: tl.constexpr, BLOCK_N: tl.constexpr):
    """Sums ``num_parts`` consecutive ``[V, N]`` partials into the first, in a fixed order (deterministic
    whichever program runs it); read past L1 (.cg), as other programs wrote them."""
    for v0 in range(0, V, BLOCK_V):
        v = v0 + tl.arange(0, BLOCK_V)
        for n0 in range(0, N, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            offs = v[:, None] * N + n[None, :]
            vn_mask = (v < V)[:, None] & (n < N)[None, :]
            acc = tl.load(part_base + offs, mask=vn_mask, other=0.0, cache_modifier=".cg")
            for q in range(1, num_parts):
                acc += tl.load(part_base + q * V * N + offs, mask=vn_mask, other=0.0, cache_modifier=".cg")
            tl.store(part_base + offs, acc, mask=vn_mask)


@triton.jit(do_not_specialize=["N", "H"])
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
    Counter_ptr,      # [B, h] int32, zeros (POOL_IN_PASS): query blocks of (sample, head) done
    U_ptr,            # [B, V, C] fp32 out (POOL_IN_PASS): the pooled rows
    C, N, P, D, H, V,
    stride_xb, stride_xc, stride_xn,
    SINGLE_PASS: tl.constexpr,    # all tokens in one BLOCK_N chunk; else two passes over the chunks
    POOL_IN_PASS: tl.constexpr,   # the last query block of (sample, head) also pools its rows (plan flag)
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_V: tl.constexpr,
    POOL_BLOCK_N: tl.constexpr, POOL_BLOCK_C: tl.constexpr,   # the pooled rows' tiles (POOL_IN_PASS)
    DOT_PRECISION: tl.constexpr,  # dots.mma precision
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
    p_mask = p < P
    x_base = X_ptr + b * stride_xb
    g_rows = G_ptr + j * P * C + p[:, None] * C
    w_rows = Wrg_ptr + p[:, None] * C
    out_base = (b * H + j) * P * N
    part_base = CoefPart_ptr + ((b * H + j) * num_pb + pb) * V * N
    head_start = j * D
    if SINGLE_PASS:
        n = tl.arange(0, BLOCK_N)
        n_mask = n < N
        mean = tl.load(Mean_ptr + b * N + n, mask=n_mask, other=0.0)
        rstd = tl.load(Rstd_ptr + b * N + n, mask=n_mask, other=0.0)
        s, zhat = _scores_readout(x_base, g_rows, w_rows, p_mask, n, n_mask, mean, rstd, C, head_start,
                                  head_start + D, stride_xc, stride_xn, BLOCK_P, BLOCK_N, BLOCK_C, DOT_PRECISION)
        e = tl.exp2((s - tl.max(s, axis=1)[:, None]) * LOG2E)
        probs = e / tl.sum(e, axis=1)[:, None]
        pn_mask = p_mask[:, None] & n_mask[None, :]
        rows = out_base + (p[:, None] * N + n[None, :])
        tl.store(Zhat_ptr + rows, zhat, mask=pn_mask)
        pred = _emit(probs, zhat, M_ptr, Probs_ptr, part_base, rows, pn_mask, b, p, p_mask, n, n_mask, N, P, V,
                     BLOCK_V, BLOCK_N, DOT_PRECISION)
    else:
        # Past one chunk of tokens (no tile spans all N): the first pass stores the scores and Zhat with
        # the rows' running max and sum (online softmax), the second normalises what it stored.
        row_max = tl.full([BLOCK_P], float("-inf"), dtype=tl.float32)
        row_sum = tl.zeros([BLOCK_P], dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            n_mask = n < N
            mean = tl.load(Mean_ptr + b * N + n, mask=n_mask, other=0.0)
            rstd = tl.load(Rstd_ptr + b * N + n, mask=n_mask, other=0.0)
            s, zhat = _scores_readout(x_base, g_rows, w_rows, p_mask, n, n_mask, mean, rstd, C, head_start,
                                      head_start + D, stride_xc, stride_xn, BLOCK_P, BLOCK_N, BLOCK_C, DOT_PRECISION)
            pn_mask = p_mask[:, None] & n_mask[None, :]
            rows = out_base + (p[:, None] * N + n[None, :])
            tl.store(Probs_ptr + rows, s, mask=pn_mask)
            tl.store(Zhat_ptr + rows, zhat, mask=pn_mask)
            new_max = tl.maximum(row_max, tl.max(s, axis=1))
            row_sum = row_sum * tl.exp2((row_max - new_max) * LOG2E) + \
                tl.sum(tl.exp2((s - new_max[:, None]) * LOG2E), axis=1)
            row_max = new_max
        # The second pass reads back what other threads of this program stored.
        tl.debug_barrier()
        pred = tl.zeros([BLOCK_P], dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            n_mask = n < N
            pn_mask = p_mask[:, None] & n_mask[None, :]
            rows = out_base + (p[:, None] * N + n[None, :])
            s = tl.load(Probs_ptr + rows, mask=pn_mask, other=float("-inf"))
            zhat = tl.load(Zhat_ptr + rows, mask=pn_mask, other=0.0)
            probs = tl.exp2((s - row_max[:, None]) * LOG2E) / row_sum[:, None]
            pred += _emit(probs, zhat, M_ptr, Probs_ptr, part_base, rows, pn_mask, b, p, p_mask, n, n_mask, N, P,
                          V, BLOCK_V, BLOCK_N, DOT_PRECISION)
    tl.store(Pred_ptr + (b * H + j) * P + p, pred, mask=p_mask)
    if POOL_IN_PASS:
        # The one-pass forward: every program's coef partial is stored (the barrier: by all its threads)
        # before it counts itself done (release); the program that counts last (acquire) sums the partials
        # in a fixed order and pools head j's rows, so no second launch re-reads x from HBM.
        tl.debug_barrier()
        done = tl.atomic_add(Counter_ptr + b * H + j, 1, sem="acq_rel")
        if done == num_pb - 1:
            coef_base = CoefPart_ptr + (b * H + j) * num_pb * V * N
            _sum_partials(coef_base, num_pb, V, N, BLOCK_V, POOL_BLOCK_N)
            tl.debug_barrier()
            for v0 in range(0, V, BLOCK_V):
                v = v0 + tl.arange(0, BLOCK_V)
                _pooled_rows(x_base, Mean_ptr + b * N, Rstd_ptr + b * N, coef_base, U_ptr + b * V * C, v, v < V,
                             head_start, head_start + D, C, N, stride_xc, stride_xn, BLOCK_V, POOL_BLOCK_N,
                             POOL_BLOCK_C, DOT_PRECISION)


@triton.jit(do_not_specialize=["N", "H"])
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
    BLOCK_V: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # dots.mma precision
):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    j = bh % H
    b = (bh // H).to(tl.int64)
    # The head's channels split evenly over grid axis 1 (a runtime figure: one compile for every head width).
    split_c = tl.cdiv(D, num_splits)
    c_start = j * D + split * split_c
    c_end = tl.minimum(c_start + split_c, (j + 1) * D)
    x_base = X_ptr + b * stride_xb
    coef_base = Coef_ptr + (b * H + j) * V * N
    for v0 in range(0, V, BLOCK_V):
        v = v0 + tl.arange(0, BLOCK_V)
        v_mask = v < V
        _pooled_rows(x_base, Mean_ptr + b * N, Rstd_ptr + b * N, coef_base, U_ptr + b * V * C, v, v_mask, c_start,
                     c_end, C, N, stride_xc, stride_xn, BLOCK_V, BLOCK_N, BLOCK_C, DOT_PRECISION)
        if HAS_DU:
            # dcoef = (dU Xc) * rstd: [BLOCK_V, BLOCK_N] output tiles over the same channels (L2-resident)
            # with x in the other orientation: one orientation per loop keeps its tiles in registers.
            part = DCoefPart_ptr + ((b * H + j) * num_splits + split) * V * N
            for n0 in range(0, N, BLOCK_N):
                n = n0 + tl.arange(0, BLOCK_N)
                n_mask = n < N
                mean = tl.load(Mean_ptr + b * N + n, mask=n_mask, other=0.0)
                rstd = tl.load(Rstd_ptr + b * N + n, mask=n_mask, other=0.0)
                dcoef = tl.zeros([BLOCK_V, BLOCK_N], dtype=tl.float32)
                for c0 in range(c_start, c_end, BLOCK_C):
                    c = c0 + tl.arange(0, BLOCK_C)
                    c_mask = c < c_end
                    du = tl.load(DU_ptr + b * V * C + (v[:, None] * C + c[None, :]),
                                 mask=v_mask[:, None] & c_mask[None, :], other=0.0)
                    xc = _centred(x_base, c, c_mask, n, n_mask, mean, stride_xc, stride_xn)
                    dcoef = mma(du, xc, dcoef, DOT_PRECISION)
                tl.store(part + (v[:, None] * N + n[None, :]), dcoef * rstd[None, :],
                         mask=v_mask[:, None] & n_mask[None, :])
