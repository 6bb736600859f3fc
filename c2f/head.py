"""The fused C2F head: part attention, attribute regression, part mixup and the fine classifier.

DESIGN.md item 7: the regression readout and the pooled (mixed) classifier are linear in the part
features, so the step never forms them. With ``xhat = (X - mean) * rstd`` (``[C, N]`` per sample,
one at a time), ``G = scale * Q Wk * gamma``, ``Wrg = Wr * gamma`` and ``Wcg = Wc * gamma``:

    P_j       = softmax(G_j xhat)                                  [h, P, N]  (the attention maps)
    Zhat_j    = Wrg_j xhat_j                                       [h, P, N]
    pred      = sum_{j,n} P_j * Zhat_j  + <Wr, beta> + br          [P]
    coef      = M P_j / P,  M = [mask[:, b]; 1 - mask[:, perm^-1 b]]  [h, 2K, N]
    U         = coef_j xhat_jᵀ                                     [2K, C]
    logits   += U Wcgᵀ  scattered to (k, b) and (k, perm^-1 b),  + Wc beta + bc

Memory scales with B·P·N (the saved P and Zhat), not B·P·C, and the K mixed views cost [2K, C]
per sample plus [K, B, classes]: nothing of size [K, B, P, C] or [B, P, C] exists.

``materialize_parts=True`` instead forms the part features with the fused attention, reads the
attributes from them, then mixes them in place with ``part_mixup_`` (one view) or pools the views
with ``part_mixup_pool``; the readout saves nothing of the parts and recomputes them in backward.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import reference
from ._validate import check_float, check_same_device, describe, feature_map_as_channels
from .attention import _centred_stats, _compute_dtype, _softmax_, part_attention
from .reference import C2FOutput


def _check_pairing(perm: torch.Tensor, mask: torch.Tensor, b: int, p: int) -> torch.Tensor:
    """Validates perm and mask ``[K, B, P]``; returns the inverse permutation."""
    if perm.dtype != torch.long or perm.shape != (b,):
        raise ValueError(f"perm must be an int64 tensor of shape ({b},), got {describe(perm)}")
    if mask.dim() != 3 or tuple(mask.shape[1:]) != (b, p):
        raise ValueError(f"mask must be [K, B, P] or [B, P] with B={b}, P={p}, got {describe(mask)}")
    if not torch.equal(torch.sort(perm).values, torch.arange(b, device=perm.device)):
        raise ValueError("perm must be a permutation of 0..B-1")
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(b, device=perm.device)
    return inv


class _C2FCore(torch.autograd.Function):
    """attn [B, P, N], pred_raw [B, P] and logits_raw [K, B, classes] (or [B, classes]) from x.

    ``pred_raw`` and ``logits_raw`` lack the constant terms (beta and the biases), which the module
    adds with ordinary autograd.
    """

    @staticmethod
    def forward(ctx, x, g, wrg, wcg, k_bias, mask, inv, eps):
        b_total, c, n = x.shape
        h, p, _ = g.shape
        d = c // h
        dt = g.dtype
        k_views = 1 if mask is None else mask.shape[0]
        probs = torch.empty(b_total, h, p, n, dtype=dt, device=x.device)
        zhat = torch.empty_like(probs)
        mean = torch.empty(b_total, n, dtype=dt, device=x.device)
        rstd = torch.empty_like(mean)
        pred = torch.empty(b_total, p, dtype=dt, device=x.device)
        logits = torch.zeros(k_views, b_total, wcg.shape[0], dtype=dt, device=x.device)
        wrg_h = wrg.view(p, h, d).transpose(0, 1)                                 # [h, P, d]
        for b in range(b_total):
            xc, mean[b], rstd[b] = _centred_stats(x[b], eps, dt)
            xhat = xc.mul_(rstd[b]).view(h, d, n)
            pb = _softmax_(torch.matmul(g, xhat.view(c, n).expand(h, c, n), out=probs[b]))
            torch.bmm(wrg_h, xhat, out=zhat[b])
            pred[b] = (pb * zhat[b]).sum((0, 2))
            coef = _coefficients(pb, mask, b, inv)                                # [h, R, N]
            u = torch.bmm(coef, xhat.transpose(1, 2)).transpose(0, 1).reshape(-1, c)   # [R, C]
            _scatter_logits(logits, u @ wcg.T, b, inv, k_views)
        ctx.save_for_backward(x, g, wrg, wcg, mask, inv, probs, zhat, mean, rstd)
        ctx.bias_like = None if k_bias is None else k_bias
        attn = probs[:, 0] if h == 1 else probs.mean(1)
        return attn, pred, logits if mask is not None else logits[0]

    @staticmethod
    def backward(ctx, dattn, dpred, dlogits):
        x, g, wrg, wcg, mask, inv, probs, zhat, mean, rstd = ctx.saved_tensors
        b_total, c, n = x.shape
        h, p, _ = g.shape
        d = c // h
        dt = g.dtype
        needs_dx = ctx.needs_input_grad[0]
        k_views = 1 if mask is None else mask.shape[0]
        if dlogits is not None and mask is None:
            dlogits = dlogits.unsqueeze(0)
        dg = torch.zeros_like(g)
        dwrg = torch.zeros_like(wrg)
        dwcg = torch.zeros_like(wcg)
        dx = torch.empty_like(x) if needs_dx else None
        wrg_h = wrg.view(p, h, d).transpose(0, 1)
        dwrg_h = dwrg.view(p, h, d).transpose(0, 1)
        for b in range(b_total):
            xhat = torch.sub(x[b], mean[b]).mul_(rstd[b]).view(h, d, n)
            pb = probs[b]
            dp = torch.zeros_like(pb)
            dxhat = torch.zeros(h, d, n, dtype=dt, device=x.device) if needs_dx else None
            if dattn is not None:
                dp.add_(dattn[b].to(dt), alpha=1.0 / h)
            if dpred is not None:
                dpb = dpred[b].to(dt)[None, :, None]
                dp.addcmul_(zhat[b], dpb)
                dz = pb * dpb                                                      # dZhat [h, P, N]
                dwrg_h.baddbmm_(dz, xhat.transpose(1, 2))
                if needs_dx:
                    dxhat.baddbmm_(wrg_h.transpose(1, 2), dz)
            if dlogits is not None:
                coef = _coefficients(pb, mask, b, inv)                            # [h, R, N]
                du_rows = _gather_logit_grads(dlogits, b, inv, k_views).to(dt)     # [R, classes]
                u = torch.bmm(coef, xhat.transpose(1, 2)).transpose(0, 1).reshape(-1, c)
                dwcg.addmm_(du_rows.T, u)
                du = (du_rows @ wcg).view(-1, h, d).transpose(0, 1)               # [h, R, d]
                dcoef = torch.bmm(du, xhat)                                        # [h, R, N]
                dp.add_(_coefficient_grad(dcoef, mask, b, inv, p))
                if needs_dx:
                    dxhat.baddbmm_(du.transpose(1, 2), coef)
            ds = dp.sub_((pb * dp).sum(-1, keepdim=True)).mul_(pb)
            dg.baddbmm_(ds, xhat.view(c, n).T.expand(h, n, c))
            if needs_dx:
                dxhat = dxhat.view(c, n).addmm_(g.flatten(0, 1).T, ds.view(h * p, n))
                xh = xhat.view(c, n)
                dxb = dxhat - dxhat.mean(0) - xh * (dxhat * xh).mean(0)
                dx[b] = dxb.mul_(rstd[b])
        # The key bias adds a per-query constant to the scores, which the softmax cancels exactly.
        dbias = torch.zeros_like(ctx.bias_like) if ctx.needs_input_grad[4] else None
        return dx, dg, dwrg, dwcg, dbias, None, None, None


def _coefficients(pb: torch.Tensor, mask: Optional[torch.Tensor], b: int, inv: Optional[torch.Tensor]):
    """Rows that pool sample b's map: ``[h, R, N]`` with R = 1 (no mask) or 2K (own, then partner's)."""
    h, p, n = pb.shape
    if mask is None:
        return pb.mean(1, keepdim=True)
    rows = torch.cat([mask[:, b], 1 - mask[:, inv[b]]]).to(pb.dtype)               # [2K, P]
    return torch.matmul(rows, pb).div_(p)


def _coefficient_grad(dcoef: torch.Tensor, mask: Optional[torch.Tensor], b: int, inv: Optional[torch.Tensor], p: int):
    """Gradient of ``_coefficients`` w.r.t. the probabilities: ``[h, P, N]``."""
    if mask is None:
        return dcoef.expand(-1, p, -1) / p
    rows = torch.cat([mask[:, b], 1 - mask[:, inv[b]]]).to(dcoef.dtype)             # [2K, P]
    return torch.matmul(rows.T, dcoef).div_(p)


def _scatter_logits(logits, contrib, b, inv, k_views):
    """Adds sample b's pooled contributions: rows 0..K-1 to (k, b), rows K..2K-1 to (k, perm^-1 b)."""
    if inv is None:
        logits[0, b] += contrib[0]
        return
    logits[:, b] += contrib[:k_views]
    logits[:, inv[b]] += contrib[k_views:]


def _gather_logit_grads(dlogits, b, inv, k_views):
    if inv is None:
        return dlogits[0, b][None]
    return torch.cat([dlogits[:, b], dlogits[:, inv[b]]])


class _RecomputedReadout(torch.autograd.Function):
    """``pred[b, p] = <parts[b, p], weight[p]>`` saving nothing of ``parts``.

    The part features are mixed in place right after this readout, so its backward recomputes them
    (``recompute()``, under no_grad, from the frozen inputs and the unchanged parameters).
    """

    @staticmethod
    def forward(ctx, parts, weight, recompute):
        ctx.recompute = recompute
        ctx.save_for_backward(weight)
        return torch.einsum("bpc,pc->bp", parts, weight.to(parts.dtype))

    @staticmethod
    def backward(ctx, dpred):
        (weight,) = ctx.saved_tensors
        dparts = dweight = None
        if ctx.needs_input_grad[0]:
            dparts = dpred[:, :, None] * weight.to(dpred.dtype)
        if ctx.needs_input_grad[1]:
            with torch.no_grad():
                parts = ctx.recompute()
            dweight = torch.einsum("bp,bpc->pc", dpred.to(parts.dtype), parts).to(weight.dtype)
        return dparts, dweight, None


class C2FHead(reference.C2FHead):
    """The fused C2F head: same constructor, submodules and ``state_dict`` as ``c2f.reference.C2FHead``.

    ``forward(x, perm=None, mask=None)`` returns ``C2FOutput(attr_pred [B, P], logits, attn [B, P, N])``;
    logits are ``[B, classes]`` without a mask and ``[K, B, classes]`` with a ``[K, B, P]`` mask.
    ``materialize_parts`` picks the path (module docstring); ``backend`` applies to the kernels of
    the materialised path (the fused path is GEMMs and runs as torch ops everywhere).
    """

    def __init__(self, dim: int = 2048, num_parts: int = 312, num_classes: int = 200, num_heads: int = 1,
                 qkv_bias: bool = False, qk_scale: Optional[float] = None, eps: float = 1e-5,
                 materialize_parts: bool = False, backend: str = "auto"):
        super().__init__(dim, num_parts, num_classes, num_heads, qkv_bias, qk_scale, eps)
        if backend not in ("auto", "triton", "torch"):
            raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
        self.materialize_parts = materialize_parts
        self.backend = backend

    def forward(self, x: torch.Tensor, perm: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None) -> C2FOutput:
        att = self.attention
        xv = feature_map_as_channels(x, att.dim)
        b, _, n = xv.shape
        p = att.num_parts
        single_view = mask is not None and mask.dim() == 2
        if mask is not None:
            check_float("mask", mask)
            if perm is None:
                raise ValueError("perm is required when mask is given")
            mask = mask.unsqueeze(0) if single_view else mask
            check_same_device(x=x, perm=perm, mask=mask)
        if self.materialize_parts:
            out = self._forward_materialized(x, perm, mask)
        else:
            inv = _check_pairing(perm, mask, b, p) if mask is not None else None
            out = self._forward_fused(xv, mask, inv)
        if single_view:
            out = C2FOutput(out.attr_pred, out.logits[0], out.attn)
        return out

    def _forward_fused(self, xv, mask, inv) -> C2FOutput:
        att = self.attention
        h, c, p = att.num_heads, att.dim, att.num_parts
        cdt = _compute_dtype(xv)
        gamma, beta = att.norm.weight.to(cdt), att.norm.bias.to(cdt)
        qh = att.queries.to(cdt).view(p, h, c // h).transpose(0, 1)
        g = torch.bmm(qh, att.k.weight.to(cdt).view(h, c // h, c)) * (att.scale * gamma)
        wr, wc = self.regressor.weight.to(cdt), self.classifier.weight.to(cdt)
        if xv.shape[0] == 0:
            k_shape = () if mask is None else (mask.shape[0],)
            return C2FOutput(xv.new_empty(0, p), xv.new_empty(*k_shape, 0, wc.shape[0]), xv.new_empty(0, p, xv.shape[2]))
        attn, pred_raw, logits_raw = _C2FCore.apply(xv, g, wr * gamma, wc * gamma, att.k.bias,
                                                    None if mask is None else mask.to(cdt), inv, att.eps)
        attr_pred = pred_raw + (wr * beta).sum(-1) + self.regressor.bias
        logits = logits_raw + F.linear(beta, wc, self.classifier.bias.to(cdt))
        return C2FOutput(attr_pred.to(xv.dtype), logits.to(xv.dtype), attn.to(xv.dtype))

    def _forward_materialized(self, x, perm, mask) -> C2FOutput:
        from .mixup import part_mixup_, part_mixup_pool

        att = self.attention

        def attend():
            return part_attention(x, att.queries, att.k.weight, att.norm.weight, att.norm.bias, att.num_heads,
                                  att.scale, att.eps, backend=self.backend, k_bias=att.k.bias)

        parts, attn = attend()
        attr_pred = _RecomputedReadout.apply(parts, self.regressor.weight, lambda: attend()[0])
        attr_pred = attr_pred + self.regressor.bias
        if mask is None:
            pooled = parts.mean(1)
        elif mask.shape[0] == 1:
            pooled = part_mixup_(parts, perm, mask[0], backend=self.backend).mean(1)[None]
        else:
            pooled = part_mixup_pool(parts, perm, mask, backend=self.backend)
        return C2FOutput(attr_pred, self.classifier(pooled), attn)
