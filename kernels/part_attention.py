"""Part attention with Triton kernels: the launchers of the op contract that ``c2f.torch_ops.part_attention``
implements with torch ops (same functions, same signatures, same saved state).

The launchers validate layouts, allocate, and launch each kernel with its plan from
``plans_part_attention.py``;
the kernels live in ``part_attention_fwd.py`` and ``part_attention_bwd.py``.

The unfolded formulation (many heads) is, apart from its softmax, three dense GEMMs over all the
batch's tokens: the key projection ``(Wk * gamma) [C, C] @ xhat [C, B·N]`` (C·C·N per sample, its
whole cost at h = 16) and its two backward products. Those are what the vendor BLAS runs at its peak,
so ``unfolded_fwd`` / ``unfolded_bwd`` here are the batched torch-op implementations run on the
device's tensors (a fixed number of launches per chunk of samples, independent of B; their fp32
matmuls follow ``torch.backends.cuda.matmul.allow_tf32``). There is no Triton kernel for them.
"""
from __future__ import annotations

import torch

from .._math import reduce_heads
from ..torch_ops.part_attention import unfolded_bwd, unfolded_fwd  # see the module docstring
from . import targets
from .common import (
    F32,
    DAttn,
    check,
    check_dims,
    check_stats,
    check_x,
    dattn_operand,
    make_plans,
    token_stats,
    xstrides,
)
from .launch import FLOAT_DTYPES, launch
from .part_attention_bwd import (
    _part_attention_bwd_dg_kernel,
    _part_attention_bwd_dp_kernel,
    _part_attention_bwd_dx_kernel,
    _part_attention_bwd_dxhat_kernel,
    _part_attention_bwd_rows_kernel,
    _part_attention_bwd_softmax_kernel,
)
from .part_attention_fwd import (
    _part_attention_fwd_parts_kernel,
    _part_attention_fwd_rows_kernel,
    _part_attention_fwd_scores_kernel,
    _part_attention_fwd_softmax_kernel,
    _part_attention_stats_kernel,
)
from .plans_part_attention import (
    attention_bwd_rows,
    attention_dg,
    attention_dp,
    attention_dx,
    attention_dxhat,
    attention_fwd_rows,
    attention_parts,
    attention_scores,
    attention_softmax,
    attention_softmax_bwd,
    attention_stats,
    short_rows,
)

__all__ = ["folded_fwd", "folded_bwd", "unfolded_fwd", "unfolded_bwd"]


def folded_fwd(x: torch.Tensor, g: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float,
               out_dtype: torch.dtype, chunk_mib: float, dot_precision: str = "tf32", head_reduce: str = "mean",
               x_mean: torch.Tensor | None = None, x_var: torch.Tensor | None = None):
    """Forward of the folded formulation (``c2f.torch_ops.part_attention.folded_fwd`` has the contract).

    ``x [B, C, N]`` any strides, fp32/fp16/bf16, read in place; ``g [h, P, C]``, ``gamma, beta [C]``
    fp32. Returns ``parts [B, P, C]`` (``out_dtype``), ``attn [B, P, N]``, ``probs [B, h, P, N]``
    (empty when h == 1), ``mean, rstd [B, N]``, all fp32 but parts. ``chunk_mib`` is the torch-op
    path's; the kernels keep no per-chunk temporaries. ``dot_precision``: one of ``plans.DOT_PRECISIONS``.
    ``x_mean, x_var [B, N]`` fp32 (both or neither): the token statistics given with x; the statistics
    kernel does not run, and the short-row kernel reads them instead of computing them.
    """
    h, p, _ = check_dims("g", g, "[h, P, C]")
    bsz, c, n = check_x(x, g, h, p)
    dev = x.device
    check("gamma", gamma, (c,), F32, dev, contiguous=True)
    check("beta", beta, (c,), F32, dev, contiguous=True)
    has_stats = check_stats(x_mean, x_var, bsz, n, dev)
    if out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be float32, float16 or bfloat16, got {out_dtype}")
    target = targets.current(dev)
    rows = short_rows(n, target)
    plan = make_plans(lambda: _fwd_plans(bsz, c, n, p, h, x.dtype, target, dot_precision, rows, has_stats),
                      "part attention", x, target, dot_precision)
    mean, rstd = token_stats(x_mean, x_var, eps, bsz, n, dev)
    parts = torch.empty(bsz, p, c, device=dev, dtype=out_dtype)
    attn = torch.empty(bsz, p, n, device=dev, dtype=torch.float32)
    probs = torch.empty((bsz, h, p, n) if h > 1 else (0,), device=dev, dtype=torch.float32)
    if bsz == 0:
        return parts, attn, probs, mean, rstd
    scores = attn if h == 1 else probs      # the scores are written where their probabilities go
    xs = xstrides(x)
    if rows:
        launch(_part_attention_fwd_rows_kernel, plan["rows"], X_ptr=x, G_ptr=g, Gamma_ptr=gamma, Beta_ptr=beta,
               Mean_ptr=mean, Rstd_ptr=rstd, Probs_ptr=scores, Parts_ptr=parts, C=c, N=n, P=p, D=c // h, H=h, **xs,
               eps=float(eps))
    else:
        if not has_stats:
            launch(_part_attention_stats_kernel, plan["stats"], X_ptr=x, Mean_ptr=mean, Rstd_ptr=rstd, C=c, N=n,
                   **xs, eps=float(eps))
        launch(_part_attention_fwd_scores_kernel, plan["scores"], X_ptr=x, G_ptr=g, Mean_ptr=mean, Rstd_ptr=rstd,
               S_ptr=scores, C=c, N=n, HP=h * p, **xs)
        launch(_part_attention_fwd_softmax_kernel, plan["softmax"], S_ptr=scores, R=bsz * h * p, N=n)
        launch(_part_attention_fwd_parts_kernel, plan["parts"], X_ptr=x, Probs_ptr=scores, Gamma_ptr=gamma,
               Beta_ptr=beta, Mean_ptr=mean, Rstd_ptr=rstd, Parts_ptr=parts, C=c, N=n, P=p, D=c // h, H=h, **xs)
    if h > 1:
        reduce_heads(probs, head_reduce, 1, attn)
    return parts, attn, probs, mean, rstd


def _fwd_plans(bsz: int, c: int, n: int, p: int, h: int, dtype: torch.dtype, target, dot_precision: str,
               rows: bool, has_stats: bool) -> dict:
    """The forward's plans: the short-row kernel (``short_rows``) or the tiled ones (the statistics kernel
    without ``has_stats``, the scores, the softmax, the parts)."""
    if rows:
        return dict(rows=attention_fwd_rows(bsz, c, n, p, h, dtype, target, dot_precision, has_stats=has_stats))
    plans = dict(scores=attention_scores(bsz, c, n, p, h, dtype, target, dot_precision),
                 softmax=attention_softmax(bsz * h * p, n, target),
                 parts=attention_parts(bsz, c, n, p, h, dtype, target, dot_precision))
    if not has_stats:
        plans["stats"] = attention_stats(bsz, c, n, dtype, target)
    return plans


def folded_bwd(x: torch.Tensor, g: torch.Tensor | None, gamma: torch.Tensor, attn: torch.Tensor,
               probs: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, dparts: torch.Tensor | None,
               dattn: torch.Tensor | None, num_heads: int, needs_dx: bool, chunk_mib: float,
               dot_precision: str = "tf32", head_reduce: str = "mean"):
    """Backward of the folded formulation from the forward's saved state (``g`` needed for dx only).

    ``dparts [B, P, C]``, ``dattn [B, P, N]`` (any float dtype, either may be None). Returns ``dg [h, P, C]``,
    ``dgamma`` (through the values only), ``dbeta [C]`` (fp32) and ``dx`` in ``x.dtype`` with the strides
    of ``x`` when ``x`` is dense (``torch.empty_like``), or None.
    """
    h, p = num_heads, attn.shape[1]
    if needs_dx and g is None:
        raise ValueError("folded_bwd needs g to compute dx")
    bsz, c, n = check_x(x, g, h, p)
    dev = x.device
    check("gamma", gamma, (c,), F32, dev, contiguous=True)
    check("attn", attn, (bsz, p, n), F32, dev, contiguous=True)
    if h > 1:
        check("probs", probs, (bsz, h, p, n), F32, dev, contiguous=True)
    check("mean", mean, (bsz, n), F32, dev, contiguous=True)
    check("rstd", rstd, (bsz, n), F32, dev, contiguous=True)
    if dparts is not None:
        check("dparts", dparts, (bsz, p, c), FLOAT_DTYPES, dev)
        dparts = dparts.contiguous()
    if dattn is not None:
        check("dattn", dattn, (bsz, p, n), FLOAT_DTYPES, dev)
        dattn = dattn.contiguous()
    target = targets.current(dev)
    rows = short_rows(n, target)
    has_dparts, has_dattn = dparts is not None, dattn is not None
    plan = make_plans(lambda: _bwd_plans(bsz, c, n, p, h, x.dtype, target, dot_precision, rows, needs_dx, has_dparts,
                                         has_dattn), "part attention", x, target, dot_precision)
    dg = torch.zeros(h, p, c, device=dev, dtype=torch.float32)
    if bsz == 0:
        zeros = torch.zeros(c, device=dev, dtype=torch.float32)
        return dg, zeros, zeros.clone(), torch.empty_like(x) if needs_dx else None
    probs = attn.unsqueeze(1) if h == 1 else probs
    xs = xstrides(x)
    da = dattn_operand(dattn, probs, head_reduce)
    ds = torch.empty(bsz, h, p, n, device=dev, dtype=torch.float32)
    if rows:
        dgamma_part, dbeta = _rows_ds(x, gamma, mean, rstd, probs, dparts, da, ds, plan["rows"], xs)
    else:
        dgamma_part, dbeta = None, _tiled_ds(x, gamma, mean, rstd, probs, dparts, da, ds, plan, xs)
    launch(_part_attention_bwd_dg_kernel, plan["dg"], X_ptr=x, Mean_ptr=mean, Rstd_ptr=rstd, DS_ptr=ds, DG_ptr=dg,
           B=bsz, C=c, N=n, P=p, H=h, **xs)
    if needs_dx or not rows:
        if dparts is None:
            dparts = torch.zeros(bsz, p, c, device=dev, dtype=x.dtype)
        if not rows:
            dgamma_part = torch.empty(bsz * plan["dxhat"].grid[1], c, device=dev, dtype=torch.float32)
        dxhat = torch.empty(bsz, c, n, device=dev, dtype=torch.float32) if needs_dx else dgamma_part
        launch(_part_attention_bwd_dxhat_kernel, plan["dxhat"], X_ptr=x, G_ptr=g if needs_dx else gamma,
               Gamma_ptr=gamma, Mean_ptr=mean, Rstd_ptr=rstd, Probs_ptr=probs, DS_ptr=ds, DParts_ptr=dparts,
               DGammaPart_ptr=dgamma_part, DXhat_ptr=dxhat, C=c, N=n, P=p, D=c // h, H=h, **xs)
    dx = None
    if needs_dx:
        # Same strides as x when x is dense (a [B, C, H, W] map, channels_last, token layout): the
        # caller views dx back into x's shape without a copy.
        dx = torch.empty_like(x)
        launch(_part_attention_bwd_dx_kernel, plan["dx"], X_ptr=x, Mean_ptr=mean, Rstd_ptr=rstd, DXhat_ptr=dxhat,
               DX_ptr=dx, C=c, N=n, **xs, stride_db=dx.stride(0), stride_dc=dx.stride(1), stride_dn=dx.stride(2))
    return dg, dgamma_part.sum(0), dbeta, dx


def _bwd_plans(bsz: int, c: int, n: int, p: int, h: int, dtype: torch.dtype, target, dot_precision: str, rows: bool,
               needs_dx: bool, has_dparts: bool, has_dattn: bool) -> dict:
    """The backward's plans: the short-row kernel (``short_rows``) or dP and the softmax backward; then dG,
    and dxhat (after the short-row kernel only for dx, without gamma's gradient) and dx."""
    out = dict(dg=attention_dg(bsz, c, n, p, h, dtype, target, dot_precision),
               dx=attention_dx(bsz, c, n, dtype, target))
    if rows:
        out["rows"] = attention_bwd_rows(bsz, c, n, p, h, dtype, target, dot_precision, has_dparts=has_dparts,
                                         has_dattn=has_dattn)
    else:
        out["dp"] = attention_dp(bsz, c, n, p, h, dtype, target, dot_precision)
        out["softmax"] = attention_softmax_bwd(bsz * h * p, n, target, has_dattn=has_dattn)
    if needs_dx or not rows:
        out["dxhat"] = attention_dxhat(bsz, c, n, p, h, dtype, target, dot_precision, needs_dx=needs_dx,
                                       dgamma=not rows)
    return out


def _rows_ds(x, gamma, mean, rstd, probs, dparts, da: DAttn, ds, plan, xs: dict):
    """dS into ``ds`` with the short-row kernel; returns gamma's partial sums ``[rows, C]`` and dbeta."""
    bsz, h, p, n = ds.shape
    c = x.shape[1]
    num_qb = plan.grid[0] // (bsz * h)
    # Every (sample, query block) row of the partial sums is written whole (each head its channels).
    alloc = torch.empty if dparts is not None else torch.zeros
    dgamma_part = alloc(bsz * num_qb if dparts is not None else 1, c, device=x.device, dtype=torch.float32)
    dbeta_part = torch.empty_like(dgamma_part) if dparts is not None else dgamma_part
    launch(_part_attention_bwd_rows_kernel, plan, X_ptr=x, Gamma_ptr=gamma, Mean_ptr=mean, Rstd_ptr=rstd,
           Probs_ptr=probs, DParts_ptr=dparts if dparts is not None else ds,
           DAttn_ptr=da.tensor, DS_ptr=ds, DGammaPart_ptr=dgamma_part, DBetaPart_ptr=dbeta_part, C=c, N=n, P=p,
           D=c // h, H=h, **xs, stride_dab=da.stride_b, stride_dah=da.stride_h, inv_h=da.scale)
    return dgamma_part, dbeta_part.sum(0)


def _tiled_ds(x, gamma, mean, rstd, probs, dparts, da: DAttn, ds, plan: dict, xs: dict):
    """dS into ``ds`` with the tiled kernels (dP, then the softmax backward in place); returns dbeta (gamma's
    partial sums come from the dxhat kernel)."""
    bsz, h, p, n = ds.shape
    c = x.shape[1]
    if dparts is None:
        ds.zero_()          # no gradient through the parts: dP comes from dattn alone
        dbeta = torch.zeros(c, device=x.device, dtype=torch.float32)
    else:
        launch(_part_attention_bwd_dp_kernel, plan["dp"], X_ptr=x, Gamma_ptr=gamma, Mean_ptr=mean, Rstd_ptr=rstd,
               DParts_ptr=dparts, DP_ptr=ds, C=c, N=n, P=p, D=c // h, H=h, **xs)
        dbeta = dparts.sum((0, 1), dtype=torch.float32)
    # The kernel reads row (sample r // HP, query r % P) of dattn: per-head rows are r itself (P = HP = h*P).
    rows_p = h * p if da.per_head else p
    launch(_part_attention_bwd_softmax_kernel, plan["softmax"], Probs_ptr=probs,
           DAttn_ptr=da.tensor, DS_ptr=ds, R=bsz * h * p, N=n, P=rows_p, HP=h * p, inv_h=da.scale)
    return dbeta
