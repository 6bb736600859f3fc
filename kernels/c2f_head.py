"""The fused C2F head with Triton kernels: the launchers of the op contract that ``c2f.torch_ops.c2f_head``
implements with torch ops (same functions, same signatures, same saved state).

docs/design.md, "The algebra" 8: the regression readout and the pooled mixed-view classifier are linear
in the part features, so ``[B, P, C]`` is never written. Per step, independent of B:

- forward: 3 kernels (token statistics, the fused scores / softmax / readout / pooling coefficients,
  the pooled rows) and a few small torch ops (pooling matrix, partial sums, ``U @ wcg^T``, logits);
- backward: 3 kernels (pooled rows with their coefficient gradient, dS / dZ, the dG (+ dWrg) reduction;
  one more, dWrg, with several heads; two more, dxhat and dx, when x requires grad) and a few small
  torch ops (``drows``, ``dU = drows @ wcg``, ``coef = M P``, ``dwcg = drows^T U``, partial sums).

The kernels live in ``c2f_head_fwd.py`` and ``c2f_head_bwd.py``, their plans in ``plans_c2f_head.py``; the
token statistics, the dG reduction and the LayerNorm backward are the part-attention kernels, reused as
they are. Each launcher makes all its plans before it allocates or launches anything.
"""
from __future__ import annotations

import torch

from .._math import inverse_permutation
from . import plans, plans_c2f_head, targets
from .c2f_head_bwd import _c2f_head_bwd_dwrg_kernel, _c2f_head_bwd_dxhat_kernel, _c2f_head_bwd_kernel
from .c2f_head_fwd import _c2f_head_fwd_kernel, _c2f_head_pool_kernel
from .launch import FLOAT_DTYPES, launch
from .part_attention import _check_x, check, describe, make_plans
from .part_attention_bwd import _part_attention_bwd_dg_kernel, _part_attention_bwd_dx_kernel
from .part_attention_fwd import _part_attention_stats_kernel

__all__ = ["c2f_head_fwd", "c2f_head_bwd"]

F32 = (torch.float32,)


def _check_inputs(x, g, wrg, wcg, perm, mask):
    """Shapes, dtypes and layouts of the inputs both launchers take; returns (B, C, N, h, P, K)."""
    if not isinstance(g, torch.Tensor) or g.dim() != 3:
        raise ValueError(f"g must be a [h, P, C] tensor, got {describe(g) if isinstance(g, torch.Tensor) else g!r}")
    h, p = g.shape[:2]
    bsz, c, n = _check_x(x, g, h, p)
    dev = x.device
    check("wrg", wrg, (p, c), F32, dev, contiguous=True)
    if not isinstance(wcg, torch.Tensor) or wcg.dim() != 2:
        raise ValueError(f"wcg must be a [classes, C] tensor, got {describe(wcg) if isinstance(wcg, torch.Tensor) else wcg!r}")
    check("wcg", wcg, (wcg.shape[0], c), F32, dev, contiguous=True)
    check("perm", perm, (bsz,), (torch.int64,), dev)
    if not isinstance(mask, torch.Tensor) or mask.dim() != 3:
        raise ValueError(f"mask must be a [K, B, P] tensor, got "
                         f"{describe(mask) if isinstance(mask, torch.Tensor) else mask!r}")
    check("mask", mask, (mask.shape[0], bsz, p), F32, dev)
    return bsz, c, n, h, p, mask.shape[0]


def _pool_matrix(mask: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    """``M [B, 2K, P]`` fp32: sample b's own views weigh its parts by ``mask[:, b]``, the views of the
    sample it is paired into by ``1 - mask[:, inv[b]]`` (``inv = perm^-1``); divided by P (the mean over
    parts)."""
    return torch.cat([mask, 1 - mask[:, inv]]).transpose(0, 1).div(mask.shape[-1]).contiguous()


def _xstrides(x: torch.Tensor) -> dict:
    return dict(stride_xb=x.stride(0), stride_xc=x.stride(1), stride_xn=x.stride(2))


def _pooled_rows(x, mean, rstd, coef, du, views, plan):
    """``U [B, 2K, C]`` from ``coef [B, h, 2K, N]``; with ``du`` also ``dcoef [B, h, 2K, N]``."""
    bsz, c, n = x.shape
    h = coef.shape[1]
    u = torch.empty(bsz, views, c, device=x.device, dtype=torch.float32)
    splits = plan.grid[1]
    dcoef_part = torch.empty(bsz, h, splits, views, n, device=x.device, dtype=torch.float32) if du is not None else u
    launch(_c2f_head_pool_kernel, plan,
           X_ptr=x, Mean_ptr=mean, Rstd_ptr=rstd, Coef_ptr=coef, U_ptr=u, DU_ptr=du if du is not None else u,
           DCoefPart_ptr=dcoef_part, C=c, N=n, D=c // h, H=h, V=views, **_xstrides(x))
    return u, (dcoef_part.sum(2) if du is not None else None)


def c2f_head_fwd(x: torch.Tensor, g: torch.Tensor, wrg: torch.Tensor, wcg: torch.Tensor, perm: torch.Tensor,
                 mask: torch.Tensor, eps: float, chunk_mib: float, dot_precision: str = "tf32"):
    """Forward of the fused head (``c2f.torch_ops.c2f_head.c2f_head_fwd`` has the contract).

    ``x [B, C, N]`` any strides, fp32/fp16/bf16, read in place; ``g [h, P, C]``, ``wrg [P, C]``,
    ``wcg [classes, C]`` fp32 contiguous; ``perm [B]`` int64, ``mask [K, B, P]`` fp32. Returns ``attn
    [B, P, N]``, ``pred [B, P]``, ``logits [K, B, classes]`` and the saved state ``probs [B, h, P, N]``
    (empty when h == 1), ``zhat [B, h, P, N]``, ``mean, rstd [B, N]``, all fp32. ``chunk_mib`` is the
    torch-op path's; the kernels keep no per-chunk temporaries.
    """
    bsz, c, n, h, p, k = _check_inputs(x, g, wrg, wcg, perm, mask)
    dev, f32 = x.device, torch.float32
    target = targets.current(dev)
    views = 2 * k
    plan = make_plans(lambda: dict(
        stats=plans.attention_stats(bsz, c, n, x.dtype, target),
        fwd=plans_c2f_head.head_fwd(bsz, c, n, p, h, views, x.dtype, target, dot_precision),
        pool=plans_c2f_head.head_pool(bsz, c, n, h, views, x.dtype, target, dot_precision)), x, target, dot_precision,
        "the C2F head")
    attn = torch.empty(bsz, p, n, device=dev, dtype=f32)
    probs = torch.empty((bsz, h, p, n) if h > 1 else (0,), device=dev, dtype=f32)
    zhat = torch.empty(bsz, h, p, n, device=dev, dtype=f32)
    pred = torch.empty(bsz, p, device=dev, dtype=f32)
    mean = torch.empty(bsz, n, device=dev, dtype=f32)
    rstd = torch.empty_like(mean)
    if bsz == 0:
        return attn, pred, torch.empty(k, 0, wcg.shape[0], device=dev, dtype=f32), probs, zhat, mean, rstd
    m = _pool_matrix(mask, inverse_permutation(perm))
    launch(_part_attention_stats_kernel, plan["stats"], X_ptr=x, Mean_ptr=mean, Rstd_ptr=rstd, C=c, N=n,
           **_xstrides(x), eps=float(eps))
    num_pb = plan["fwd"].grid[0] // (bsz * h)
    coef_part = torch.empty(bsz, h, num_pb, views, n, device=dev, dtype=f32)
    pred_heads = pred if h == 1 else torch.empty(bsz, h, p, device=dev, dtype=f32)
    launch(_c2f_head_fwd_kernel, plan["fwd"],
           X_ptr=x, G_ptr=g, Wrg_ptr=wrg, M_ptr=m, Mean_ptr=mean, Rstd_ptr=rstd,
           Probs_ptr=attn if h == 1 else probs, Zhat_ptr=zhat, Pred_ptr=pred_heads, CoefPart_ptr=coef_part,
           C=c, N=n, P=p, D=c // h, H=h, V=views, **_xstrides(x))
    u, _ = _pooled_rows(x, mean, rstd, coef_part.sum(2), None, views, plan["pool"])
    rows = torch.matmul(u, wcg.T)                                                      # [B, 2K, classes]
    # Sample b's own views are its logits; the other K rows go to the views it was mixed into.
    logits = rows[:, :k].transpose(0, 1) + rows[perm, k:].transpose(0, 1)
    if h > 1:
        torch.mean(probs, 1, out=attn)
        torch.sum(pred_heads, 1, out=pred)
    return attn, pred, logits, probs, zhat, mean, rstd


def c2f_head_bwd(x: torch.Tensor, g: torch.Tensor, wrg: torch.Tensor, wcg: torch.Tensor, perm: torch.Tensor,
                 mask: torch.Tensor, attn: torch.Tensor, probs: torch.Tensor, zhat: torch.Tensor, mean: torch.Tensor,
                 rstd: torch.Tensor, dattn: torch.Tensor | None, dpred: torch.Tensor | None,
                 dlogits: torch.Tensor | None, needs_dx: bool, chunk_mib: float, dot_precision: str = "tf32"):
    """Backward of the fused head from its saved state. Returns ``dg [h, P, C]``, ``dwrg [P, C]``,
    ``dwcg [classes, C]`` (fp32) and ``dx [B, C, N]`` in ``x.dtype`` with the strides of ``x`` when ``x``
    is dense (``torch.empty_like``), or None. ``dattn [B, P, N]``, ``dpred [B, P]``, ``dlogits [K, B,
    classes]``: any float dtype, each may be None."""
    bsz, c, n, h, p, k = _check_inputs(x, g, wrg, wcg, perm, mask)
    dev, f32 = x.device, torch.float32
    classes = wcg.shape[0]
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
        check("dlogits", dlogits, (k, bsz, classes), FLOAT_DTYPES, dev)
    target = targets.current(dev)
    views = 2 * k
    # dS and dZ: with one head in one [B, 2, P, N] buffer, so one dG launch reduces both (dZ as a
    # second "head" whose queries are the regressor's rows).
    stacked = h == 1 and dpred is not None

    def make():
        made = dict(bwd=plans_c2f_head.head_bwd(bsz, c, n, p, h, views, x.dtype, target, dot_precision,
                                            has_dattn=dattn is not None, has_dpred=dpred is not None,
                                            has_dcoef=dlogits is not None),
                    dg=plans.attention_dg(bsz, c, n, p, 2 if stacked else h, x.dtype, target, dot_precision))
        if dlogits is not None:
            made["pool"] = plans_c2f_head.head_pool(bsz, c, n, h, views, x.dtype, target, dot_precision, has_du=True)
        if dpred is not None and not stacked:
            made["dwrg"] = plans_c2f_head.head_dwrg(bsz, c, n, p, h, x.dtype, target, dot_precision)
        if needs_dx:
            made["dxhat"] = plans_c2f_head.head_dxhat(bsz, c, n, p, h, views, x.dtype, target, dot_precision,
                                                  has_dpred=dpred is not None, has_du=dlogits is not None)
            made["dx"] = plans.attention_dx(bsz, c, n, x.dtype, target)
        return made
    plan = make_plans(make, x, target, dot_precision, "the C2F head")
    if bsz == 0:
        return (torch.zeros(h, p, c, device=dev, dtype=f32), torch.zeros(p, c, device=dev, dtype=f32),
                torch.zeros(classes, c, device=dev, dtype=f32), torch.empty_like(x) if needs_dx else None)
    probs = attn.unsqueeze(1) if h == 1 else probs
    xs = _xstrides(x)
    m = coef = du = dcoef = None
    if dlogits is not None:
        inv = inverse_permutation(perm)
        m = _pool_matrix(mask, inv)
        # Rows of sample b: its own views, then the views it was mixed into (logits[k, perm^-1 b]).
        drows = torch.cat([dlogits, dlogits[:, inv]]).transpose(0, 1).to(f32).contiguous()  # [B, 2K, classes]
        du = torch.matmul(drows, wcg)                                                  # [B, 2K, C]
        coef = torch.matmul(m.unsqueeze(1), probs)                                     # [B, h, 2K, N]
        u, dcoef = _pooled_rows(x, mean, rstd, coef, du, views, plan["pool"])
        dwcg = torch.mm(drows.view(-1, classes).T, u.view(-1, c))
    else:
        dwcg = torch.zeros(classes, c, device=dev, dtype=f32)
    if stacked:
        grads = torch.empty(bsz, 2, p, n, device=dev, dtype=f32)
        ds, dz = grads[:, :1], grads[:, 1:]
    else:
        ds = torch.empty(bsz, h, p, n, device=dev, dtype=f32)
        dz = torch.empty_like(ds) if dpred is not None else ds
    stride_tb = ds.stride(0)
    launch(_c2f_head_bwd_kernel, plan["bwd"],
           Probs_ptr=probs, Zhat_ptr=zhat, M_ptr=m if m is not None else probs, DAttn_ptr=dattn if dattn is not None else probs,
           DPred_ptr=dpred if dpred is not None else probs, DCoef_ptr=dcoef if dcoef is not None else probs,
           DS_ptr=ds, DZ_ptr=dz, N=n, P=p, H=h, V=views, stride_tb=stride_tb, inv_h=1.0 / h)
    if stacked:
        dgw = torch.empty(2, p, c, device=dev, dtype=f32)
        launch(_part_attention_bwd_dg_kernel, plan["dg"],
               X_ptr=x, Mean_ptr=mean, Rstd_ptr=rstd, DS_ptr=grads, DG_ptr=dgw, B=bsz, C=c, N=n, P=p, H=2, **xs)
        dg, dwrg = dgw[:1], dgw[1].clone()   # outputs of a custom op may not share storage
    else:
        dg = torch.empty(h, p, c, device=dev, dtype=f32)
        launch(_part_attention_bwd_dg_kernel, plan["dg"],
               X_ptr=x, Mean_ptr=mean, Rstd_ptr=rstd, DS_ptr=ds, DG_ptr=dg, B=bsz, C=c, N=n, P=p, H=h, **xs)
        dwrg = (torch.empty if dpred is not None else torch.zeros)(p, c, device=dev, dtype=f32)
        if dpred is not None:
            launch(_c2f_head_bwd_dwrg_kernel, plan["dwrg"],
                   X_ptr=x, Mean_ptr=mean, Rstd_ptr=rstd, DZ_ptr=dz, DWrg_ptr=dwrg, B=bsz, C=c, N=n, P=p, D=c // h,
                   stride_tb=stride_tb, **xs)
    dx = None
    if needs_dx:
        dxhat = torch.empty(bsz, c, n, device=dev, dtype=f32)
        launch(_c2f_head_bwd_dxhat_kernel, plan["dxhat"],
               G_ptr=g, Wrg_ptr=wrg, DS_ptr=ds, DZ_ptr=dz, DU_ptr=du if du is not None else dxhat,
               Coef_ptr=coef if coef is not None else dxhat, DXhat_ptr=dxhat, C=c, N=n, P=p, D=c // h, H=h,
               V=views, stride_tb=stride_tb)
        # Same strides as x when x is dense: the caller views dx back into x's shape without a copy.
        dx = torch.empty_like(x)
        launch(_part_attention_bwd_dx_kernel, plan["dx"],
               X_ptr=x, Mean_ptr=mean, Rstd_ptr=rstd, DXhat_ptr=dxhat, DX_ptr=dx, C=c, N=n, **xs,
               stride_db=dx.stride(0), stride_dc=dx.stride(1), stride_dn=dx.stride(2))
    return dg, dwrg, dwcg, dx
