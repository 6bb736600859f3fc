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

# Samples per chunk on the torch-op path: temporaries are a few [chunk, C, N] and [chunk, h*P, N]
# buffers (about 6 MiB each at C=2048, N=196, chunk=4) while each GEMM is still large enough to
# run at full speed on a CPU.
TORCH_CHUNK = 4

FORMULATIONS = ("auto", "folded", "unfolded")


def pick_formulation(formulation: str, num_heads: int, dim: int, num_parts: int) -> str:
    """Folded while h·P < C + P, the FLOP crossover of the two score formulations."""
    if formulation not in FORMULATIONS:
        raise ValueError(f"formulation must be one of {FORMULATIONS}, got {formulation!r}")
    if formulation != "auto":
        return formulation
    return "folded" if num_heads * num_parts < dim + num_parts else "unfolded"


def _centred_stats(x: torch.Tensor, b0: int, b1: int, eps: float, dtype: torch.dtype):
    """Centred map ``x[b0:b1] - mean`` ``[b, C, N]`` and the token mean and rstd ``[b, N]``.

    Two passes (mean, then the centred sum of squares): exact with a large common offset, and
    much faster on a CPU than ``var_mean`` reducing over the strided channel axis.
    """
    xb = x[b0:b1]
    mean = xb.mean(1, dtype=dtype)
    xc = torch.sub(xb, mean[:, None, :])
    var = torch.linalg.vector_norm(xc, dim=1).square_().div_(xc.shape[1])
    return xc, mean, var.add_(eps).rsqrt_()


def _centred(x: torch.Tensor, b0: int, b1: int, mean: torch.Tensor) -> torch.Tensor:
    """``x[b0:b1] - mean`` ``[b, C, N]`` in the compute dtype, from the saved token means."""
    return torch.sub(x[b0:b1], mean[b0:b1, None, :])


def _heads(t: torch.Tensor, h: int) -> torch.Tensor:
    """``[b, C, N]`` -> ``[b, h, d, N]`` (a view)."""
    b, c, n = t.shape
    return t.view(b, h, c // h, n)


def _parts_from_probs(probs_r: torch.Tensor, xc: torch.Tensor, h: int) -> torch.Tensor:
    """``(P_j * rstd) @ Xc_jᵀ`` for every head: ``[b, h, P, N]`` x ``[b, C, N]`` -> ``[b, P, C]``."""
    b, _, p, _ = probs_r.shape
    if h == 1:
        return torch.bmm(probs_r[:, 0], xc.transpose(1, 2))
    out = torch.matmul(probs_r, _heads(xc, h).transpose(-1, -2))           # [b, h, P, d]
    return out.transpose(1, 2).reshape(b, p, -1)


def _part_head_view(t: torch.Tensor, h: int) -> torch.Tensor:
    """``[b, P, C]`` -> ``[b, h, P, d]`` (a view)."""
    b, p, c = t.shape
    return t.view(b, p, h, c // h).transpose(1, 2)


# ---------------------------------------------------------------------------------------------
# torch-op path
# ---------------------------------------------------------------------------------------------

def _torch_fwd(x, weights, gamma, beta, h, eps, formulation, out_dtype):
    """Returns parts [B, P, C], probs [B, h, P, N] fp32, mean, rstd [B, N] fp32, keys or None.

    ``weights`` is G [h, P, C] (folded) or (scale * Q_h [h, P, d], Wk * gamma [C, C]) (unfolded).
    """
    b_total, c, n = x.shape
    p = weights.shape[1] if formulation == "folded" else weights[0].shape[1]
    parts = torch.empty(b_total, p, c, dtype=out_dtype, device=x.device)
    probs = torch.empty(b_total, h, p, n, dtype=gamma.dtype, device=x.device)
    mean = torch.empty(b_total, n, dtype=gamma.dtype, device=x.device)
    rstd = torch.empty_like(mean)
    keys = None if formulation == "folded" else torch.empty(b_total, c, n, dtype=gamma.dtype, device=x.device)
    for b0 in range(0, b_total, TORCH_CHUNK):
        b1 = min(b0 + TORCH_CHUNK, b_total)
        xc, mean[b0:b1], rstd[b0:b1] = _centred_stats(x, b0, b1, eps, gamma.dtype)
        r = rstd[b0:b1, None, None, :]
        if formulation == "folded":
            scores = torch.matmul(weights.flatten(0, 1), xc).view(b1 - b0, h, p, n).mul_(r)
        else:
            q, wg = weights
            k = torch.matmul(wg, xc).mul_(rstd[b0:b1, None, :])              # [b, C, N]
            keys[b0:b1] = k
            scores = torch.matmul(q, _heads(k, h))                           # [b, h, P, N]
        pb = torch.softmax(scores, dim=-1)
        probs[b0:b1] = pb
        raw = _parts_from_probs(pb.mul_(r), xc, h)
        if parts.dtype == raw.dtype:
            torch.addcmul(beta, raw, gamma, out=parts[b0:b1])
        else:
            parts[b0:b1] = torch.addcmul(beta, raw, gamma)
    return parts, probs, mean, rstd, keys


def _torch_bwd(x, weights, gamma, beta, probs, mean, rstd, keys, dparts, dattn, h, formulation, needs_dx):
    """Returns (dweights, dgamma through the values, dbeta, dx or None).

    dweights is dG [h, P, C] (folded) or (dq [h, P, d], dWg [C, C]) (unfolded).
    """
    b_total, c, n = x.shape
    p = probs.shape[2]
    if formulation == "folded":
        dw = torch.zeros(h * p, c, dtype=gamma.dtype, device=x.device)
    else:
        q, wg = weights
        dq = torch.zeros_like(q)
        dwg = torch.zeros(c, c, dtype=gamma.dtype, device=x.device)
    dgamma = torch.zeros(c, dtype=gamma.dtype, device=x.device)
    dbeta = torch.zeros(c, dtype=gamma.dtype, device=x.device)
    dx = torch.empty_like(x) if needs_dx else None
    for b0 in range(0, b_total, TORCH_CHUNK):
        b1 = min(b0 + TORCH_CHUNK, b_total)
        bc = b1 - b0
        xc = _centred(x, b0, b1, mean)
        r = rstd[b0:b1, None, None, :]
        df = dparts[b0:b1].to(gamma.dtype)
        dbeta += df.sum((0, 1))
        pb = probs[b0:b1]
        # dP_j = (dF_j * gamma_j) @ Xc_j * rstd; beta adds a per-row constant that the softmax cancels.
        dfg = _part_head_view(df * gamma, h)                                  # [b, h, P, d]
        dp = torch.matmul(dfg, _heads(xc, h)).mul_(r)                          # [b, h, P, N]
        if dattn is not None:
            dp.add_(dattn[b0:b1, None].to(gamma.dtype), alpha=1.0 / h)
        ds = dp.sub_((pb * dp).sum(-1, keepdim=True)).mul_(pb)                # dS, in place of dP
        pr = pb * r
        # gamma's gradient through the values: sum_p dF * (P_j * rstd @ Xc_jᵀ).
        dgamma += (_parts_from_probs(pr, xc, h) * df).sum((0, 1))
        if formulation == "folded":
            dsr = ds.mul(r).view(bc, h * p, n)
            for i in range(bc):
                dw.addmm_(dsr[i], xc[i].T)
        else:
            k = keys[b0:b1]
            dq += torch.matmul(ds, _heads(k, h).transpose(-1, -2)).sum(0)
            dk = torch.matmul(q.transpose(-1, -2), ds).view(bc, c, n)          # [b, C, N]
            dk.mul_(rstd[b0:b1, None, :])
            for i in range(bc):
                dwg.addmm_(dk[i], xc[i].T)
        if needs_dx:
            dx[b0:b1] = _layer_norm_dx(xc, rstd[b0:b1], weights, gamma, ds, pb, df, h, formulation)
    dweights = dw.view(h, p, c) if formulation == "folded" else (dq, dwg)
    return dweights, dgamma, dbeta, dx


def _layer_norm_dx(xc, rstd, weights, gamma, ds, pb, df, h, formulation):
    """dX of one chunk: the gradient w.r.t. the normalised tokens, then LayerNorm's backward."""
    bc, c, n = xc.shape
    p = pb.shape[2]
    if formulation == "folded":
        dxhat = torch.matmul(weights.flatten(0, 1).T, ds.reshape(bc, h * p, n))          # [b, C, N]
    else:
        q, wg = weights
        # K' = Wg @ (Xc * rstd) = Wg @ xhat, so d xhat = Wgᵀ dK' with dK'_j = q_jᵀ dS_j.
        dxhat = torch.matmul(wg.T, torch.matmul(q.transpose(-1, -2), ds).view(bc, c, n))
    values = torch.matmul(_part_head_view(df, h).transpose(-1, -2), pb)                  # [b, h, d, N]
    dxhat += values.reshape(bc, c, n) * gamma[None, :, None]
    xhat = xc * rstd[:, None, :]
    dx = dxhat - dxhat.mean(1, keepdim=True) - xhat * (dxhat * xhat).mean(1, keepdim=True)
    return dx * rstd[:, None, :]


# ---------------------------------------------------------------------------------------------
# autograd Function
# ---------------------------------------------------------------------------------------------

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
        else:
            parts, probs, mean, rstd, keys = _torch_fwd(x, weights, gamma32, beta32, h, eps, formulation, x.dtype)
        attn = probs[:, 0] if h == 1 else probs.mean(1)
        attn = attn.to(x.dtype) if x.dtype != torch.float32 else attn
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
            dqprime = dw * gamma32                                                # [h, P, C]
            dq = torch.bmm(dqprime, wkh.transpose(1, 2)).mul_(scale)               # [h, P, d]
            m = torch.bmm(qh.transpose(1, 2), dw).mul_(scale)                      # [h, d, C]
        else:
            dqs, m = dw                                                           # dWg = dWk * gamma
            dq = dqs * scale
            m = m.view(h, c // h, c)
        dgamma += (wkh * m).sum((0, 1))
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
