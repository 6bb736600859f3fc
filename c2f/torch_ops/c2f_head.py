"""The fused C2F head as batched torch ops: the torch-op implementation of the contract that
``c2f.kernels.c2f_head`` implements with Triton kernels (docs/design.md, "The algebra" 7).

With ``xhat`` the normalised tokens ``[C, b, N]`` of a chunk of samples, ``g = scale * Q Wk * gamma``
``[h, P, C]``, ``wrg = Wr * gamma [P, C]`` and ``wcg = Wc * gamma [classes, C]``::

    P_j    = softmax_n(g_j @ xhat)            Zhat_j = wrg_j @ xhat_j        (head-j channels)
    pred   = sum_{j,n} P_j * Zhat_j                                           [P] per sample
    coef_j = M @ P_j / P,  M = [mask[:, b]; 1 - mask[:, perm^-1 b]]           [2K, N] per sample
    U      = coef_j @ xhat_jᵀ  (head-j channels)                             [2K, C] per sample
    logits[k, b] = (U @ wcgᵀ)[b, k] + (U @ wcgᵀ)[perm b, K + k]

Nothing of ``[B, P, C]`` (or ``[K, B, P, C]``) is formed: memory scales with B·P·N. ``dot_precision``
"bf16" / "fp16" rounds the operands of the large GEMMs (scores, readout and their gradients) to that
dtype, as autocast does; the small pooled products stay in the compute dtype.
"""
from __future__ import annotations

import torch

from .._math import (
    accumulate_mm_,
    chunk_size,
    chunks,
    element_bytes,
    given_token_stats,
    head_major,
    inverse_permutation,
    layernorm_bwd_,
    mixed_views,
    mixed_views_bwd,
    normalised_tokens,
    operand_dtype,
    pool_matrix,
    reduce_heads,
    reduce_heads_grad_,
    softmax_,
    softmax_bwd_,
)

__all__ = ["c2f_head_fwd", "c2f_head_bwd"]


def _per_sample_bytes(c: int, n: int, p: int, h: int, views: int, backward: bool, needs_dx: bool = False,
                      eb: int = 4, ob: int = 0) -> int:
    """Temporaries of one sample (every one a chunk holds: tests/test_chunk_budget.py measures them):
    xhat and with h > 1 its head-major copy; forward: the scores, the readout and their product; backward:
    dP, dZ and its ``[h, P, b*N]`` copy, the mixed views' pull-back to dP, softmax backward's product and dS,
    the ``[h, P, d]`` products, and for dx dxhat, a head's product and LayerNorm's; the pooled rows.
    ``eb``, ``ob``: ``c2f._math.element_bytes`` (16-bit operands add xhat's operand copy and the scores' and
    readout's 16-bit results; in backward dS's and dZ's copies, the ``[h, P, d]`` products and dx's product)."""
    maps = 1 if h == 1 else 2
    rows = h * p
    if not backward:
        return eb * (maps * c * n + 3 * rows * n + 4 * views * (c + n)) + ob * (c * n + 2 * rows * n)
    return (eb * ((maps + (3 if needs_dx else 0)) * c * n + 6 * rows * n + (0 if h == 1 else p * c)
                  + 4 * views * (c + n))
            + ob * ((2 if needs_dx else 1) * c * n + 2 * rows * n + p * c))


def _coef(m: torch.Tensor, pr: torch.Tensor) -> torch.Tensor:
    """``coef [h, b, 2K, N] = M @ P_j`` for every head at once: ``m [b, 2K, P]``, ``pr [h, b, P, N]``."""
    return torch.matmul(m.unsqueeze(0), pr)


def _pooled(coef: torch.Tensor, xh: torch.Tensor) -> torch.Tensor:
    """``U [b, 2K, C]``: per head, ``coef_j [b, 2K, N]`` contracted with the head's tokens ``xh [h, b, N, d]``
    (``head_major``), all heads in one batched GEMM."""
    h, b, n, d = xh.shape
    v = coef.shape[2]
    u = torch.bmm(coef.reshape(h * b, v, n), xh.view(h * b, n, d)).view(h, b, v, d)
    return u.permute(1, 2, 0, 3).reshape(b, v, h * d)


def c2f_head_fwd(x: torch.Tensor, g: torch.Tensor, wrg: torch.Tensor, wcg: torch.Tensor, perm: torch.Tensor,
                 mask: torch.Tensor, eps: float, chunk_mib: float, dot_precision: str = "tf32",
                 head_reduce: str = "mean", x_mean: torch.Tensor | None = None, x_var: torch.Tensor | None = None):
    """Forward of the fused head.

    ``x [B, C, N]`` (any strides and float dtype); ``g [h, P, C]``, ``wrg [P, C]``, ``wcg [classes, C]``
    in the compute dtype; ``perm [B]`` a permutation, ``mask [K, B, P]`` (fp32). Returns ``attn [B, P, N]``,
    ``pred [B, P]`` and ``logits [K, B, classes]`` without their constant terms (beta, biases), and the
    saved state ``probs [B, h, P, N]`` (empty when h == 1: ``attn`` is the probabilities), ``zhat
    [B, h, P, N]``, ``mean, rstd [B, N]``; all in the compute dtype. ``x_mean, x_var [B, N]`` (both or neither):
    the token statistics given with x (``c2f._math.given_token_stats``); no statistics pass runs.
    """
    b_total, c, n = x.shape
    h, p, _ = g.shape
    d = c // h
    k = mask.shape[0]
    dt = g.dtype
    dev = x.device
    attn = torch.empty(b_total, p, n, dtype=dt, device=dev)
    probs = torch.empty((b_total, h, p, n) if h > 1 else (0,), dtype=dt, device=dev)
    zhat = torch.empty(b_total, h, p, n, dtype=dt, device=dev)
    pred = torch.empty(b_total, p, dtype=dt, device=dev)
    rows = torch.empty(b_total, 2 * k, wcg.shape[0], dtype=dt, device=dev)
    given = given_token_stats(x_mean, x_var, eps, dt)
    mean, rstd = given or (torch.empty(b_total, n, dtype=dt, device=dev), torch.empty(b_total, n, dtype=dt, device=dev))
    inv = inverse_permutation(perm)
    od = operand_dtype(dot_precision, dt)
    go, wrg_h = g.view(h * p, c).to(od), wrg.to(od).view(p, h, d).transpose(0, 1)      # [h, P, d]
    # One head: the scores and the readout both contract the whole map, so one [2P, C] GEMM does both.
    stacked = torch.cat([go, wrg_h[0]]) if h == 1 else None
    step = chunk_size(b_total, _per_sample_bytes(c, n, p, h, k, False, False, *element_bytes(dt, od)), chunk_mib)
    for s in chunks(b_total, step):
        if given:
            xhat, _, _ = normalised_tokens(x[s], eps, dt, mean[s], rstd[s])
        else:
            xhat, mean[s], rstd[s] = normalised_tokens(x[s], eps, dt)
        xo = xhat.to(od)
        b = xhat.shape[1]
        if stacked is not None:
            sz = torch.mm(stacked, xo.view(c, b * n)).view(2, p, b, n).to(dt)
            scores, z = sz[:1], sz[1:].transpose(1, 2)                                 # z [1, b, P, N]
        else:
            scores = torch.mm(go, xo.view(c, b * n)).view(h, p, b, n).to(dt)
            z = torch.bmm(wrg_h, xo.view(h, d, b * n)).view(h, p, b, n).to(dt).transpose(1, 2)
        pr = softmax_(scores).transpose(1, 2)                                          # [h, b, P, N]
        if h == 1:
            attn[s] = pr[0]
        else:
            probs[s] = pr.transpose(0, 1)
            reduce_heads(pr, head_reduce, 0, attn[s])
        zhat[s] = z.transpose(0, 1)
        pred[s] = (pr * z).sum((0, 3))
        m = pool_matrix(mask, inv, dt, s)                                               # [b, 2K, P]
        torch.matmul(_pooled(_coef(m, pr), head_major(xhat, h)), wcg.T, out=rows[s])
    logits = torch.empty(k, b_total, wcg.shape[0], dtype=dt, device=dev)
    mixed_views(rows, perm, out=logits)
    return attn, pred, logits, probs, zhat, mean, rstd


def c2f_head_bwd(x: torch.Tensor, g: torch.Tensor, wrg: torch.Tensor, wcg: torch.Tensor, perm: torch.Tensor,
                 mask: torch.Tensor, attn: torch.Tensor, probs: torch.Tensor, zhat: torch.Tensor, mean: torch.Tensor,
                 rstd: torch.Tensor, dattn: torch.Tensor | None, dpred: torch.Tensor | None,
                 dlogits: torch.Tensor | None, needs_dx: bool, chunk_mib: float, dot_precision: str = "tf32",
                 head_reduce: str = "mean"):
    """Backward of the fused head from its saved state. Returns ``dg [h, P, C]``, ``dwrg [P, C]``,
    ``dwcg [classes, C]`` (compute dtype) and ``dx [B, C, N]`` in ``x.dtype`` (or None)."""
    b_total, c, n = x.shape
    h, p, _ = g.shape
    d = c // h
    k = mask.shape[0]
    dt = g.dtype
    dev = x.device
    # One head: dG and dWrg come from one [2P, b*N] x [b*N, C] GEMM of the stacked [dS; dZ].
    stacked = h == 1
    dgw = torch.zeros(2 * p if stacked else h * p, c, dtype=dt, device=dev)
    dg = dgw[:p] if stacked else dgw
    dwrg = dgw[p:] if stacked else torch.zeros(p, c, dtype=dt, device=dev)
    dwcg = torch.zeros_like(wcg)
    dx = torch.empty_like(x) if needs_dx else None
    inv = inverse_permutation(perm)
    od = operand_dtype(dot_precision, dt)
    wrg_h = wrg.to(od).view(p, h, d).transpose(0, 1)
    if dlogits is not None:   # rows of sample b: its own views, then the views it was mixed into
        drows = mixed_views_bwd(dlogits, inv, dt)                                    # [B, 2K, classes]
    step = chunk_size(b_total, _per_sample_bytes(c, n, p, h, k, True, needs_dx, *element_bytes(dt, od)), chunk_mib)
    for s in chunks(b_total, step):
        xhat, _, _ = normalised_tokens(x[s], 0.0, dt, mean[s], rstd[s])
        xo = xhat.to(od)
        b = xhat.shape[1]
        pr = attn[s][None] if h == 1 else probs[s].transpose(0, 1)                   # [h, b, P, N]
        z = zhat[s].transpose(0, 1)
        dp = torch.zeros(h, b, p, n, dtype=dt, device=dev)
        dxhat = torch.zeros(c, b, n, dtype=dt, device=dev) if needs_dx else None
        if dattn is not None:
            reduce_heads_grad_(dp, dattn[s].to(dt), pr, head_reduce)
        dsz = torch.zeros(2 * p, b * n, dtype=od, device=dev) if stacked else None   # [dS; dZ]
        if dpred is not None:
            dpb = dpred[s].to(dt)[None, :, :, None]
            dp.addcmul_(z, dpb)
            dz = (pr * dpb).transpose(1, 2).reshape(h, p, b * n).to(od)                 # [h, P, b*N]
            if stacked:
                dsz[p:] = dz[0]
            else:
                dwrg.view(p, h, d).transpose(0, 1).add_(torch.bmm(dz, xo.view(h, d, b * n).transpose(1, 2)))
            if needs_dx:
                dxhat.view(h, d, b * n).add_(torch.bmm(wrg_h.transpose(1, 2), dz))
        if dlogits is not None:
            m = pool_matrix(mask, inv, dt, s)                                              # [b, 2K, P]
            coef = _coef(m, pr)                                                          # [h, b, 2K, N]
            xh = head_major(xhat, h)                                                     # [h, b, N, d]
            dr = drows[s]                                                                # [b, 2K, classes]
            dwcg.addmm_(dr.reshape(-1, dr.shape[-1]).T, _pooled(coef, xh).view(-1, c))
            du = torch.matmul(dr, wcg)                                                   # [b, 2K, C]
            duh = du.view(b, -1, h, d).permute(2, 0, 1, 3)                               # [h, b, 2K, d]
            dcoef = torch.matmul(duh, xh.transpose(2, 3))                                # [h, b, 2K, N]
            dp.add_(torch.matmul(m.transpose(1, 2).unsqueeze(0), dcoef))
            if needs_dx:
                dxhat.view(h, d, b, n).add_(torch.matmul(duh.transpose(2, 3), coef).transpose(1, 2))
        if stacked:
            dsz[:p] = softmax_bwd_(dp, pr)[0].transpose(0, 1).reshape(p, b * n)
            ds = dsz[:p]
            accumulate_mm_(dgw, dsz, xo.view(c, b * n).T)
        else:
            ds = softmax_bwd_(dp, pr).transpose(1, 2).reshape(h * p, b * n).to(od)
            accumulate_mm_(dg, ds, xo.view(c, b * n).T)
        if needs_dx:
            accumulate_mm_(dxhat.view(c, b * n), g.view(h * p, c).T.to(od), ds)
            dx[s] = layernorm_bwd_(dxhat, xhat, rstd[s]).transpose(0, 1)
    # Custom-op outputs must not share storage: one head's dG and dWrg are halves of one buffer.
    return dg.clone().view(h, p, c) if stacked else dg.view(h, p, c), dwrg, dwcg, dx
