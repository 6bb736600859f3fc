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
    element_bytes,
    given_token_stats,
    head_major,
    layernorm_bwd_,
    layernorm_bwd_centred_,
    matmul_into,
    normalised_tokens,
    operand_dtype,
    reduce_heads,
    reduce_heads_grad_,
    scratch,
    softmax_bwd_,
    view_front,
)

__all__ = ["folded_fwd", "folded_bwd", "unfolded_fwd", "unfolded_bwd"]


# The chunk planners' byte counts: every temporary a sample adds to a chunk, so that ``chunk_mib`` bounds
# what the chunk really holds (tests/test_chunk_budget.py measures each path against its count: fp32, bf16
# autocast, bf16-stored features, float64). ``eb``, ``ob``: ``c2f._math.element_bytes``.

def _per_sample_bytes(c: int, n: int, p: int, h: int, backward: bool, needs_dx: bool = False, eb: int = 4,
                      ob: int = 0, mixed: bool = False) -> int:
    """Temporaries of one sample in the folded formulation. Forward: the centred map, the scores (then
    probs * rstd, head-major), and with h > 1 (or ``mixed``: parts not in the compute dtype, or 16-bit
    operands) the values ``[h, P, d]``, with h > 1 the map's head-major copy. Backward: the centred map,
    gamma * map then the values (one buffer), dP and dS, the sample-major dparts (h > 1, or ``mixed``:
    dparts not in the operand dtype), the rows' sums, and for dx its ``[C, N]`` gradient and the LayerNorm
    backward's product. 16-bit operands add the map's, the scores' and the probabilities' operand copies and
    the values'; in backward also dS's, dP's and the values' GEMM results."""
    rows = h * p
    values = p * c if h > 1 or mixed else 0
    if not backward:
        return eb * ((1 if h == 1 else 2) * c * n + rows * n + values) + ob * (c * n + 2 * rows * n + p * c)
    return (eb * ((4 if needs_dx else 2) * c * n + 2 * rows * n + values + rows)
            + ob * (p * c + (4 if needs_dx else 3) * (c * n + rows * n)))


def _unfolded_per_sample_bytes(c: int, n: int, p: int, h: int, backward: bool, needs_dx: bool = False,
                               eb: int = 4, ob: int = 0) -> int:
    """Temporaries of one sample in the unfolded formulation. Forward: xhat, the scores and their
    ``[h, b, P, N]`` copy, the head-major xhat, the values ``[h, P, d]``, the heads' mean's own two
    ``[P, N]`` and the rows' maxima and sums. Backward: xhat, gamma * xhat (head-major), the values, a
    product with xhat; the probabilities, their ``[h, b, P, N]`` copy, dP and softmax backward's product;
    the head-major dparts; for dx the values again, dxhat and LayerNorm's product (dkeys outlives the
    softmax's temporaries). 16-bit operands add the operand copies of xhat, the keys, the probabilities
    and dS, and the GEMMs' 16-bit results (keys, scores, values, dP, dkeys, dq)."""
    rows = h * p
    if not backward:
        return (eb * (2 * c * n + 2 * rows * n + p * c + 2 * p * n + 2 * rows)
                + ob * (3 * c * n + 2 * rows * n + p * c))
    return (eb * ((6 if needs_dx else 4) * c * n + 4 * rows * n + p * c)
            + ob * ((5 if needs_dx else 4) * c * n + 4 * rows * n + p * c))


def _empty_stats(x: torch.Tensor, dt: torch.dtype):
    b, _, n = x.shape
    return torch.empty(b, n, dtype=dt, device=x.device), torch.empty(b, n, dtype=dt, device=x.device)


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
    mixed = out_dtype != dt or od != dt  # one head: the values then take a GEMM result and a cast
    step = chunk_size(b_total, _per_sample_bytes(c, n, p, h, False, False, *element_bytes(dt, od), mixed),
                      chunk_mib)
    xc_buf, s_buf = scratch(step * c * n, x, dt), scratch(step * h * p * n, x, dt)
    for s in chunks(b_total, step):
        b = s.stop - s.start
        r = rstd[s][:, None, :]                                                        # [b, 1, N]
        xo = centred_tokens(x[s], view_front(xc_buf, c, b, n), mean[s], None if given else rstd[s], eps).to(od)
        scores = matmul_into(view_front(s_buf, b, h * p, n), go.expand(b, h * p, c), xo.transpose(0, 1))
        pr = attn[s] if h == 1 else probs[s].view(b, h * p, n)
        torch.softmax(scores.mul_(r), -1, out=pr)
        if h > 1:
            reduce_heads(probs[s], head_reduce, 1, attn[s])
        if h == 1:
            prr = torch.mul(pr, r, out=scores).unsqueeze(0)                            # [1, b, P, N]
        else:  # written head-major, so the values' batched GEMM reads it without a copy
            prr = torch.mul(pr.view(b, h, p, n).transpose(0, 1), r, out=view_front(s_buf, h, b, p, n))
        _weighted_sum_(parts[s], prr, xo, gamma, beta)
    return parts, attn, probs, mean, rstd


def _dparts_by_head(df: torch.Tensor, h: int, od: torch.dtype, sample_major: bool) -> torch.Tensor:
    """``dparts [b, P, C]`` split by head in the operand dtype, one copy shared by dP and the values:
    ``[b, h, P, d]`` (``sample_major``: the folded backward batches over (sample, head), the saved
    probabilities' order) or ``[h, b, P, d]`` (the unfolded one, over (head, sample)). With one head it is
    already in either order: no copy when the dtypes agree (17 MiB of peak at B=16)."""
    b, p, c = df.shape
    if h == 1:
        return df.to(od).unsqueeze(1 if sample_major else 0)
    split = df.view(b, p, h, c // h)
    split = split.transpose(1, 2) if sample_major else split.permute(2, 0, 1, 3)
    return torch.empty(split.shape, dtype=od, device=df.device).copy_(split)


def _dprobs(dfh: torch.Tensor | None, dattn: torch.Tensor | None, pr: torch.Tensor, xc: torch.Tensor,
            gamma: torch.Tensor, r: torch.Tensor, xg_buf: torch.Tensor, od: torch.dtype, head_reduce: str
            ) -> torch.Tensor:
    """``dP [b, h, P, N] = rstd * ((dparts_j * gamma_j) @ xc_j) + d(attn)/dP_j dattn`` (``reduce_heads_grad_``:
    ``dattn / h`` for the mean), ``pr [b, h, P, N]`` the probabilities, ``dfh`` the sample-major dparts
    (``_dparts_by_head``); gamma scales the map's channels (written sample-major into ``xg_buf``),
    not ``dparts``, which is larger. All heads in one batched GEMM."""
    c, b, n = xc.shape
    _, h, p, _ = pr.shape
    d = c // h
    dp = (torch.zeros if dfh is None else torch.empty)(b, h, p, n, dtype=xc.dtype, device=xc.device)
    if dfh is not None:
        xg = view_front(xg_buf, b, h, d, n)
        torch.mul(xc.view(h, d, b, n).permute(2, 0, 1, 3), gamma.view(h, d, 1), out=xg)
        matmul_into(dp.view(b * h, p, n), dfh.reshape(b * h, p, d), xg.view(b * h, d, n).to(od))
        dp.mul_(r)
    if dattn is not None:
        reduce_heads_grad_(dp.transpose(0, 1), dattn.to(xc.dtype), pr.transpose(0, 1), head_reduce)
    return dp


def _values(dfh: torch.Tensor, pr: torch.Tensor, r: torch.Tensor, out: torch.Tensor, od: torch.dtype
            ) -> torch.Tensor:
    """``V [b, h, d, N] = dparts_jᵀ @ (probs_j * rstd)`` per head (head j's channels) into ``out``, as one
    batched GEMM of the probabilities (rstd scales V's token columns after it): with ``xc`` it gives gamma's
    gradient through the parts, and a term of dxhat."""
    b, h, p, n = pr.shape
    d = dfh.shape[3]
    v = view_front(out, b, h, d, n)
    matmul_into(v.view(b * h, d, n), dfh.reshape(b * h, p, d).transpose(1, 2), pr.reshape(b * h, p, n).to(od))
    return v.mul_(r)


def folded_bwd(x: torch.Tensor, g: torch.Tensor | None, gamma: torch.Tensor, attn: torch.Tensor,
               probs: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, dparts: torch.Tensor | None,
               dattn: torch.Tensor | None, num_heads: int, needs_dx: bool, chunk_mib: float,
               dot_precision: str = "tf32", head_reduce: str = "mean"):
    """Backward of the folded formulation from its saved ``attn``, ``probs``, ``mean``, ``rstd``.

    ``g`` is needed for dx only (None otherwise). ``dparts [B, P, C]`` and ``dattn [B, P, N]`` (either
    may be None: no gradient). Returns ``dg [h, P, C]``, ``dgamma`` (through the values only) and
    ``dbeta [C]`` in the compute dtype, and ``dx`` in ``x.dtype`` with x's strides when x is dense
    (``torch.empty_like``), or None.

    Per chunk, with ``xc`` the centred map: ``dP = rstd * ((dparts * gamma) @ xc)``, ``dS * rstd``
    (softmax backward, written as ``[hP, b*N]``), ``dG += (dS * rstd) @ xcᵀ`` as one GEMM over the chunk's
    tokens, ``V = dpartsᵀ @ (probs * rstd)`` and ``dgamma += sum(V * xc)``; the per-head products batch
    over (sample, head), the order of the saved probabilities, which they read as they are (with fp32
    operands; dparts is copied sample-major with more than one head).
    """
    b_total, c, n = x.shape
    h, p = num_heads, attn.shape[1]
    d = c // h
    dt = gamma.dtype
    dg = (torch.empty if b_total else torch.zeros)(h * p, c, dtype=dt, device=x.device)  # the first chunk writes it
    dgamma = torch.zeros(c, dtype=dt, device=x.device)
    dbeta = (torch.zeros(c, dtype=dt, device=x.device) if dparts is None
             else torch.sum(dparts, (0, 1), dtype=dt))
    dx = torch.empty_like(x) if needs_dx else None
    od = operand_dtype(dot_precision, dt)
    mixed = dparts is not None and dparts.dtype != od  # one head: dparts then needs an operand copy
    step = chunk_size(b_total, _per_sample_bytes(c, n, p, h, True, needs_dx, *element_bytes(dt, od), mixed),
                      chunk_mib)
    xc_buf, v_buf, ds_buf = (scratch(k, x, dt) for k in (step * c * n, step * c * n, step * h * p * n))
    for s in chunks(b_total, step):
        b = s.stop - s.start
        xc = centred_tokens(x[s], view_front(xc_buf, c, b, n), mean[s])
        r = rstd[s][:, None, None, :]                                                  # [b, 1, 1, N]
        pr = attn[s][:, None] if h == 1 else probs[s]                                 # [b, h, P, N]
        dfh = None if dparts is None else _dparts_by_head(dparts[s], h, od, sample_major=True)
        dp = _dprobs(dfh, None if dattn is None else dattn[s], pr, xc, gamma, r, v_buf, od, head_reduce)
        v = None if dfh is None else _values(dfh, pr, r, v_buf, od)
        ds = view_front(ds_buf, h, p, b, n)                                            # dS * rstd
        dsb = ds.permute(2, 0, 1, 3)                                                   # [b, h, P, N], a view
        rowsum = torch.mul(pr, dp, out=dsb).sum(-1, keepdim=True)
        torch.mul(dp.sub_(rowsum), pr, out=dsb).mul_(r)
        del dp
        xo = xc.to(od)
        accumulate_mm_(dg, ds.view(h * p, b * n).to(od), xo.view(c, b * n).T, first=s.start == 0)
        if needs_dx:
            e = torch.mm(g.view(h * p, c).T.to(od), ds.view(h * p, b * n).to(od)).to(dt).view(c, b, n)
            if v is not None:
                e.view(h, d, b, n).addcmul_(v.permute(1, 2, 0, 3), gamma.view(h, d, 1, 1))
            dx[s] = layernorm_bwd_centred_(e, xc, rstd[s]).transpose(0, 1)
        if v is not None:
            dgamma += v.mul_(xc.view(h, d, b, n).permute(2, 0, 1, 3)).sum((0, 3)).view(c)
    return dg.view(h, p, c), dgamma, dbeta, dx


def _dp_and_values(dparts, probs, xhat, gamma, od, with_values: bool):
    """Unfolded formulation, for one chunk: ``dP [h, b, P, N] = (dparts_j * gamma_j) @ xhat_j``, gamma's gradient
    through the values ``sum_{b,n} V * xhat [C]`` with ``V_j = dparts_jᵀ @ probs_j``, and (``with_values``: dx
    needs them) the values as ``[C, b, N]``; GEMM operands in ``od``, results in xhat's dtype. Each product is
    one batched GEMM over (head, sample)."""
    h, b, p, n = probs.shape
    c = xhat.shape[0]
    d = c // h
    xh = xhat.view(h, d, b, n).transpose(1, 2)                                               # [h, b, d, N]
    xg = torch.empty(h, b, d, n, dtype=xhat.dtype, device=xhat.device)  # contiguous: mul keeps xh's strides
    torch.mul(xh, gamma.view(h, 1, d, 1), out=xg)
    xg = xg.to(od)
    dfh = _dparts_by_head(dparts, h, od, sample_major=False)                               # [h, b, P, d]
    dp = torch.bmm(dfh.view(h * b, p, d), xg.view(h * b, d, n)).view(h, b, p, n).to(xhat.dtype)
    v = torch.bmm(dfh.view(h * b, p, d).transpose(1, 2), probs.reshape(h * b, p, n).to(od))  # [h*b, d, N]
    v = v.view(h, b, d, n).to(xhat.dtype)
    dgamma = torch.linalg.vecdot(v, xh).sum(1).view(c)
    return dp, dgamma, (v.transpose(1, 2).reshape(c, b, n) if with_values else None)


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
    step = chunk_size(b_total, _unfolded_per_sample_bytes(c, n, p, h, False, False, *element_bytes(dt, od)), chunk_mib)
    for s in chunks(b_total, step):
        if given:
            xhat, _, _ = normalised_tokens(x[s], eps, dt, mean[s], rstd[s])
        else:
            xhat, mean[s], rstd[s] = normalised_tokens(x[s], eps, dt)
        xo = xhat.to(od)
        b = xhat.shape[1]
        k = keys[:, s].view(c, b * n)                                                 # [C, b*N], strided
        matmul_into(k, wgo, xo.view(c, b * n))
        scores = torch.bmm(qo, k.view(h, d, b * n).to(od)).view(h, p, b, n).to(dt)
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


def unfolded_bwd(x: torch.Tensor, q: torch.Tensor, wg: torch.Tensor | None, gamma: torch.Tensor, keys: torch.Tensor,
                 lse: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, dparts: torch.Tensor | None,
                 dattn: torch.Tensor | None, needs_dx: bool, chunk_mib: float, dot_precision: str = "tf32",
                 head_reduce: str = "mean"):
    """Backward of the unfolded formulation. Returns ``dq [h, P, d]``, ``dwg [C, C]``, ``dgamma``
    (through the values only), ``dbeta [C]`` and ``dx [B, C, N]`` (or None). ``wg`` is read for dx only
    (None otherwise)."""
    b_total, c, n = x.shape
    h, p, d = q.shape
    dt = q.dtype
    dq = torch.zeros_like(q)
    dwg = (torch.empty if b_total else torch.zeros)(c, c, dtype=dt, device=x.device)  # the first chunk writes it
    dgamma = torch.zeros(c, dtype=dt, device=x.device)
    dbeta = (torch.zeros(c, dtype=dt, device=x.device) if dparts is None
             else torch.sum(dparts, (0, 1), dtype=dt))
    dx = torch.empty_like(x) if needs_dx else None
    od = operand_dtype(dot_precision, dt)
    qo = q.to(od)
    step = chunk_size(b_total, _unfolded_per_sample_bytes(c, n, p, h, True, needs_dx, *element_bytes(dt, od)),
                      chunk_mib)
    for s in chunks(b_total, step):
        xhat, _, _ = normalised_tokens(x[s], 0.0, dt, mean[s], rstd[s])
        b = xhat.shape[1]
        k = keys[:, s].reshape(h, d, b * n).to(od)
        scores = torch.bmm(qo, k).view(h, p, b, n).to(dt)
        pr = scores.sub_(lse[s].permute(1, 2, 0)[..., None]).exp_().transpose(1, 2)  # [h, b, P, N]
        values = None
        if dparts is not None:
            dp, dgamma_values, values = _dp_and_values(dparts[s], pr, xhat, gamma, od, needs_dx)
            dgamma += dgamma_values
        else:
            dp = torch.zeros(h, b, p, n, dtype=dt, device=x.device)
        if dattn is not None:
            reduce_heads_grad_(dp, dattn[s].to(dt), pr, head_reduce)
        ds = softmax_bwd_(dp, pr).transpose(1, 2).reshape(h, p, b * n).to(od)        # [h, P, b*N]
        dq += torch.bmm(ds, k.transpose(1, 2))  # (baddbmm_ runs a GEMM per head on the CPU: slower)
        dk = torch.bmm(qo.transpose(1, 2), ds).view(c, b * n)                        # dkeys [C, b*N]
        accumulate_mm_(dwg, dk, xhat.view(c, b * n).T.to(od), first=s.start == 0)
        del scores, pr, dp, ds  # the [h, P, N]-sized temporaries are dead before dx's map-sized ones
        if needs_dx:
            dxhat = torch.mm(wg.T.to(od), dk).view(c, b, n).to(dt)
            if values is not None:
                dxhat.addcmul_(values, gamma[:, None, None])
            dx[s] = layernorm_bwd_(dxhat, xhat, rstd[s]).transpose(0, 1)
    return dq, dwg, dgamma, dbeta, dx
