"""Fused part attention: LayerNorm + QKᵀ + softmax + weighted sum, as one autograd Function.

The algebra (DESIGN.md, "The algebra" 1-4): the key projection is folded into the queries, or the
LayerNorm into the key projection, and LayerNorm is folded into the contraction over channels, so
neither the normalised tokens nor (with few heads) the keys are ever formed:

    S_j[p, n] = rstd[n] * (G_j @ (X - mean))[p, n]         G_j = scale * Q_j @ Wk_j * gamma
    parts_j   = gamma * ((P_j * rstd) @ (X - mean)ᵀ)_j + beta

Two formulations, picked by head count (``formulation="auto"``):
- "folded": G = [h, P, C] is formed once per step; scores cost h·P·C·N per sample. Cheapest while
  h·P < C + P (h < C/P + 1, about 7.6 at C=2048, P=312).
- "unfolded": keys K' = (Wk * gamma) @ (X - mean) * rstd, C·C·N per sample, then scores P·C·N.
  Cheaper with many heads. The torch-op path implements both; the Triton path runs "folded".

On CUDA (or under the interpreter with backend="triton") the work runs in the kernels of
``kernels/part_attention.py``; on CPU the same algebra runs as batched torch ops, a few samples at
a time so temporaries stay small.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import reference
from ._backend import load_kernels, resolve_backend
from ._validate import check_float, check_same_device, describe, feature_map_as_channels

FORMULATIONS = ("auto", "folded", "unfolded")


def pick_formulation(formulation: str, num_heads: int, dim: int, num_parts: int) -> str:
    """Folded while h·P < C + P, the FLOP crossover of the two score formulations."""
    if formulation not in FORMULATIONS:
        raise ValueError(f"formulation must be one of {FORMULATIONS}, got {formulation!r}")
    if formulation != "auto":
        return formulation
    return "folded" if num_heads * num_parts < dim + num_parts else "unfolded"


# ---------------------------------------------------------------------------------------------
# torch-op path: one sample at a time, so every temporary is [C, N] or [h, P, N] sized (about
# 1.5 MiB at C=2048, N=196) while each GEMM ([P, C] x [C, N]) is still large enough for a CPU.
# ---------------------------------------------------------------------------------------------

def _centred_stats(xb: torch.Tensor, eps: float, dtype: torch.dtype):
    """Centred map ``xb - mean`` ``[C, N]`` and the token mean and rstd ``[N]`` of one sample.

    Two passes (mean, then the centred sum of squares): exact with a large common offset, and
    much faster on a CPU than ``var_mean`` reducing over the strided channel axis.
    """
    mean = xb.mean(0, dtype=dtype)
    xc = torch.sub(xb, mean)
    var = torch.linalg.vector_norm(xc, dim=0).square_().div_(xc.shape[0])
    return xc, mean, var.add_(eps).rsqrt_()


def _softmax_(s: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim, in place."""
    s.sub_(s.amax(-1, keepdim=True)).exp_()
    return s.div_(s.sum(-1, keepdim=True))


def _scores(weights, xc, rstd, h, formulation, key_out=None):
    """Scores ``[h, P, N]`` of one sample; the unfolded formulation writes its keys to ``key_out``."""
    c, n = xc.shape
    if formulation == "folded":
        return torch.mm(weights.flatten(0, 1), xc).mul_(rstd).view(h, -1, n)
    q, wg = weights
    keys = torch.mm(wg, xc, out=key_out).mul_(rstd)                             # [C, N]
    return torch.bmm(q, keys.view(h, c // h, n))


def _torch_fwd(x, weights, gamma, beta, h, eps, formulation, out_dtype):
    """Returns parts [B, P, C], attn [B, P, N], saved probabilities, mean, rstd [B, N], keys.

    ``weights`` is G [h, P, C] (folded) or (scale * Q_h [h, P, d], Wk * gamma [C, C]) (unfolded).
    The folded formulation saves the probabilities [B, h, P, N] (with one head: the attn output
    itself); the unfolded one saves its keys [B, C, N] and the logsumexp [B, h, P] instead, since
    recomputing the scores from the keys is cheap.
    """
    b_total, c, n = x.shape
    p = weights.shape[1] if formulation == "folded" else weights[0].shape[1]
    dt = gamma.dtype
    parts = torch.empty(b_total, p, c, dtype=out_dtype, device=x.device)
    mean = torch.empty(b_total, n, dtype=dt, device=x.device)
    rstd = torch.empty_like(mean)
    if formulation == "folded":
        saved = torch.empty(b_total, h, p, n, dtype=dt, device=x.device)
        keys = None
    else:
        saved = torch.empty(b_total, h, p, dtype=dt, device=x.device)
        keys = torch.empty(b_total, c, n, dtype=dt, device=x.device)
    attn = saved[:, 0] if formulation == "folded" and h == 1 else torch.empty(b_total, p, n, dtype=dt,
                                                                             device=x.device)
    for b in range(b_total):
        xc, mean[b], rstd[b] = _centred_stats(x[b], eps, dt)
        s = _scores(weights, xc, rstd[b], h, formulation, None if keys is None else keys[b])
        if formulation == "folded":
            saved[b] = s
            probs = _softmax_(saved[b])
        else:
            saved[b] = torch.logsumexp(s, -1)
            probs = s.sub_(saved[b, :, :, None]).exp_()
        if h > 1:
            torch.mean(probs, 0, out=attn[b])
        pr = probs * rstd[b]
        out = parts[b]
        if h == 1 and out.dtype == dt:
            torch.mm(pr[0], xc.T, out=out)
        else:
            out.view(p, h, c // h).copy_(torch.bmm(pr, xc.view(h, c // h, n).transpose(1, 2)).transpose(0, 1))
        out.mul_(gamma).add_(beta)
    return parts, attn.to(out_dtype), saved, mean, rstd, keys


def _torch_bwd(x, weights, gamma, beta, saved, mean, rstd, keys, dparts, dattn, h, formulation, needs_dx):
    """Returns (dweights, dgamma through the values, dbeta, dx or None).

    dweights is dG [h, P, C] (folded) or (dq [h, P, d], dWg [C, C]) (unfolded).
    """
    b_total, c, n = x.shape
    d = c // h
    dt = gamma.dtype
    if formulation == "folded":
        p = saved.shape[2]
        dw = torch.zeros(h * p, c, dtype=dt, device=x.device)
    else:
        q, wg = weights
        p = q.shape[1]
        dq = torch.zeros_like(q)
        dwg = torch.zeros(c, c, dtype=dt, device=x.device)
    dgamma = torch.zeros(c, dtype=dt, device=x.device)
    dbeta = torch.zeros(c, dtype=dt, device=x.device)
    dx = torch.empty_like(x) if needs_dx else None
    for b in range(b_total):
        xc = torch.sub(x[b], mean[b])                                              # [C, N]
        r = rstd[b]
        df = dparts[b].to(dt)                                                       # [P, C]
        dfh = df.view(p, h, d).transpose(0, 1)                                      # [h, P, d]
        dbeta += df.sum(0)
        if formulation == "folded":
            probs = saved[b]
        else:
            k = keys[b]
            probs = torch.bmm(q, k.view(h, d, n)).sub_(saved[b, :, :, None]).exp_()
        # dP_j = dF_j @ (gamma * Xc * rstd)_j; beta adds a per-row constant that the softmax cancels.
        xg = (xc * gamma[:, None]).view(h, d, n)
        dp = torch.bmm(dfh, xg).mul_(r)                                            # [h, P, N]
        if dattn is not None:
            dp.add_(dattn[b].to(dt), alpha=1.0 / h)
        ds = dp.sub_((probs * dp).sum(-1, keepdim=True)).mul_(probs)               # dS, in place of dP
        # dF_jᵀ P_j [C, N]: gamma's gradient through the values is sum_n of it * Xc * rstd.
        values = torch.bmm(dfh.transpose(1, 2), probs).view(c, n)
        dgamma += torch.mv(values * xc, r)
        if formulation == "folded":
            dw.addmm_(ds.view(h * p, n) * r, xc.T)
        else:
            dq.baddbmm_(ds, k.view(h, d, n).transpose(1, 2))
            dk = torch.bmm(q.transpose(1, 2), ds).view(c, n)                       # dK' [C, N]
            dwg.addmm_(dk * r, xc.T)
        if needs_dx:
            if formulation == "folded":
                dxhat = torch.mm(weights.flatten(0, 1).T, ds.view(h * p, n))
            else:  # K' = Wg @ (Xc * rstd): d xhat = Wgᵀ dK'
                dxhat = torch.mm(wg.T, dk)
            dxhat.add_(values * gamma[:, None])
            xhat = xc.mul_(r)
            dxb = dxhat - dxhat.mean(0) - xhat * (dxhat * xhat).mean(0)
            dx[b] = dxb.mul_(r)
    dweights = dw.view(h, p, c) if formulation == "folded" else (dq, dwg)
    return dweights, dgamma, dbeta, dx


# ---------------------------------------------------------------------------------------------
# autograd Function
# ---------------------------------------------------------------------------------------------

# Rows per block in the backward's parameter-gradient epilogue: [32, C] temporaries (0.25 MiB at
# C=2048) instead of [P, C] or [C, C] ones, at no cost to the GEMMs' speed.
EPILOGUE_ROWS = 32


def _queries_grad_(dg: torch.Tensor, gamma: torch.Tensor, wkh: torch.Tensor, scale: float) -> torch.Tensor:
    """dQ_j = scale * (dG_j * gamma) Wk_jᵀ ``[h, P, d]``; with one head written over dG itself.

    One head: dQ has dG's shape, so it is computed a block of rows at a time into dG's storage
    and the step never holds both (dG is dead afterwards).
    """
    h, p, _ = dg.shape
    if h > 1:
        return torch.bmm(dg.mul_(gamma), wkh.transpose(1, 2)).mul_(scale)
    wt = wkh[0].T
    for r0 in range(0, p, EPILOGUE_ROWS):
        rows = dg[0, r0:r0 + EPILOGUE_ROWS]
        rows.copy_(torch.mm(rows * gamma, wt).mul_(scale))
    return dg


def _column_dot(a: torch.Tensor, b: torch.Tensor, rows: int = EPILOGUE_ROWS) -> torch.Tensor:
    """``(a * b).sum(0)`` for ``[C, C]`` matrices, a block of rows at a time (no [C, C] temporary)."""
    out = torch.zeros(a.shape[1], dtype=a.dtype, device=a.device)
    for r0 in range(0, a.shape[0], rows):
        out += (a[r0:r0 + rows] * b[r0:r0 + rows]).sum(0)
    return out


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 whatever the storage dtype; float64 inputs (tests, gradcheck) stay float64."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _fold_queries(queries, k_weight, gamma, h, scale):
    """G = scale * Q_j @ Wk_j * gamma, ``[h, P, C]`` fp32, and Q' (without gamma) for the backward."""
    p, c = queries.shape
    qh = queries.to(gamma.dtype).view(p, h, c // h).transpose(0, 1)           # [h, P, d]
    qprime = torch.bmm(qh, k_weight.to(gamma.dtype).view(h, c // h, c)).mul_(scale)  # [h, P, C]
    return qprime * gamma


class _PartAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, queries, k_weight, k_bias, gamma, beta, num_heads, scale, eps, formulation, backend):
        h = num_heads
        b, c, n = x.shape
        p = queries.shape[0]
        gamma32, beta32 = gamma.to(_compute_dtype(x)), beta.to(_compute_dtype(x))
        if formulation == "folded":
            weights = _fold_queries(queries, k_weight, gamma32, h, scale)
        else:
            qh = queries.to(gamma32.dtype).view(p, h, c // h).transpose(0, 1) * scale
            weights = (qh, k_weight.to(gamma32.dtype) * gamma32)
        if backend == "triton":
            kern = load_kernels("part_attention")
            parts, probs, mean, rstd = kern.part_attention_fwd(x, weights, gamma32, beta32, h, eps,
                                                               out_dtype=x.dtype)
            keys = None
            attn = (probs[:, 0] if h == 1 else probs.mean(1)).to(x.dtype)
        else:
            parts, attn, probs, mean, rstd, keys = _torch_fwd(x, weights, gamma32, beta32, h, eps, formulation,
                                                              x.dtype)
        # Saved: x (the caller's, not a copy), the probabilities (h == 1 in fp32: the attn output
        # itself), the token statistics, the keys of the unfolded formulation; G and Wk * gamma
        # are recomputed from the parameters in backward.
        ctx.save_for_backward(x, queries, k_weight, gamma, beta, probs, mean, rstd,
                              keys if keys is not None else torch.empty(0))
        ctx.config = (h, scale, formulation, backend)
        ctx.bias_like = None if k_bias is None else (k_bias.shape, k_bias.dtype)
        return parts, attn

    @staticmethod
    def backward(ctx, dparts, dattn):
        x, queries, k_weight, gamma, beta, probs, mean, rstd, keys = ctx.saved_tensors
        h, scale, formulation, backend = ctx.config
        b, c, n = x.shape
        p = queries.shape[0]
        needs_dx = ctx.needs_input_grad[0]
        gamma32, beta32 = gamma.to(_compute_dtype(x)), beta.to(_compute_dtype(x))
        if dparts is None:
            dparts = torch.zeros(b, p, c, dtype=x.dtype, device=x.device)
        qh = queries.to(gamma32.dtype).view(p, h, c // h).transpose(0, 1)      # [h, P, d]
        wk = k_weight.to(gamma32.dtype)
        if formulation == "unfolded":
            weights = (qh * scale, wk * gamma32)
        elif needs_dx or backend == "triton":
            weights = _fold_queries(queries, k_weight, gamma32, h, scale)
        else:
            weights = None  # the folded torch-op backward needs G only for dX
        if backend == "triton":
            kern = load_kernels("part_attention")
            dw, dgamma, dbeta, dx = kern.part_attention_bwd(x, weights, gamma32, beta32, probs, mean, rstd,
                                                            dparts, dattn, h, needs_dx)
        else:
            dw, dgamma, dbeta, dx = _torch_bwd(x, weights, gamma32, beta32, probs, mean, rstd, keys,
                                               dparts, dattn, h, formulation, needs_dx)
        wkh = wk.view(h, c // h, c)
        if formulation == "folded":
            # G_j = scale * Q_j Wk_j * gamma: M_j = scale * Q_jᵀ dG_j gives dWk_j = M_j * gamma and
            # gamma's gradient through G as the column sums of Wk * M.
            m = torch.bmm(qh.transpose(1, 2), dw).mul_(scale)                      # [h, d, C]
            dq = _queries_grad_(dw, gamma32, wkh, scale)                          # [h, P, d]
            del dw  # peak memory: dG is dead once dQ and M exist
        else:
            dqs, m = dw                                                           # dWg = dWk * gamma
            dq = dqs * scale
            m = m.view(h, c // h, c)
        dgamma += _column_dot(wk, m.view(c, c))
        dwk = m.mul_(gamma32).view(c, c)
        dq = dq.transpose(0, 1).reshape(p, c)
        # The key bias adds a constant to each query's scores: the softmax cancels it exactly.
        dbias = None
        if ctx.bias_like is not None and ctx.needs_input_grad[3]:
            dbias = torch.zeros(ctx.bias_like[0], dtype=ctx.bias_like[1], device=x.device)
        return (dx, dq.to(queries.dtype), dwk.to(k_weight.dtype), dbias, dgamma.to(gamma.dtype),
                dbeta.to(beta.dtype), None, None, None, None, None)


def part_attention(x: torch.Tensor, queries: torch.Tensor, k_weight: torch.Tensor, norm_weight: torch.Tensor,
                   norm_bias: torch.Tensor, num_heads: int = 1, scale: Optional[float] = None, eps: float = 1e-5,
                   backend: str = "auto", formulation: str = "auto", k_bias: Optional[torch.Tensor] = None):
    """Fused part attention on a feature map ``[B, C, H, W]`` or tokens ``[B, N, C]``.

    Returns ``(parts [B, P, C], attn [B, P, N])`` in ``x.dtype``, computed in fp32. ``k_bias`` only
    receives its (exactly zero) gradient: a key bias drops out of the softmax.
    """
    p, c = queries.shape if queries.dim() == 2 else (None, None)
    if queries.dim() != 2:
        raise ValueError(f"queries must be [P, C], got {describe(queries)}")
    xv = feature_map_as_channels(x, c)
    for name, t, shape in (("k_weight", k_weight, (c, c)), ("norm_weight", norm_weight, (c,)),
                           ("norm_bias", norm_bias, (c,))):
        check_float(name, t)
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {describe(t)}")
    check_same_device(x=x, queries=queries, k_weight=k_weight, norm_weight=norm_weight, norm_bias=norm_bias)
    if num_heads <= 0 or c % num_heads:
        raise ValueError(f"num_heads={num_heads} must be positive and divide C={c}")
    scale = scale or (c // num_heads) ** -0.5
    b, _, n = xv.shape
    if b == 0:
        return x.new_empty(0, p, c), x.new_empty(0, p, n)
    chosen = resolve_backend(backend, x.device)
    form = pick_formulation(formulation, num_heads, c, p)
    if chosen == "triton":
        form = "folded"
    return _PartAttention.apply(xv, queries, k_weight, k_bias, norm_weight, norm_bias, num_heads, scale, eps,
                                form, chosen)


class PartAttention(reference.PartAttention):
    """The fused part attention: same constructor, parameters and ``state_dict`` as
    ``c2f.reference.PartAttention``, same outputs and gradients.

    ``backend``: "auto" (Triton on CUDA, torch ops on CPU), "triton" (on CPU: the interpreter) or
    "torch". ``formulation``: "auto" (folded below about C/P + 1 heads), "folded" or "unfolded".
    """

    def __init__(self, dim: int, num_parts: int = 312, num_heads: int = 1, qkv_bias: bool = False,
                 qk_scale: Optional[float] = None, eps: float = 1e-5, backend: str = "auto",
                 formulation: str = "auto"):
        super().__init__(dim, num_parts, num_heads, qkv_bias, qk_scale, eps)
        if backend not in ("auto", "triton", "torch"):
            raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
        pick_formulation(formulation, num_heads, dim, num_parts)
        self.backend, self.formulation = backend, formulation

    def forward(self, x: torch.Tensor):
        return part_attention(x, self.queries, self.k.weight, self.norm.weight, self.norm.bias,
                              self.num_heads, self.scale, self.eps, backend=self.backend,
                              formulation=self.formulation, k_bias=self.k.bias)
