"""Fused part attention: LayerNorm folded into the query-key product, softmax over tokens, weighted sum.

The key projection is folded into the queries by the caller: ``g [h, P, C] = (scale * Q_j @ Wk_j) * gamma``.
With ``X_b`` one sample's map as ``[C, N]`` (read in place, any strides), ``Xc = X_b - mean`` per token
and ``rstd`` the token's inverse standard deviation:

    S_j = rstd * (G_j @ Xc)                 (the LayerNorm-ed keys are never formed)
    probs_j = softmax_n(S_j)
    parts_j = gamma * ((probs_j * rstd) @ Xc^T) + beta      (head-j channels; sum_n probs = 1)

Kernels (one program per tile, every reduction deterministic):
- ``_part_attention_stats_kernel``: token mean / rstd, one pass over C with Chan's chunk merge.
- ``_part_attention_fwd_kernel``: per (sample, head, query block): S, softmax, probs, parts.
- ``_part_attention_bwd_kernel``: per (sample, head, query block): dS, and per-program partial sums
  of dgamma / dbeta (summed afterwards).
- ``_part_attention_bwd_dg_kernel``: dG = sum_b (dS_b * rstd_b) @ Xc_b^T, the batch loop inside.
- ``_part_attention_bwd_dxhat_kernel`` + ``_part_attention_bwd_dx_kernel``: the gradient of x, only
  when asked for.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import config as cfg

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TL_TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}


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


# ---- launchers ----

def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, stride {tuple(t.stride())}, dtype {t.dtype}, device {t.device}"


def _check(name: str, t, shape: tuple, dtypes: tuple, device: torch.device, contiguous: bool = False) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {_describe(t)}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {_describe(t)}")
    if t.device != device:
        raise RuntimeError(f"{name} must be on {device} like x, got {_describe(t)}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got {_describe(t)}")


def _check_x(x, g, num_heads: int):
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ValueError(f"x must be a [B, C, N] tensor, got "
                         f"{_describe(x) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16, got {_describe(x)}")
    bsz, c, n = x.shape
    if bsz == 0 or c == 0 or n == 0:
        raise ValueError(f"x must have B, C, N > 0, got {_describe(x)}")
    if n > cfg.PA_MAX_TOKENS:
        raise ValueError(f"x has N={n} tokens; the kernels hold all tokens of a sample in one block, "
                         f"at most {cfg.PA_MAX_TOKENS}: {_describe(x)}")
    if not isinstance(num_heads, int) or num_heads <= 0 or c % num_heads:
        raise ValueError(f"num_heads must be a positive divisor of C={c}, got {num_heads!r}")
    if not isinstance(g, torch.Tensor) or g.dim() != 3:
        raise ValueError(f"g must be a [h, P, C] tensor, got "
                         f"{_describe(g) if isinstance(g, torch.Tensor) else type(g).__name__}")
    _check("g", g, (num_heads, g.shape[1], c), (torch.float32,), x.device, contiguous=True)
    p = g.shape[1]
    if p == 0:
        raise ValueError(f"g must have P > 0 queries, got {_describe(g)}")
    # Offsets inside one sample (and within g) are int32 in the kernels; only per-sample bases are int64.
    span = max((c - 1) * abs(x.stride(1)) + (n - 1) * abs(x.stride(2)) + 1, num_heads * p * max(c, n))
    if span >= 2 ** 31:
        raise ValueError(f"one sample of x or g spans {span} elements, more than int32 offsets address: "
                         f"x {_describe(x)}, g {_describe(g)}")
    return bsz, c, n, p


def part_attention_fwd(x: torch.Tensor, g: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
                       num_heads: int, eps: float, out_dtype: Optional[torch.dtype] = None):
    """Forward of the fused part attention.

    ``x [B, C, N]`` (any strides, fp32/fp16/bf16, read in place), ``g [h, P, C]`` fp32 folded queries,
    ``gamma, beta [C]`` fp32. Returns ``parts [B, P, C]`` (``out_dtype``, default ``x.dtype``),
    ``probs [B, h, P, N]`` fp32, ``mean [B, N]`` and ``rstd [B, N]`` fp32.
    """
    bsz, c, n, p = _check_x(x, g, num_heads)
    _check("gamma", gamma, (c,), (torch.float32,), x.device, contiguous=True)
    _check("beta", beta, (c,), (torch.float32,), x.device, contiguous=True)
    out_dtype = x.dtype if out_dtype is None else out_dtype
    if out_dtype not in _FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be float32, float16 or bfloat16, got {out_dtype}")
    h, d = num_heads, c // num_heads
    blocks = cfg.pa_blocks()

    mean = torch.empty(bsz, n, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    grid = (bsz, triton.cdiv(n, blocks.stats_n))
    _part_attention_stats_kernel[grid](
        x, mean, rstd, c, n, x.stride(0), x.stride(1), x.stride(2), float(eps),
        BLOCK_C=blocks.stats_c, BLOCK_N=blocks.stats_n,
        num_warps=blocks.stats_num_warps, num_stages=blocks.num_stages,
    )

    block_n = cfg.pa_block_n(n)
    block_p = cfg.pa_block_p(p, block_n, blocks.fwd_p)
    parts = torch.empty(bsz, p, c, device=x.device, dtype=out_dtype)
    probs = torch.empty(bsz, h, p, n, device=x.device, dtype=torch.float32)
    grid = (bsz * h * triton.cdiv(p, block_p),)
    _part_attention_fwd_kernel[grid](
        x, g, gamma, beta, mean, rstd, parts, probs,
        c, n, p, d, h,
        x.stride(0), x.stride(1), x.stride(2),
        BLOCK_P=block_p, BLOCK_N=block_n, BLOCK_C=cfg.pa_block_d(c, blocks.fwd_c),
        BLOCK_D=cfg.pa_block_d(d, blocks.fwd_d),
        DOT_PRECISION=blocks.dot_precision,
        num_warps=blocks.num_warps, num_stages=blocks.num_stages,
    )
    return parts, probs, mean, rstd


def part_attention_bwd(x: torch.Tensor, g: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
                       probs: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                       dparts: torch.Tensor, dattn: Optional[torch.Tensor], num_heads: int, needs_dx: bool):
    """Backward of the fused part attention, from the forward's saved ``probs``, ``mean``, ``rstd``.

    ``dparts [B, P, C]`` (any float dtype), ``dattn [B, P, N]`` or None (gradient of the head-mean of probs).
    Returns ``dg [h, P, C]``, ``dgamma [C]`` (through the values only), ``dbeta [C]`` (all fp32) and
    ``dx`` in ``x.dtype`` with the strides of ``x`` when ``x`` is dense (else contiguous), or None.
    """
    bsz, c, n, p = _check_x(x, g, num_heads)
    h, d = num_heads, c // num_heads
    dev = x.device
    _check("gamma", gamma, (c,), (torch.float32,), dev, contiguous=True)
    _check("beta", beta, (c,), (torch.float32,), dev, contiguous=True)
    _check("probs", probs, (bsz, h, p, n), (torch.float32,), dev, contiguous=True)
    _check("mean", mean, (bsz, n), (torch.float32,), dev, contiguous=True)
    _check("rstd", rstd, (bsz, n), (torch.float32,), dev, contiguous=True)
    _check("dparts", dparts, (bsz, p, c), _FLOAT_DTYPES, dev)
    dparts = dparts.contiguous()
    if dattn is not None:
        _check("dattn", dattn, (bsz, p, n), _FLOAT_DTYPES, dev)
        dattn = dattn.contiguous()

    blocks = cfg.pa_blocks()
    block_n = cfg.pa_block_n(n)
    block_p = cfg.pa_block_p(p, block_n, blocks.bwd_p)
    num_pb = triton.cdiv(p, block_p)
    ds = torch.empty(bsz, h, p, n, device=dev, dtype=torch.float32)
    dgamma_part = torch.empty(bsz * num_pb, c, device=dev, dtype=torch.float32)
    dbeta_part = torch.empty_like(dgamma_part)
    _part_attention_bwd_kernel[(bsz * h * num_pb,)](
        x, gamma, mean, rstd, probs, dparts, dattn if dattn is not None else dparts,
        ds, dgamma_part, dbeta_part,
        c, n, p, d, h,
        x.stride(0), x.stride(1), x.stride(2),
        1.0 / h,
        HAS_DATTN=dattn is not None,
        BLOCK_P=block_p, BLOCK_N=block_n, BLOCK_D=cfg.pa_block_d(d, blocks.bwd_d),
        DOT_PRECISION=blocks.dot_precision,
        num_warps=blocks.num_warps, num_stages=blocks.num_stages,
    )
    dgamma = dgamma_part.sum(0)
    dbeta = dbeta_part.sum(0)

    dg = torch.empty(h, p, c, device=dev, dtype=torch.float32)
    dg_block_p = cfg.pa_block_p(p, block_n, blocks.dg_p)
    dg_block_c = cfg.pa_block_d(c, blocks.dg_c)
    _part_attention_bwd_dg_kernel[(h, triton.cdiv(p, dg_block_p), triton.cdiv(c, dg_block_c))](
        x, mean, rstd, ds, dg,
        bsz, c, n, p, h,
        x.stride(0), x.stride(1), x.stride(2),
        BLOCK_P=dg_block_p, BLOCK_N=min(block_n, blocks.dg_n), BLOCK_C=dg_block_c,
        DOT_PRECISION=blocks.dot_precision,
        num_warps=blocks.num_warps, num_stages=blocks.num_stages,
    )

    dx = None
    if needs_dx:
        dxhat = torch.empty(bsz, c, n, device=dev, dtype=torch.float32)
        dx_block_c = cfg.pa_block_d(d, blocks.dx_c)
        dx_block_p = cfg.pa_block_p(p, block_n, blocks.dx_p)
        _part_attention_bwd_dxhat_kernel[(bsz, h, triton.cdiv(d, dx_block_c))](
            g, gamma, probs, ds, dparts, dxhat,
            c, n, p, d, h,
            BLOCK_C=dx_block_c, BLOCK_N=block_n, BLOCK_P=dx_block_p,
            DOT_PRECISION=blocks.dot_precision,
            num_warps=blocks.num_warps, num_stages=blocks.num_stages,
        )
        # Same strides as x when x is a dense view (channels_last flatten, token transpose), so the
        # caller can view dx back into x's shape without a copy.
        dx = torch.empty_like(x) if _is_dense(x) else torch.empty(bsz, c, n, device=dev, dtype=x.dtype)
        _part_attention_bwd_dx_kernel[(bsz, triton.cdiv(n, blocks.stats_n))](
            x, mean, rstd, dxhat, dx,
            c, n,
            x.stride(0), x.stride(1), x.stride(2),
            dx.stride(0), dx.stride(1), dx.stride(2),
            BLOCK_C=blocks.stats_c, BLOCK_N=blocks.stats_n,
            num_warps=blocks.stats_num_warps, num_stages=blocks.num_stages,
        )
    return dg, dgamma, dbeta, dx


def _is_dense(t: torch.Tensor) -> bool:
    """True when the tensor's elements exactly fill its storage span (a permutation of a contiguous layout)."""
    order = sorted(range(t.dim()), key=lambda i: t.stride(i))
    expected = 1
    for i in order:
        if t.stride(i) != expected and t.shape[i] != 1:
            return False
        expected *= t.shape[i]
    return True


def compile_specs() -> list[cfg.KernelSpec]:
    """Every kernel at production sizes (C=2048, N=196, P=312, h=1; fp32 and bf16 x read as [B, C, H, W])
    with the GPU tile sizes, for ahead-of-time compilation (``python -m c2f.kernels.inspect``)."""
    c, n, p, h = 2048, 196, 312, 1
    blocks = cfg.PA_GPU_BLOCKS
    block_n = cfg.pa_block_n(n)
    # A contiguous [B, C, 14, 14] map: stride_xn = 1 (the JIT specialises ints equal to 1 as constexpr),
    # stride_xb = C * N is 16-aligned, stride_xc = N = 196 is not.
    x_strides = {"stride_xb": "i32", "stride_xc": "i32", "stride_xn": "constexpr"}
    sizes = {"C": "i32", "N": "i32", "P": "i32", "D": "i32", "H": "constexpr"}   # H = 1 specialised too
    specs = []
    for dtype in (torch.float32, torch.bfloat16):
        x_ty = _TL_TYPES[dtype]
        tag = x_ty[1:]
        specs.append(cfg.KernelSpec(
            name=f"_part_attention_stats_kernel_{tag}", fn=_part_attention_stats_kernel,
            signature={"X_ptr": x_ty, "Mean_ptr": "*fp32", "Rstd_ptr": "*fp32", "C": "i32", "N": "i32",
                       **x_strides, "eps": "fp32", "BLOCK_C": "constexpr", "BLOCK_N": "constexpr"},
            constexprs={"stride_xn": 1, "BLOCK_C": blocks.stats_c, "BLOCK_N": blocks.stats_n},
            num_warps=blocks.stats_num_warps, num_stages=blocks.num_stages,
            aligned=("X_ptr", "Mean_ptr", "Rstd_ptr", "C", "stride_xb")))
        specs.append(cfg.KernelSpec(
            name=f"_part_attention_fwd_kernel_{tag}", fn=_part_attention_fwd_kernel,
            signature={"X_ptr": x_ty, "G_ptr": "*fp32", "Gamma_ptr": "*fp32", "Beta_ptr": "*fp32",
                       "Mean_ptr": "*fp32", "Rstd_ptr": "*fp32", "Parts_ptr": x_ty, "Probs_ptr": "*fp32",
                       **sizes, **x_strides, "BLOCK_P": "constexpr", "BLOCK_N": "constexpr",
                       "BLOCK_C": "constexpr", "BLOCK_D": "constexpr", "DOT_PRECISION": "constexpr"},
            constexprs={"H": h, "stride_xn": 1, "BLOCK_P": cfg.pa_block_p(p, block_n, blocks.fwd_p),
                        "BLOCK_N": block_n, "BLOCK_C": blocks.fwd_c, "BLOCK_D": cfg.pa_block_d(c // h, blocks.fwd_d),
                        "DOT_PRECISION": blocks.dot_precision},
            num_warps=blocks.num_warps, num_stages=blocks.num_stages,
            aligned=("X_ptr", "G_ptr", "Gamma_ptr", "Beta_ptr", "Mean_ptr", "Rstd_ptr", "Parts_ptr", "Probs_ptr",
                     "C", "D", "stride_xb")))
        for has_dattn in (True, False):
            specs.append(cfg.KernelSpec(
                name=f"_part_attention_bwd_kernel_{tag}{'_dattn' if has_dattn else ''}",
                fn=_part_attention_bwd_kernel,
                signature={"X_ptr": x_ty, "Gamma_ptr": "*fp32", "Mean_ptr": "*fp32", "Rstd_ptr": "*fp32",
                           "Probs_ptr": "*fp32", "DParts_ptr": x_ty, "DAttn_ptr": "*fp32", "DS_ptr": "*fp32",
                           "DGammaPart_ptr": "*fp32", "DBetaPart_ptr": "*fp32", **sizes, **x_strides,
                           "inv_h": "fp32", "HAS_DATTN": "constexpr", "BLOCK_P": "constexpr",
                           "BLOCK_N": "constexpr", "BLOCK_D": "constexpr", "DOT_PRECISION": "constexpr"},
                constexprs={"H": h, "stride_xn": 1, "HAS_DATTN": has_dattn,
                            "BLOCK_P": cfg.pa_block_p(p, block_n, blocks.bwd_p), "BLOCK_N": block_n,
                            "BLOCK_D": cfg.pa_block_d(c // h, blocks.bwd_d), "DOT_PRECISION": blocks.dot_precision},
                num_warps=blocks.num_warps, num_stages=blocks.num_stages,
                aligned=("X_ptr", "Gamma_ptr", "Mean_ptr", "Rstd_ptr", "Probs_ptr", "DParts_ptr", "DAttn_ptr",
                         "DS_ptr", "DGammaPart_ptr", "DBetaPart_ptr", "C", "D", "stride_xb")))
        specs.append(cfg.KernelSpec(
            name=f"_part_attention_bwd_dg_kernel_{tag}", fn=_part_attention_bwd_dg_kernel,
            signature={"X_ptr": x_ty, "Mean_ptr": "*fp32", "Rstd_ptr": "*fp32", "DS_ptr": "*fp32",
                       "DG_ptr": "*fp32", "B": "i32", "C": "i32", "N": "i32", "P": "i32", "H": "constexpr",
                       **x_strides, "BLOCK_P": "constexpr", "BLOCK_N": "constexpr", "BLOCK_C": "constexpr",
                       "DOT_PRECISION": "constexpr"},
            constexprs={"H": h, "stride_xn": 1, "BLOCK_P": cfg.pa_block_p(p, block_n, blocks.dg_p),
                        "BLOCK_N": min(block_n, blocks.dg_n), "BLOCK_C": cfg.pa_block_d(c, blocks.dg_c),
                        "DOT_PRECISION": blocks.dot_precision},
            num_warps=blocks.num_warps, num_stages=blocks.num_stages,
            aligned=("X_ptr", "Mean_ptr", "Rstd_ptr", "DS_ptr", "DG_ptr", "C", "stride_xb")))
        specs.append(cfg.KernelSpec(
            name=f"_part_attention_bwd_dxhat_kernel_{tag}", fn=_part_attention_bwd_dxhat_kernel,
            signature={"G_ptr": "*fp32", "Gamma_ptr": "*fp32", "Probs_ptr": "*fp32", "DS_ptr": "*fp32",
                       "DParts_ptr": x_ty, "DXhat_ptr": "*fp32", **sizes,
                       "BLOCK_C": "constexpr", "BLOCK_N": "constexpr", "BLOCK_P": "constexpr",
                       "DOT_PRECISION": "constexpr"},
            constexprs={"H": h, "BLOCK_C": cfg.pa_block_d(c // h, blocks.dx_c), "BLOCK_N": block_n,
                        "BLOCK_P": cfg.pa_block_p(p, block_n, blocks.dx_p), "DOT_PRECISION": blocks.dot_precision},
            num_warps=blocks.num_warps, num_stages=blocks.num_stages,
            aligned=("G_ptr", "Gamma_ptr", "Probs_ptr", "DS_ptr", "DParts_ptr", "DXhat_ptr", "C", "D")))
        specs.append(cfg.KernelSpec(
            name=f"_part_attention_bwd_dx_kernel_{tag}", fn=_part_attention_bwd_dx_kernel,
            signature={"X_ptr": x_ty, "Mean_ptr": "*fp32", "Rstd_ptr": "*fp32", "DXhat_ptr": "*fp32",
                       "DX_ptr": x_ty, "C": "i32", "N": "i32", **x_strides,
                       "stride_db": "i32", "stride_dc": "i32", "stride_dn": "constexpr",
                       "BLOCK_C": "constexpr", "BLOCK_N": "constexpr"},
            constexprs={"stride_xn": 1, "stride_dn": 1, "BLOCK_C": blocks.stats_c, "BLOCK_N": blocks.stats_n},
            num_warps=blocks.stats_num_warps, num_stages=blocks.num_stages,
            aligned=("X_ptr", "Mean_ptr", "Rstd_ptr", "DXhat_ptr", "DX_ptr", "C", "stride_xb", "stride_db")))
    return specs
