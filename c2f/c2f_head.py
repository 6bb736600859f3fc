"""The fused C2F head: part attention, attribute regression, part mixup and the fine classifier.

docs/design.md, "The algebra" 7: the regression readout and the pooled (mixed) classifier are linear
in the part features, so the step never forms them. With ``xhat = (X - mean) * rstd``,
``G = scale * Q Wk * gamma``, ``Wrg = Wr * gamma`` and ``Wcg = Wc * gamma``::

    P_j       = softmax(G_j xhat)                                  [h, P, N]  (the attention maps)
    Zhat_j    = Wrg_j xhat_j                                       [h, P, N]
    pred      = sum_{j,n} P_j * Zhat_j  + <Wr, beta> + br          [P]
    coef      = M P_j / P,  M = [mask[:, b]; 1 - mask[:, perm^-1 b]]  [h, 2K, N]
    U         = coef_j xhat_jᵀ                                     [2K, C]
    logits   += U Wcgᵀ  scattered to (k, b) and (k, perm^-1 b),  + Wc beta + bc

Memory scales with B·P·N (the saved P and Zhat), not B·P·C, and the K mixed views cost [2K, C]
per sample plus [K, B, classes]: nothing of size [K, B, P, C] or [B, P, C] exists. The op is
``torch.ops.c2f.c2f_head`` (``c2f.ops.c2f_head``); its two implementations are the Triton kernels
(``c2f.kernels.c2f_head``) and batched torch ops (``c2f.torch_ops.c2f_head``), picked by ``backend``.

``materialize_parts=True`` instead forms the part features with the fused attention, reads the
attributes from them, then mixes them in place with ``part_mixup_`` (one view) or pools the views
with ``part_mixup_pool``; the readout saves nothing of the parts and recomputes them in backward.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from . import reference
from ._backend import resolve_backend
from ._math import AMP_PRECISIONS, DEFAULT_CHUNK_MIB, autocast_dtype, autocast_softmax_dtype, compute_dtype
from ._validate import check_pairing, check_same_device, feature_map_as_channels, token_stats_args
from .ops.c2f_head import C2FHeadOptions  # (importing it registers torch.ops.c2f.c2f_head)
from .ops.part_attention import fold_queries
from .part_attention import check_options, part_attention
from .part_mixup import part_mixup_, part_mixup_pool
from .reference import C2FOutput

__all__ = ["C2FHead", "C2FOutput"]


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

    ``forward(x, perm=None, mask=None, x_stats=None)`` returns ``C2FOutput(attr_pred [B, P], logits, attn [B, P,
    N])``; logits are ``[B, classes]`` without a mask or with a ``[B, P]`` mask, ``[K, B, classes]`` with a
    ``[K, B, P]`` mask. ``x_stats = (x_mean, x_var)``, the tokens' LayerNorm statistics cached with frozen
    features, replaces the statistics pass (``c2f.functional.part_attention``; ignored when x requires grad).
    ``materialize_parts`` picks the path (module docstring); ``backend`` ("auto": Triton on CUDA, torch ops
    on CPU; "triton"; "torch") picks the implementation of either path;
    ``chunk_mib``, ``dot_precision`` and ``head_reduce`` (the maps' "mean" or "max" over heads) as in
    ``c2f.nn.PartAttention``.
    """

    def __init__(self, dim: int = 2048, num_parts: int = 312, num_classes: int = 200, num_heads: int = 1,
                 qkv_bias: bool = False, qk_scale: float | None = None, eps: float = 1e-5,
                 materialize_parts: bool = False, backend: str = "auto", chunk_mib: float = DEFAULT_CHUNK_MIB,
                 dot_precision: str = "tf32", device=None, dtype=None, head_reduce: str = "mean"):
        super().__init__(dim, num_parts, num_classes, num_heads, qkv_bias, qk_scale, eps, device=device, dtype=dtype,
                         head_reduce=head_reduce)
        check_options(backend, "auto", chunk_mib, dot_precision)
        self.materialize_parts = materialize_parts
        self.backend, self.chunk_mib, self.dot_precision = backend, chunk_mib, dot_precision

    @classmethod
    def from_checkpoint(cls, path: str, map_location="cpu", **overrides) -> C2FHead:
        """Rebuilds the head a ``best.pt`` / ``best.safetensors`` (``c2f.model_file.save_model``) holds, from
        the constructor arguments stored with its weights; ``overrides`` replace some (e.g. ``backend``)."""
        from .model_file import load_model
        return load_model(path, cls=cls, map_location=map_location, **overrides)

    def forward(self, x: torch.Tensor, perm: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                x_stats: tuple[torch.Tensor, torch.Tensor] | None = None) -> C2FOutput:
        att = self.attention
        xv = feature_map_as_channels(x, att.dim)
        stats = token_stats_args(x_stats, xv)
        b, p = xv.shape[0], att.num_parts
        single_view = mask is not None and mask.dim() == 2
        if mask is not None or perm is not None:
            perm, mask = check_pairing(perm, mask, b, p, views=True)
            check_same_device(x=x, perm=perm, mask=mask)
            mask = mask.unsqueeze(0) if single_view else mask
        if self.materialize_parts:
            out = self._forward_materialized(x, perm, mask, x_stats)
        else:
            out = self._forward_fused(xv, perm, mask, stats)
        if single_view:
            out = C2FOutput(out.attr_pred, out.logits[0], out.attn)
        return out

    def _forward_fused(self, xv, perm, mask, stats) -> C2FOutput:
        cdt = compute_dtype(xv)
        amp = autocast_dtype(xv.device.type)
        with torch.autocast(xv.device.type, enabled=False) if amp is not None else contextlib.nullcontext():
            out = self._fused_fp32(xv, perm, mask, stats, cdt, AMP_PRECISIONS.get(amp, self.dot_precision))
        if amp is None:
            return C2FOutput(*(t.to(xv.dtype) for t in out))
        # The reference's dtypes under autocast: attr_pred fp32 (parts times an fp32 weight), logits in the
        # autocast dtype, attn as autocast returns a softmax on this device.
        return C2FOutput(out.attr_pred, out.logits.to(amp), out.attn.to(autocast_softmax_dtype(xv.device.type, amp)))

    def _fused_fp32(self, xv, perm, mask, stats, cdt, precision) -> C2FOutput:
        """The fused path in the compute dtype (parameters folded with ordinary autograd); ``stats``: the op's
        ``x_mean, x_var`` (``token_stats_args``)."""
        att = self.attention
        h, p = att.num_heads, att.num_parts
        gamma, beta = att.norm.weight.to(cdt), att.norm.bias.to(cdt)
        g = fold_queries(att.queries, att.k.weight, gamma, h, att.scale)
        wr, wc = self.regressor.weight.to(cdt), self.classifier.weight.to(cdt)
        unmixed = mask is None
        if unmixed:   # the plain mean over parts: one view that keeps every part of the sample itself
            b = xv.shape[0]
            perm = torch.arange(b, device=xv.device)
            mask = xv.new_ones(1, b, p, dtype=torch.float32)
        options = C2FHeadOptions(eps=float(att.eps), backend=resolve_backend(self.backend, xv.device),
                                 chunk_mib=float(self.chunk_mib), dot_precision=precision,
                                 head_reduce=att.head_reduce)
        attn, pred_raw, logits_raw = torch.ops.c2f.c2f_head(xv, g, wr * gamma, wc * gamma, att.k.bias, perm, mask,
                                                            *stats, *options)[:3]
        attr_pred = pred_raw + (wr * beta).sum(-1) + self.regressor.bias.to(cdt)
        logits = logits_raw + F.linear(beta, wc, self.classifier.bias.to(cdt))
        if unmixed:
            logits = logits[0]
        return C2FOutput(attr_pred, logits, attn)

    def _forward_materialized(self, x, perm, mask, x_stats) -> C2FOutput:
        att = self.attention
        backend = resolve_backend(self.backend, x.device)

        def attend():
            return part_attention(x, att.queries, att.k.weight, att.norm.weight, att.norm.bias, att.num_heads,
                                  att.scale, att.eps, backend=backend, k_bias=att.k.bias, chunk_mib=self.chunk_mib,
                                  dot_precision=self.dot_precision, head_reduce=att.head_reduce, x_stats=x_stats)

        parts, attn = attend()
        attr_pred = _RecomputedReadout.apply(parts, self.regressor.weight, lambda: attend()[0])
        attr_pred = attr_pred + self.regressor.bias
        if mask is None:
            pooled = parts.mean(1)
        elif mask.shape[0] == 1:
            pooled = part_mixup_(parts, perm, mask[0], backend=backend).mean(1)[None]
        else:
            pooled = part_mixup_pool(parts, perm, mask, backend=backend)
        return C2FOutput(attr_pred, self.classifier(pooled), attn)
