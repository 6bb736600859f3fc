"""Part attention as batched torch ops: the torch-op implementation of the op contract that
``c2f.kernels.part_attention`` implements with Triton kernels (same functions, same signatures, same
saved state; docs/design.md, "The op contract").

``dot_precision``: "bf16" / "fp16" round the GEMM operands to that dtype (autocast; statistics, softmax
and logsumexp stay fp32); "tf32" / "ieee" keep fp32 operands, and the matmuls follow torch's own
settings (``torch.backends.cuda.matmul.allow_tf32``); docs/design.md, "Precision". Both formulations
work a chunk of samples at a time (``chunk_mib`` of temporaries): the token
statistics and the normalised tokens ``xhat [C, b, N]`` of the chunk are formed once, so every large
product is one GEMM over all ``b * N`` tokens of the chunk, never a Python loop over samples.

Folded (``g = scale * Q_j Wk_j * gamma``, ``[h, P, C]``), with the centred map ``xc = x - mean``
``[C, b, N]`` (the one map-sized temporary; ``xhat = rstd * xc`` is never formed: rstd scales the
``[P, b, N]`` side of every product)::

    S_j = rstd * (g_j @ xc)           probs_j = softmax_n(S_j)
    parts_j = gamma_j * ((probs_j * rstd) @ xc_jᵀ) + beta_j

Unfolded (``q = scale * Q_j [h, P, d]``, ``wg = Wk * gamma [C, C]``)::

    keys = wg @ xhat  [C, b*N]        S_j = q_j @ keys_j, saved as keys and the logsumexp
"""
from __future__ import annotations

import torch

from .._math import (
    accumulate_mm_,
    centred_tokens,
    chunk_size,
    chunks,
    given_token_stats,
    head_major,
    layernorm_bwd,
    layernorm_bwd_centred,
    normalised_tokens,
    operand_dtype,
    reduce_heads,
    reduce_heads_grad_,
    scratch,
    softmax_bwd_,
    view_front,
)

__all__ = ["folded_fwd", "folded_bwd", "unfolded_fwd", "unfolded_bwd"]


def _per_sample_bytes(c: int, n: int, rows: int, backward: bool, needs_dx: bool = False) -> int:
    """fp32 temporaries of one sample in the folded formulation: the centred map (and in backward
    gamma * map, then the values, in one buffer; dxhat and a product with it for dx), the scores or
    probabilities, and in backward dP, probs * rstd and dS."""
    maps = (2 + (2 if needs_dx else 0)) if backward else 1
    return 4 * (maps * c * n + (3 if backward else 1) * rows * n)


def _unfolded_per_sample_bytes(c: int, n: int, rows: int, backward: bool) -> int:
    """fp32 temporaries of one sample in the unfolded formulation: xhat (and xhat * gamma and the
    values in backward), the scores or their gradient, the keys."""
    return 4 * ((3 if backward else 1) * c * n + 2 * rows * n + c * n)


def _empty_stats(x: torch.Tensor, dt: torch.dtype):
    b, _, n = x.shape
    return torch.empty(b, n, dtype=dt, device=x.device), torch.empty(b, n, dtype=dt, device=x.device)


def _bmm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``out = a @ b`` (batched), written straight into ``out`` when the operands have its dtype (fp32
    dots), else taken in the operands' dtype (16-bit operands) and rounded once into ``out``."""
    if a.dtype == out.dtype:
        return torch.bmm(a, b, out=out)
    return out.copy_(torch.bmm(a, b))


def _weighted_sum_(parts: torch.Tensor, prr: torch.Tensor, xo: torch.Tensor, gamma: torch.Tensor,
                   beta: torch.Tensor) -> None:
    """``parts [b, P, C] = gamma * (prr_j @ xo_jᵀ) + beta`` per head (head j's channels), ``prr
    [h, b, P, N]``, ``xo [C, b, N]`` in the operand dtype; rounded once to ``parts.dtype``. With one head
    and fp32 throughout, the product lands in ``parts`` and one pass applies gamma and beta; with more,
    all heads run as one batched GEMM over (head, sample) and one pass scatters them into their channels."""
    h, b, p, n = prr.shape
    c = xo.shape[0]
    d = c // h
    if h == 1 and parts.dtype == prr.dtype == xo.dtype:
        torch.bmm(prr[0], xo.permute(1, 2, 0), out=parts)
        torch.addcmul(beta, parts, gamma, out=parts)
        return
    xt = head_major(xo, h).view(h * b, n, d)
    value = torch.bmm(prr.reshape(h * b, p, n).to(xo.dtype), xt).view(h, b, p, d).to(gamma.dtype)
    torch.addcmul(beta.view(h, d), value.permute(1, 2, 0, 3), gamma.view(h, d), out=parts.view(b, p, h, d))


def folded_fwd(x: torch.Tensor, g: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float,
               out_dtype: torch.dtype, chunk_mib: float, dot_precision: str = "tf32", head_reduce: str = "mean",
               x_mean: torch.Tensor | None = None, x_var: torch.Tensor | None = None):
    """Forward of the folded formulation.

    ``x [B, C, N]`` (any strides and float dtype), ``g [h, P, C]``, ``gamma, beta [C]`` in the compute
    dtype. Returns ``parts [B, P, C]`` (``out_dtype``), ``attn [B, P, N]`` (the probabilities' mean or max over
    heads, ``head_reduce``), ``probs [B, h, P, N]`` (empty when h == 1: ``attn`` is the probabilities), and the
    token ``mean, rstd [B, N]``; all but ``parts`` in the compute dtype. ``x_mean, x_var [B, N]`` (both or
    neither): the token statistics given with x (``c2f._math.given_token_stats``); no statistics pass runs.

    Per chunk: the centred map ``xc [C, b, N]`` (one pass over x after the statistics), the scores
    ``rstd * (g @ xc_b)`` as one batched GEMM with g broadcast, the softmax written straight into
    ``attn`` (or ``probs``), and the parts from ``(probs * rstd) @ xc_bᵀ``: rstd scales the
    ``[b, P, N]`` side, never the map.
    """
    b_total, c, n = x.shape
    h, p, _ = g.shape
    dt = g.dtype
    parts = torch.empty(b_total, p, c, dtype=out_dtype, device=x.device)
    attn = torch.empty(b_total, p, n, dtype=dt, device=x.device)
    probs = torch.empty((b_total, h, p, n) if h > 1 else (0,), dtype=dt, device=x.device)
    given = given_token_stats(x_mean, x_var, eps, dt)
    mean, rstd = given or _empty_stats(x, dt)
    od = operand_dtype(dot_precision, dt)
    go = g.view(h * p, c).to(od)
    step = chunk_size(b_total, _per_sample_bytes(c, n, h * p, False), chunk_mib)
    xc_buf, s_buf = scratch(step * c * n, x, dt), scratch(step * h * p * n, x, dt)
    for s in chunks(b_total, step):
        b = s.stop - s.start
        r = rstd[s][:, None, :]                                                        # [b, 1, N]
        xo = centred_tokens(x[s], view_front(xc_buf, c, b, n), mean[s], None if given else rstd[s], eps).to(od)
        scores = _bmm_into(view_front(s_buf, b, h * p, n), go.expand(b, h * p, c), xo.transpose(0, 1))
        pr = attn[s] if h == 1 else probs[s].view(b, h * p, n)
        torch.softmax(scores.mul_(r), -1, out=pr)
        if h > 1:
            reduce_heads(probs[s], head_reduce, 1, attn[s])
        prr = torch.mul(pr, r, out=scores).view(b, h, p, n).transpose(0, 1)            # [h, b, P, N]
        _weighted_sum_(parts[s], prr, xo, gamma, beta)
    return parts, attn, probs, mean, rstd


def _dparts_head_major(df: torch.Tensor, h: int, od: torch.dtype) -> torch.Tensor:
    """``dparts [b, P, C]`` as ``[h, b, P, d]`` in the operand dtype: one copy, shared by dP and the values;
    with one head it is already head-major (no copy when the dtypes agree: 17 MiB of peak at B=16)."""
    b, p, c = df.shape
    if h == 1:
        return df.to(od).unsqueeze(0)
    out = torch.empty(h, b, p, c // h, dtype=od, device=df.device)
    return out.copy_(df.view(b, p, h, c // h).permute(2, 0, 1, 3))


def _dprobs(dfh: torch.Tensor | None, dattn: torch.Tensor | None, pr: torch.Tensor, xc: torch.Tensor,
            gamma: torch.Tensor, r: torch.Tensor, xg_buf: torch.Tensor, od: torch.dtype, head_reduce: str
            ) -> torch.Tensor:
    """``dP [h, b, P, N] = rstd * ((dparts_j * gamma_j) @ xc_j) + d(attn)/dP_j dattn`` (``reduce_heads_grad_``:
    ``dattn / h`` for the mean), ``pr [h, b, P, N]`` the probabilities, ``dfh`` the head-major
    dparts (``_dparts_head_major``); gamma scales the map's channels (written head-major into ``xg_buf``),
    not ``dparts``, which is larger. All heads in one batched GEMM."""
    c, b, n = xc.shape
    h = pr.shape[0]
    d = c // h
    p = (dfh.shape[2] if dfh is not None else dattn.shape[1])
    dp = (torch.zeros if dfh is None else torch.empty)(h, b, p, n, dtype=xc.dtype, device=xc.device)
    if dfh is not None:
        xg = view_front(xg_buf, h, b, d, n)
        torch.mul(xc.view(h, d, b, n).transpose(1, 2), gamma.view(h, 1, d, 1), out=xg)
        _bmm_into(dp.view(h * b, p, n), dfh.view(h * b, p, d), xg.view(h * b, d, n).to(od))
        dp.mul_(r)
    if dattn is not None:
        reduce_heads_grad_(dp, dattn.to(xc.dtype), pr, head_reduce)
    return dp


def _values(dfh: torch.Tensor, prr: torch.Tensor, out: torch.Tensor, od: torch.dtype) -> torch.Tensor:
    """``V [h, b, d, N] = dparts_jᵀ @ (probs_j * rstd)`` per head (head j's channels) into ``out``, as one
    batched GEMM: with ``xc`` it gives gamma's gradient through the parts, and a term of dxhat."""
    h, b, p, n = prr.shape
    d = dfh.shape[3]
    v = view_front(out, h, b, d, n)
    _bmm_into(v.view(h * b, d, n), dfh.view(h * b, p, d).transpose(1, 2), prr.reshape(h * b, p, n).to(od))
    return v


def folded_bwd(x: torch.Tensor, g: torch.Tensor | None, gamma: torch.Tensor, attn: torch.Tensor,
               probs: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, dparts: torch.Tensor | None,
               dattn: torch.Tensor | None, num_heads: int, needs_dx: bool, chunk_mib: float,
               dot_precision: str = "tf32", head_reduce: str = "mean"):
    """Backward of the folded formulation from its saved ``attn``, ``probs``, ``mean``, ``rstd``.

    ``g`` is needed for dx only (None otherwise). ``dparts [B, P, C]`` and ``dattn [B, P, N]`` (either
    may be None: no gradient). Returns ``dg [h, P, C]``, ``dgamma`` (through the values only) and
    ``dbeta [C]`` in the compute dtype, and ``dx`` in ``x.dtype`` with x's strides when x is dense
    (``torch.empty_like``), or None.

    Per chunk, with ``xc`` the centred map and ``prr = probs * rstd``: ``dP = rstd * ((dparts * gamma)
    @ xc)``, ``dS * rstd`` (softmax backward, written as ``[hP, b*N]``), ``dG += (dS * rstd) @ xcᵀ`` as
    one GEMM over the chunk's tokens, ``V = dpartsᵀ @ prr`` and ``dgamma += sum(V * xc)``.
    """
    b_total, c, n = x.shape
    h, p = num_heads, attn.shape[1]
    dt = gamma.dtype
    dg = torch.zeros(h * p, c, dtype=dt, device=x.device)
    dgamma = torch.zeros(c, dtype=dt, device=x.device)
    dbeta = torch.zeros(c, dtype=dt, device=x.device)
    dx = torch.empty_like(x) if needs_dx else None
    od = operand_dtype(dot_precision, dt)
    step = chunk_size(b_total, _per_sample_bytes(c, n, h * p, True, needs_dx), chunk_mib)
    xc_buf, v_buf, ds_buf = (scratch(k, x, dt) for k in (step * c * n, step * c * n, step * h * p * n))
    for s in chunks(b_total, step):
        b = s.stop - s.start
        xc = centred_tokens(x[s], view_front(xc_buf, c, b, n), mean[s])
        r = rstd[s][None, :, None, :]                                                  # [1, b, 1, N]
        pr = (attn[s][None] if h == 1 else probs[s].transpose(0, 1))                  # [h, b, P, N]
        prr = pr * r
        df = None if dparts is None else dparts[s].to(dt)
        dfh = None if df is None else _dparts_head_major(df, h, od)
        dp = _dprobs(dfh, None if dattn is None else dattn[s], pr, xc, gamma, r, v_buf, od, head_reduce)
        v = None if df is None else _values(dfh, prr, v_buf, od)
        ds = view_front(ds_buf, h, p, b, n)                                            # dS * rstd
        torch.mul(dp.sub_(torch.linalg.vecdot(pr, dp)[..., None]), prr, out=ds.transpose(1, 2))
        xo = xc.to(od)
        accumulate_mm_(dg, ds.view(h * p, b * n).to(od), xo.view(c, b * n).T)
        if needs_dx:
            e = torch.mm(g.view(h * p, c).T.to(od), ds.view(h * p, b * n).to(od)).to(dt).view(c, b, n)
            if v is not None:
                e.view(h, c // h, b, n).addcmul_(v.transpose(1, 2), gamma.view(h, c // h, 1, 1))
            dx[s] = layernorm_bwd_centred(e, xc, rstd[s]).transpose(0, 1)
        if df is not None:
            dbeta += df.sum((0, 1))
            dgamma += v.mul_(xc.view(h, c // h, b, n).transpose(1, 2)).sum((1, 3)).view(c)
    return dg.view(h, p, c), dgamma, dbeta, dx


def _values_and_dp(dparts, probs, xhat, gamma, od):
    """Unfolded formulation, for one chunk: ``dP [h, b, P, N] = (dparts_j * gamma_j) @ xhat_j`` and the values
    ``dparts_jᵀ @ probs_j`` as ``[C, b, N]`` (gamma's gradient through the values, and dxhat); GEMM
    operands in ``od``, results in xhat's dtype. Each product is one batched GEMM over (head, sample)."""
    h, b, p, n = probs.shape
    c = xhat.shape[0]
    d = c // h
    xg = torch.mul(xhat.view(h, d, b, n).transpose(1, 2), gamma.view(h, 1, d, 1)).to(od)     # [h, b, d, N]
    dfh = _dparts_head_major(dparts, h, od)                                                  # [h, b, P, d]
    dp = torch.bmm(dfh.view(h * b, p, d), xg.reshape(h * b, d, n)).view(h, b, p, n).to(xhat.dtype)
    v = torch.bmm(dfh.view(h * b, p, d).transpose(1, 2), probs.reshape(h * b, p, n).to(od))  # [h*b, d, N]
    values = v.view(h, b, d, n).transpose(1, 2).reshape(c, b, n).to(xhat.dtype)
    return dp, values


def unfolded_fwd(x: torch.Tensor, q: torch.Tensor, wg: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
                 eps: float, out_dtype: torch.dtype, chunk_mib: float, dot_precision: str = "tf32",
                 head_reduce: str = "mean", x_mean: torch.Tensor | None = None, x_var: torch.Tensor | None = None):
    """Forward of the unfolded formulation: ``q [h, P, d]`` (scaled queries), ``wg [C, C]`` (Wk * gamma).

    Returns ``parts [B, P, C]`` (``out_dtype``), ``attn [B, P, N]``, the keys ``[C, B, N]`` and the
    logsumexp ``lse [B, h, P]`` of the scores (backward recomputes the probabilities from them), and
    ``mean, rstd [B, N]``. ``x_mean, x_var``: as in ``folded_fwd``.
    """
    b_total, c, n = x.shape
    h, p, d = q.shape
    dt = q.dtype
    parts = torch.empty(b_total, p, c, dtype=out_dtype, device=x.device)
    attn = torch.empty(b_total, p, n, dtype=dt, device=x.device)
    keys = torch.empty(c, b_total, n, dtype=dt, device=x.device)
    lse = torch.empty(b_total, h, p, dtype=dt, device=x.device)
    given = given_token_stats(x_mean, x_var, eps, dt)
    mean, rstd = given or _empty_stats(x, dt)
    od = operand_dtype(dot_precision, dt)
    wgo, qo = wg.to(od), q.to(od)
    step = chunk_size(b_total, _unfolded_per_sample_bytes(c, n, h * p, False), chunk_mib)
    for s in chunks(b_total, step):
        if given:
            xhat, _, _ = normalised_tokens(x[s], eps, dt, mean[s], rstd[s])
        else:
            xhat, mean[s], rstd[s] = normalised_tokens(x[s], eps, dt)
        xo = xhat.to(od)
        b = xhat.shape[1]
        k = torch.mm(wgo, xo.view(c, b * n))                                          # [C, b*N]
        keys[:, s] = k.view(c, b, n)
        scores = torch.bmm(qo, k.view(h, d, b * n)).view(h, p, b, n).to(dt)
        # The softmax with one exp over the scores (logsumexp would take another): the row max, the
        # exponentials in place, their sum; lse = max + log(sum) is what backward recomputes from.
        top = scores.amax(-1, keepdim=True)                                           # [h, P, b, 1]
        pr = scores.sub_(top).exp_()
        total = pr.sum(-1, keepdim=True)
        pr.div_(total)
        torch.add(top, total.log_(), out=top)
        lse[s] = top.squeeze(-1).permute(2, 0, 1)
        pr = pr.transpose(1, 2)                                                       # [h, b, P, N]
        reduce_heads(pr, head_reduce, 0, attn[s])
        _weighted_sum_(parts[s], pr, xo, gamma, beta)
    return parts, attn, keys, lse, mean, rstd


def unfolded_bwd(x: torch.Tensor, q: torch.Tensor, wg: torch.Tensor, gamma: torch.Tensor, keys: torch.Tensor,
                 lse: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, dparts: torch.Tensor | None,
                 dattn: torch.Tensor | None, needs_dx: bool, chunk_mib: float, dot_precision: str = "tf32",
                 head_reduce: str = "mean"):
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
    step = chunk_size(b_total, _unfolded_per_sample_bytes(c, n, h * p, True), chunk_mib)
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
            reduce_heads_grad_(dp, dattn[s].to(dt), pr, head_reduce)
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
