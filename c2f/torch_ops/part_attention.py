"""Part attention as batched torch ops: the torch-op implementation of the op contract that
``c2f.kernels.part_attention`` implements with Triton kernels (same functions, same signatures, same
saved state; docs/design.md, "The op contract").

``dot_precision``: "bf16" / "fp16" round the GEMM operands to that dtype (autocast; statistics, softmax
and logsumexp stay fp32); "tf32" / "ieee" keep fp32 operands, and the matmuls follow torch's own
settings (``torch.backends.cuda.matmul.allow_tf32``); docs/design.md, "Precision". Both formulations
work a chunk of samples at a time (``chunk_mib`` of temporaries): the token
statistics and the normalised tokens ``xhat [C, b, N]`` of the chunk are formed once, so every large
product is one GEMM over all ``b * N`` tokens of the chunk, never a Python loop over samples.

Folded (``g = scale * Q_j Wk_j * gamma``, ``[h, P, C]``)::

    S_j = g_j @ xhat                  probs_j = softmax_n(S_j)
    parts_j = gamma_j * (probs_j @ xhat_jᵀ) + beta_j

Unfolded (``q = scale * Q_j [h, P, d]``, ``wg = Wk * gamma [C, C]``)::

    keys = wg @ xhat  [C, b*N]        S_j = q_j @ keys_j, saved as keys and the logsumexp
"""
from __future__ import annotations

from typing import Optional

import torch

from .._math import (accumulate_mm_, chunk_size, chunks, layernorm_bwd, normalised_tokens, operand_dtype, softmax_,
                     softmax_bwd_)

__all__ = ["folded_fwd", "folded_bwd", "unfolded_fwd", "unfolded_bwd"]


def _per_sample_bytes(c: int, n: int, rows: int, backward: bool) -> int:
    """fp32 temporaries of one sample: xhat (and xhat * gamma and the values in backward), the
    scores or their gradient."""
    return 4 * ((3 if backward else 1) * c * n + 2 * rows * n)


def _empty_stats(x: torch.Tensor, dt: torch.dtype):
    b, _, n = x.shape
    return torch.empty(b, n, dtype=dt, device=x.device), torch.empty(b, n, dtype=dt, device=x.device)


def _weighted_sum_(parts: torch.Tensor, probs: torch.Tensor, xo: torch.Tensor, gamma: torch.Tensor,
                   beta: torch.Tensor) -> None:
    """``parts [b, P, C] = gamma * (probs_j @ xhat_jᵀ) + beta`` per head, ``probs [h, b, P, N]``,
    ``xo [C, b, N]`` (the normalised tokens in the operand dtype); rounded once to ``parts.dtype``."""
    h = probs.shape[0]
    d = xo.shape[0] // h
    for j in range(h):
        cols = slice(j * d, (j + 1) * d)
        xt = xo[cols].permute(1, 2, 0)                                               # [b, N, d]
        if h == 1 and parts.dtype == probs.dtype == xo.dtype:
            torch.bmm(probs[0], xt, out=parts).mul_(gamma).add_(beta)
        else:
            value = torch.bmm(probs[j].to(xo.dtype), xt).to(gamma.dtype)
            parts[:, :, cols] = value.mul_(gamma[cols]).add_(beta[cols])


def folded_fwd(x: torch.Tensor, g: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float,
               out_dtype: torch.dtype, chunk_mib: float, dot_precision: str = "tf32"):
    """Forward of the folded formulation.

    ``x [B, C, N]`` (any strides and float dtype), ``g [h, P, C]``, ``gamma, beta [C]`` in the compute
    dtype. Returns ``parts [B, P, C]`` (``out_dtype``), ``attn [B, P, N]`` (the head-mean of the
    probabilities), ``probs [B, h, P, N]`` (empty when h == 1: ``attn`` is the probabilities), and the
    token ``mean, rstd [B, N]``; all but ``parts`` in the compute dtype.
    """
    b_total, c, n = x.shape
    h, p, _ = g.shape
    dt = g.dtype
    parts = torch.empty(b_total, p, c, dtype=out_dtype, device=x.device)
    attn = torch.empty(b_total, p, n, dtype=dt, device=x.device)
    probs = torch.empty((b_total, h, p, n) if h > 1 else (0,), dtype=dt, device=x.device)
    mean, rstd = _empty_stats(x, dt)
    od = operand_dtype(dot_precision, dt)
    go = g.view(h * p, c).to(od)
    step = chunk_size(b_total, _per_sample_bytes(c, n, h * p, False), chunk_mib)
    for s in chunks(b_total, step):
        xhat, mean[s], rstd[s] = normalised_tokens(x[s], eps, dt)
        xo = xhat.to(od)
        b = xhat.shape[1]
        scores = torch.mm(go, xo.view(c, b * n)).view(h, p, b, n).to(dt)
        pr = softmax_(scores).transpose(1, 2)                                         # [h, b, P, N]
        if h == 1:
            attn[s] = pr[0]
        else:
            probs[s] = pr.transpose(0, 1)
            torch.mean(pr, 0, out=attn[s])
        _weighted_sum_(parts[s], attn[s][None] if h == 1 else pr, xo, gamma, beta)
    return parts, attn, probs, mean, rstd


def _values_and_dp(dparts, probs, xhat, gamma, od):
    """For one chunk: ``dP [h, b, P, N] = (dparts_j * gamma_j) @ xhat_j`` and the values
    ``dparts_jᵀ @ probs_j`` as ``[C, b, N]`` (gamma's gradient through the values, and dxhat); GEMM
    operands in ``od``, results in xhat's dtype."""
    h, b, p, n = probs.shape
    c = xhat.shape[0]
    d = c // h
    xg = (xhat * gamma[:, None, None]).to(od)
    dfo = dparts.to(od)
    dp = torch.empty(h, b, p, n, dtype=xhat.dtype, device=xhat.device)
    values = torch.empty(c, b, n, dtype=xhat.dtype, device=xhat.device)
    for j in range(h):
        cols = slice(j * d, (j + 1) * d)
        df = dfo[:, :, cols]                                                           # [b, P, d]
        dp[j] = torch.bmm(df, xg[cols].transpose(0, 1))
        values[cols] = torch.bmm(df.transpose(1, 2), probs[j].to(od)).transpose(0, 1)
    return dp, values


def folded_bwd(x: torch.Tensor, g: Optional[torch.Tensor], gamma: torch.Tensor, attn: torch.Tensor,
               probs: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, dparts: Optional[torch.Tensor],
               dattn: Optional[torch.Tensor], num_heads: int, needs_dx: bool, chunk_mib: float,
               dot_precision: str = "tf32"):
    """Backward of the folded formulation from its saved ``attn``, ``probs``, ``mean``, ``rstd``.

    ``g`` is needed for dx only (None otherwise). ``dparts [B, P, C]`` and ``dattn [B, P, N]`` (either
    may be None: no gradient). Returns ``dg [h, P, C]``, ``dgamma`` (through the values only) and
    ``dbeta [C]`` in the compute dtype, and ``dx`` in ``x.dtype`` with x's strides when x is dense
    (``torch.empty_like``), or None.
    """
    b_total, c, n = x.shape
    h, p = num_heads, attn.shape[1]
    dt = gamma.dtype
    dg = torch.zeros(h * p, c, dtype=dt, device=x.device)
    dgamma = torch.zeros(c, dtype=dt, device=x.device)
    dbeta = torch.zeros(c, dtype=dt, device=x.device)
    dx = torch.empty_like(x) if needs_dx else None
    od = operand_dtype(dot_precision, dt)
    step = chunk_size(b_total, _per_sample_bytes(c, n, h * p, True), chunk_mib)
    for s in chunks(b_total, step):
        xhat, _, _ = normalised_tokens(x[s], 0.0, dt, mean[s], rstd[s])
        b = xhat.shape[1]
        pr = (attn[s][None] if h == 1 else probs[s].transpose(0, 1))                  # [h, b, P, N]
        if dparts is not None:
            df = dparts[s].to(dt)
            dbeta += df.sum((0, 1))
            dp, values = _values_and_dp(df, pr, xhat, gamma, od)
            dgamma += (values * xhat).sum((1, 2))
        else:
            dp, values = torch.zeros(h, b, p, n, dtype=dt, device=x.device), None
        if dattn is not None:
            dp.add_(dattn[s].to(dt), alpha=1.0 / h)
        ds = softmax_bwd_(dp, pr).transpose(1, 2).reshape(h * p, b * n).to(od)       # [hP, b*N]
        accumulate_mm_(dg, ds, xhat.view(c, b * n).T.to(od))
        if needs_dx:
            dxhat = torch.mm(g.view(h * p, c).T.to(od), ds).view(c, b, n).to(dt)
            if values is not None:
                dxhat.addcmul_(values, gamma[:, None, None])
            dx[s] = layernorm_bwd(dxhat, xhat, rstd[s]).transpose(0, 1)
    return dg.view(h, p, c), dgamma, dbeta, dx


def unfolded_fwd(x: torch.Tensor, q: torch.Tensor, wg: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
                 eps: float, out_dtype: torch.dtype, chunk_mib: float, dot_precision: str = "tf32"):
    """Forward of the unfolded formulation: ``q [h, P, d]`` (scaled queries), ``wg [C, C]`` (Wk * gamma).

    Returns ``parts [B, P, C]`` (``out_dtype``), ``attn [B, P, N]``, the keys ``[C, B, N]`` and the
    logsumexp ``lse [B, h, P]`` of the scores (backward recomputes the probabilities from them), and
    ``mean, rstd [B, N]``.
    """
    b_total, c, n = x.shape
    h, p, d = q.shape
    dt = q.dtype
    parts = torch.empty(b_total, p, c, dtype=out_dtype, device=x.device)
    attn = torch.empty(b_total, p, n, dtype=dt, device=x.device)
    keys = torch.empty(c, b_total, n, dtype=dt, device=x.device)
    lse = torch.empty(b_total, h, p, dtype=dt, device=x.device)
    mean, rstd = _empty_stats(x, dt)
    od = operand_dtype(dot_precision, dt)
    wgo, qo = wg.to(od), q.to(od)
    step = chunk_size(b_total, _per_sample_bytes(c, n, h * p, False) + 4 * c * n, chunk_mib)
    for s in chunks(b_total, step):
        xhat, mean[s], rstd[s] = normalised_tokens(x[s], eps, dt)
        xo = xhat.to(od)
        b = xhat.shape[1]
        k = torch.mm(wgo, xo.view(c, b * n))                                          # [C, b*N]
        keys[:, s] = k.view(c, b, n)
        scores = torch.bmm(qo, k.view(h, d, b * n)).view(h, p, b, n).to(dt)
        m = torch.logsumexp(scores, -1)                                               # [h, P, b]
        lse[s] = m.permute(2, 0, 1)
        pr = scores.sub_(m[..., None]).exp_().transpose(1, 2)                         # [h, b, P, N]
        torch.mean(pr, 0, out=attn[s])
        _weighted_sum_(parts[s], pr, xo, gamma, beta)
    return parts, attn, keys, lse, mean, rstd


def unfolded_bwd(x: torch.Tensor, q: torch.Tensor, wg: torch.Tensor, gamma: torch.Tensor, keys: torch.Tensor,
                 lse: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, dparts: Optional[torch.Tensor],
                 dattn: Optional[torch.Tensor], needs_dx: bool, chunk_mib: float, dot_precision: str = "tf32"):
    """Backward of the unfolded formulation. Returns ``dq [h, P, d]``, ``dwg [C, C]``, ``dgamma``
    (through the values only), ``dbeta [C]`` and ``dx [B, C, N]`` (or None)."""
    b_total, c, n = x.shape
    h, p, d = q.shape
    dt = q.dtype
    dq = torch.zeros_like(q)
    dwg = torch.zeros(c, c, dtype=dt, device=x.device)
    dgamma = torch.zeros(c, dtype=dt, device=x.device)
    dbeta = torch.zeros(c, dtype=dt, device=x.device)
    dx = torch.empty_like(x) if needs_dx else None
    od = operand_dtype(dot_precision, dt)
    qo = q.to(od)
    step = chunk_size(b_total, _per_sample_bytes(c, n, h * p, True) + 4 * c * n, chunk_mib)
    for s in chunks(b_total, step):
        xhat, _, _ = normalised_tokens(x[s], 0.0, dt, mean[s], rstd[s])
        b = xhat.shape[1]
        k = keys[:, s].reshape(h, d, b * n).to(od)
        scores = torch.bmm(qo, k).view(h, p, b, n).to(dt)
        pr = scores.sub_(lse[s].permute(1, 2, 0)[..., None]).exp_().transpose(1, 2)  # [h, b, P, N]
        if dparts is not None:
            df = dparts[s].to(dt)
            dbeta += df.sum((0, 1))
            dp, values = _values_and_dp(df, pr, xhat, gamma, od)
            dgamma += (values * xhat).sum((1, 2))
        else:
            dp, values = torch.zeros(h, b, p, n, dtype=dt, device=x.device), None
        if dattn is not None:
            dp.add_(dattn[s].to(dt), alpha=1.0 / h)
        ds = softmax_bwd_(dp, pr).transpose(1, 2).reshape(h, p, b * n).to(od)        # [h, P, b*N]
        dq += torch.bmm(ds, k.transpose(1, 2))
        dk = torch.bmm(qo.transpose(1, 2), ds).view(c, b * n)                        # dkeys [C, b*N]
        accumulate_mm_(dwg, dk, xhat.view(c, b * n).T.to(od))
        if needs_dx:
            dxhat = torch.mm(wg.T.to(od), dk).view(c, b, n).to(dt)
            if values is not None:
                dxhat.addcmul_(values, gamma[:, None, None])
            dx[s] = layernorm_bwd(dxhat, xhat, rstd[s]).transpose(0, 1)
    return dq, dwg, dgamma, dbeta, dx
