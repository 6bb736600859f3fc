"""The fused C2F head with Triton kernels: the launchers of the op contract that ``c2f.torch_ops.c2f_head``
implements with torch ops (same functions, same signatures, same saved state).

docs/design.md, "The algebra" 8: the regression readout and the pooled mixed-view classifier are linear
in the part features, so ``[B, P, C]`` is never written. Per step, independent of B:

- forward: 3 kernels (token statistics, unless they come with x; the fused scores / softmax / readout /
  pooling coefficients; the pooled rows, done by the fused kernel's last query blocks with the plan flag
  ``head_fwd_one_pass``) and a few small torch ops (pooling matrix, partial sums,
  ``U @ wcg^T``, logits);
- backward: 3 kernels (pooled rows with their coefficient gradient, dS / dZ, the dG (+ dWrg) reduction;
  one more, dWrg, with several heads; two more, dxhat and dx, when x requires grad) and a few small
  torch ops (``drows``, ``dU = drows @ wcg``, ``coef = M P``, ``dwcg = drows^T U``, partial sums).

The kernels live in ``c2f_head_fwd.py`` and ``c2f_head_bwd.py``, their plans in ``plans_c2f_head.py``; the
token statistics, the dG reduction and the LayerNorm backward are the part-attention kernels, reused as
they are with their plans (``plans_part_attention.py``). Each launcher makes all its plans before it
allocates or launches anything.
"""
from __future__ import annotations

import torch

from .._math import inverse_permutation, mixed_views, mixed_views_bwd, pool_matrix, reduce_heads
from . import targets
from .c2f_head_bwd import _c2f_head_bwd_dwrg_kernel, _c2f_head_bwd_dxhat_kernel, _c2f_head_bwd_kernel
from .c2f_head_fwd import _c2f_head_fwd_kernel, _c2f_head_pool_kernel
from .common import (
    F32,
    DAttn,
    check,
    check_dims,
    check_perm,
    check_stats,
    check_x,
    dattn_operand,
    make_plans,
    token_stats,
    xstrides,
)
from .launch import FLOAT_DTYPES, launch
from .part_attention_bwd import _part_attention_bwd_dg_kernel, _part_attention_bwd_dx_kernel
from .part_attention_fwd import _part_attention_stats_kernel
from .plans_c2f_head import head_bwd, head_dwrg, head_dxhat, head_fwd, head_pool
from .plans_part_attention import attention_dg, attention_dx, attention_stats

__all__ = ["c2f_head_fwd", "c2f_head_bwd"]

OP = "the C2F head"


def _check_inputs(x, g, wrg, wcg, perm, mask):
    """Shapes, dtypes and layouts of the inputs both launchers take; returns (B, C, N, h, P, K)."""
    h, p, _ = check_dims("g", g, "[h, P, C]")
    bsz, c, n = check_x(x, g, h, p)
    dev = x.device
    check("wrg", wrg, (p, c), F32, dev, contiguous=True)
    classes, _ = check_dims("wcg", wcg, "[classes, C]")
    check("wcg", wcg, (classes, c), F32, dev, contiguous=True)
    check_perm(perm, bsz, dev)
    k, _, _ = check_dims("mask", mask, "[K, B, P]")
    check("mask", mask, (k, bsz, p), F32, dev)
    return bsz, c, n, h, p, k


def _pooled_rows(x, mean, rstd, coef, du, views, plan):
    """``U [B, 2K, C]`` from ``coef [B, h, 2K, N]``; with ``du`` also ``dcoef [B, h, 2K, N]``."""
    bsz, c, n = x.shape
    h = coef.shape[1]
    u = torch.empty(bsz, views, c, device=x.device, dtype=torch.float32)
    splits = plan.grid[1]
    dcoef_part = torch.empty(bsz, h, splits, views, n, device=x.device, dtype=torch.float32) if du is not None else u
    launch(_c2f_head_pool_kernel, plan,
           X_ptr=x, Mean_ptr=mean, Rstd_ptr=rstd, Coef_ptr=coef, U_ptr=u, DU_ptr=du if du is not None else u,
           DCoefPart_ptr=dcoef_part, C=c, N=n, D=c // h, H=h, V=views, **xstrides(x))
    return u, (dcoef_part.sum(2) if du is not None else None)


def c2f_head_fwd(x: torch.Tensor, g: torch.Tensor, wrg: torch.Tensor, wcg: torch.Tensor, perm: torch.Tensor,
                 mask: torch.Tensor, eps: float, chunk_mib: float, dot_precision: str = "tf32",
                 head_reduce: str = "mean", x_mean: torch.Tensor | None = None, x_var: torch.Tensor | None = None):
    """Forward of the fused head (``c2f.torch_ops.c2f_head.c2f_head_fwd`` has the contract).

    ``x [B, C, N]`` any strides, fp32/fp16/bf16, read in place; ``g [h, P, C]``, ``wrg [P, C]``,
    ``wcg [classes, C]`` fp32 contiguous; ``perm [B]`` int64, ``mask [K, B, P]`` fp32. Returns ``attn
    [B, P, N]``, ``pred [B, P]``, ``logits [K, B, classes]`` and the saved state ``probs [B, h, P, N]``
    (empty when h == 1), ``zhat [B, h, P, N]``, ``mean, rstd [B, N]``, all fp32. ``chunk_mib`` is the
    torch-op path's; the kernels keep no per-chunk temporaries. ``x_mean, x_var [B, N]`` fp32 (both or
    neither): the token statistics given with x; the statistics kernel does not run.
    """
    bsz, c, n, h, p, k = _check_inputs(x, g, wrg, wcg, perm, mask)
    dev, f32 = x.device, torch.float32
    has_stats = check_stats(x_mean, x_var, bsz, n, dev)
    target = targets.current(dev)
    views = 2 * k
    plan = make_plans(lambda: _fwd_plans(bsz, c, n, p, h, views, x.dtype, target, dot_precision, has_stats), OP, x,
                      target, dot_precision)
    attn = torch.empty(bsz, p, n, device=dev, dtype=f32)
    probs = torch.empty((bsz, h, p, n) if h > 1 else (0,), device=dev, dtype=f32)
    zhat = torch.empty(bsz, h, p, n, device=dev, dtype=f32)
    pred = torch.empty(bsz, p, device=dev, dtype=f32)
    mean, rstd = token_stats(x_mean, x_var, eps, bsz, n, dev)
    if bsz == 0:
        return attn, pred, torch.empty(k, 0, wcg.shape[0], device=dev, dtype=f32), probs, zhat, mean, rstd
    m = pool_matrix(mask, inverse_permutation(perm), f32)                              # [B, 2K, P]
    if not has_stats:
        launch(_part_attention_stats_kernel, plan["stats"], X_ptr=x, Mean_ptr=mean, Rstd_ptr=rstd, C=c, N=n,
               **xstrides(x), eps=float(eps))
    num_pb = plan["fwd"].grid[0] // (bsz * h)
    coef_part = torch.empty(bsz, h, num_pb, views, n, device=dev, dtype=f32)
    pred_heads = pred if h == 1 else torch.empty(bsz, h, p, device=dev, dtype=f32)
    one_pass = plan["fwd"].constexprs["POOL_IN_PASS"]
    # One pass: a counter per (sample, head) and the pooled rows come out of the forward kernel itself.
    counter = torch.zeros(bsz, h, device=dev, dtype=torch.int32) if one_pass else None
    u = torch.empty(bsz, views, c, device=dev, dtype=f32) if one_pass else None
    launch(_c2f_head_fwd_kernel, plan["fwd"],
           X_ptr=x, G_ptr=g, Wrg_ptr=wrg, M_ptr=m, Mean_ptr=mean, Rstd_ptr=rstd,
           Probs_ptr=attn if h == 1 else probs, Zhat_ptr=zhat, Pred_ptr=pred_heads, CoefPart_ptr=coef_part,
           Counter_ptr=counter if one_pass else pred_heads, U_ptr=u if one_pass else coef_part,
           C=c, N=n, P=p, D=c // h, H=h, V=views, **xstrides(x))
    if not one_pass:
        u, _ = _pooled_rows(x, mean, rstd, coef_part.sum(2), None, views, plan["pool"])
    rows = torch.matmul(u, wcg.T)                                                      # [B, 2K, classes]
    # Contiguous, as the op's fake says (mixed_views alone returns the [B, K] order transposed).
    logits = mixed_views(rows, perm, out=torch.empty(k, bsz, wcg.shape[0], device=dev, dtype=f32))
    if h > 1:
        reduce_heads(probs, head_reduce, 1, attn)
        torch.sum(pred_heads, 1, out=pred)
    return attn, pred, logits, probs, zhat, mean, rstd


def _fwd_plans(bsz: int, c: int, n: int, p: int, h: int, views: int, dtype: torch.dtype, target, dot_precision: str,
               has_stats: bool) -> dict:
    """The forward's plans: the token statistics (without ``has_stats``), the fused kernel, the pooled rows
    (unless the fused kernel pools them: the plan flag ``head_fwd_one_pass``)."""
    plans = dict(fwd=head_fwd(bsz, c, n, p, h, views, dtype, target, dot_precision))
    if not plans["fwd"].constexprs["POOL_IN_PASS"]:
        plans["pool"] = head_pool(bsz, c, n, h, views, dtype, target, dot_precision)
    if not has_stats:
        plans["stats"] = attention_stats(bsz, c, n, dtype, target)
    return plans


def c2f_head_bwd(x: torch.Tensor, g: torch.Tensor, wrg: torch.Tensor, wcg: torch.Tensor, perm: torch.Tensor,
                 mask: torch.Tensor, attn: torch.Tensor, probs: torch.Tensor, zhat: torch.Tensor, mean: torch.Tensor,
                 rstd: torch.Tensor, dattn: torch.Tensor | None, dpred: torch.Tensor | None,
                 dlogits: torch.Tensor | None, needs_dx: bool, chunk_mib: float, dot_precision: str = "tf32",
                 head_reduce: str = "mean"):
    """Backward of the fused head from its saved state. Returns ``dg [h, P, C]``, ``dwrg [P, C]``,
    ``dwcg [classes, C]`` (fp32) and ``dx [B, C, N]`` in ``x.dtype`` with the strides of ``x`` when ``x``
    is dense (``torch.empty_like``), or None. ``dattn [B, P, N]``, ``dpred [B, P]``, ``dlogits [K, B,
    classes]``: any float dtype, each may be None."""
    bsz, c, n, h, p, k = _check_inputs(x, g, wrg, wcg, perm, mask)
    dattn, dpred = _check_saved(x, wcg, attn, probs, zhat, mean, rstd, dattn, dpred, dlogits, h, p, k)
    dev, f32 = x.device, torch.float32
    classes = wcg.shape[0]
    target = targets.current(dev)
    # dS and dZ: with one head in one [B, 2, P, N] buffer, so one dG launch reduces both (dZ as a
    # second "head" whose queries are the regressor's rows).
    stacked = h == 1 and dpred is not None
    plan = make_plans(lambda: _bwd_plans(bsz, c, n, p, h, 2 * k, x.dtype, target, dot_precision, stacked, needs_dx,
                                         dattn is not None, dpred is not None, dlogits is not None),
                      OP, x, target, dot_precision)
    if bsz == 0:
        return (torch.zeros(h, p, c, device=dev, dtype=f32), torch.zeros(p, c, device=dev, dtype=f32),
                torch.zeros(classes, c, device=dev, dtype=f32), torch.empty_like(x) if needs_dx else None)
    probs = attn.unsqueeze(1) if h == 1 else probs
    m = coef = du = dcoef = None
    if dlogits is not None:
        m, coef, du, dcoef, dwcg = _pooled_grads(x, wcg, perm, mask, probs, mean, rstd, dlogits, plan["pool"])
    else:
        dwcg = torch.zeros(classes, c, device=dev, dtype=f32)
    da = dattn_operand(dattn, probs, head_reduce)
    ds, dz, grads = _score_grads(probs, zhat, m, da, dpred, dcoef, 2 * k, stacked, plan["bwd"])
    dg, dwrg = _weight_grads(x, mean, rstd, ds, dz, grads, dpred is not None, plan)
    dx = _input_grad(x, g, wrg, mean, rstd, ds, dz, du, coef, k, plan) if needs_dx else None
    return dg, dwrg, dwcg, dx


def _check_saved(x, wcg, attn, probs, zhat, mean, rstd, dattn, dpred, dlogits, h: int, p: int, k: int):
    """Checks the forward's saved state and the incoming gradients; returns ``dattn, dpred`` contiguous."""
    bsz, _, n = x.shape
    dev = x.device
    check("attn", attn, (bsz, p, n), F32, dev, contiguous=True)
    if h > 1:
        check("probs", probs, (bsz, h, p, n), F32, dev, contiguous=True)
    check("zhat", zhat, (bsz, h, p, n), F32, dev, contiguous=True)
    check("mean", mean, (bsz, n), F32, dev, contiguous=True)
    check("rstd", rstd, (bsz, n), F32, dev, contiguous=True)
    if dattn is not None:
        check("dattn", dattn, (bsz, p, n), FLOAT_DTYPES, dev)
        dattn = dattn.contiguous()
    if dpred is not None:
        check("dpred", dpred, (bsz, p), FLOAT_DTYPES, dev)
        dpred = dpred.contiguous()
    if dlogits is not None:
        check("dlogits", dlogits, (k, bsz, wcg.shape[0]), FLOAT_DTYPES, dev)
    return dattn, dpred


def _bwd_plans(bsz: int, c: int, n: int, p: int, h: int, views: int, dtype: torch.dtype, target, dot_precision: str,
               stacked: bool, needs_dx: bool, has_dattn: bool, has_dpred: bool, has_dlogits: bool) -> dict:
    """The backward's plans: dS / dZ and dG (with dZ stacked under dS for one head); the pooled rows with
    ``dlogits``, dWrg with ``dpred`` and several heads, dxhat and dx with ``needs_dx``."""
    plans = dict(bwd=head_bwd(bsz, c, n, p, h, views, dtype, target, dot_precision, has_dattn=has_dattn,
                              has_dpred=has_dpred, has_dcoef=has_dlogits),
                 dg=attention_dg(bsz, c, n, p, 2 if stacked else h, dtype, target, dot_precision))
    if has_dlogits:
        plans["pool"] = head_pool(bsz, c, n, h, views, dtype, target, dot_precision, has_du=True)
    if has_dpred and not stacked:
        plans["dwrg"] = head_dwrg(bsz, c, n, p, h, dtype, target, dot_precision)
    if needs_dx:
        plans["dxhat"] = head_dxhat(bsz, c, n, p, h, views, dtype, target, dot_precision, has_dpred=has_dpred,
                                    has_du=has_dlogits)
        plans["dx"] = attention_dx(bsz, c, n, dtype, target)
    return plans


def _pooled_grads(x, wcg, perm, mask, probs, mean, rstd, dlogits, plan):
    """Through the pooled classifier: ``M [B, 2K, P]``, ``coef = M P [B, h, 2K, N]``, ``dU = drows wcg
    [B, 2K, C]``, ``dcoef [B, h, 2K, N]`` and ``dwcg = drows^T U [classes, C]``."""
    f32 = torch.float32
    inv = inverse_permutation(perm)
    m = pool_matrix(mask, inv, f32)                                                    # [B, 2K, P]
    drows = mixed_views_bwd(dlogits, inv, f32).contiguous()                            # [B, 2K, classes]
    du = torch.matmul(drows, wcg)                                                      # [B, 2K, C]
    coef = torch.matmul(m.unsqueeze(1), probs)                                         # [B, h, 2K, N]
    u, dcoef = _pooled_rows(x, mean, rstd, coef, du, m.shape[1], plan)                 # m.shape[1] = 2K views
    dwcg = torch.mm(drows.view(-1, wcg.shape[0]).T, u.view(-1, x.shape[1]))
    return m, coef, du, dcoef, dwcg


def _score_grads(probs, zhat, m, da: DAttn, dpred, dcoef, views: int, stacked: bool, plan):
    """dS and dZ ``[B, h, P, N]`` (views of one ``[B, 2, P, N]`` buffer, also returned, when ``stacked``),
    dZ aliasing dS without ``dpred``; the kernel needs no pass over x."""
    bsz, h, p, n = zhat.shape
    dev, f32 = zhat.device, torch.float32
    grads = None
    if stacked:
        grads = torch.empty(bsz, 2, p, n, device=dev, dtype=f32)
        ds, dz = grads[:, :1], grads[:, 1:]
    else:
        ds = torch.empty(bsz, h, p, n, device=dev, dtype=f32)
        dz = torch.empty_like(ds) if dpred is not None else ds
    launch(_c2f_head_bwd_kernel, plan,
           Probs_ptr=probs, Zhat_ptr=zhat, M_ptr=m if m is not None else probs,
           DAttn_ptr=da.tensor, DPred_ptr=dpred if dpred is not None else probs,
           DCoef_ptr=dcoef if dcoef is not None else probs, DS_ptr=ds, DZ_ptr=dz, N=n, P=p, H=h,
           V=views, stride_tb=ds.stride(0), stride_dab=da.stride_b, stride_dah=da.stride_h, inv_h=da.scale)
    return ds, dz, grads


def _weight_grads(x, mean, rstd, ds, dz, grads, has_dpred: bool, plan: dict):
    """``dg [h, P, C]`` and ``dwrg [P, C]``: one dG launch over the stacked ``[dS; dZ]`` for one head (``grads``),
    else dG and, with ``dpred``, the dWrg kernel."""
    bsz, c, n = x.shape
    h, p = ds.shape[1], ds.shape[2]
    dev, f32, xs = x.device, torch.float32, xstrides(x)
    if grads is not None:
        dgw = torch.empty(2, p, c, device=dev, dtype=f32)
        launch(_part_attention_bwd_dg_kernel, plan["dg"],
               X_ptr=x, Mean_ptr=mean, Rstd_ptr=rstd, DS_ptr=grads, DG_ptr=dgw, B=bsz, C=c, N=n, P=p, H=2, **xs)
        return dgw[:1], dgw[1].clone()   # outputs of a custom op may not share storage
    dg = torch.empty(h, p, c, device=dev, dtype=f32)
    launch(_part_attention_bwd_dg_kernel, plan["dg"],
           X_ptr=x, Mean_ptr=mean, Rstd_ptr=rstd, DS_ptr=ds, DG_ptr=dg, B=bsz, C=c, N=n, P=p, H=h, **xs)
    dwrg = (torch.empty if has_dpred else torch.zeros)(p, c, device=dev, dtype=f32)
    if has_dpred:
        launch(_c2f_head_bwd_dwrg_kernel, plan["dwrg"],
               X_ptr=x, Mean_ptr=mean, Rstd_ptr=rstd, DZ_ptr=dz, DWrg_ptr=dwrg, B=bsz, C=c, N=n, P=p, D=c // h,
               stride_tb=ds.stride(0), **xs)
    return dg, dwrg


def _input_grad(x, g, wrg, mean, rstd, ds, dz, du, coef, k: int, plan: dict):
    """dx in ``x.dtype``, with the strides of ``x`` when ``x`` is dense: dxhat from the scores, the readout
    and (with ``du``) the pooled rows, then the LayerNorm backward."""
    bsz, c, n = x.shape
    h, p = g.shape[:2]
    dxhat = torch.empty(bsz, c, n, device=x.device, dtype=torch.float32)
    launch(_c2f_head_bwd_dxhat_kernel, plan["dxhat"],
           G_ptr=g, Wrg_ptr=wrg, DS_ptr=ds, DZ_ptr=dz, DU_ptr=du if du is not None else dxhat,
           Coef_ptr=coef if coef is not None else dxhat, DXhat_ptr=dxhat, C=c, N=n, P=p, D=c // h, H=h,
           V=2 * k, stride_tb=ds.stride(0))
    # Same strides as x when x is dense: the caller views dx back into x's shape without a copy.
    dx = torch.empty_like(x)
    launch(_part_attention_bwd_dx_kernel, plan["dx"],
           X_ptr=x, Mean_ptr=mean, Rstd_ptr=rstd, DXhat_ptr=dxhat, DX_ptr=dx, C=c, N=n, **xstrides(x),
           stride_db=dx.stride(0), stride_dc=dx.stride(1), stride_dn=dx.stride(2))
    return dx
