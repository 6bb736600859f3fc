"""The fused C2F head as a registered custom op, ``torch.ops.c2f.c2f_head``, with its backward.

The op takes the folded weights (``g = scale * Q Wk * gamma``, ``wrg = Wr * gamma``, ``wcg = Wc * gamma``;
the module forms them with ordinary autograd, so the gradients reach the parameters through it)
and returns the attention maps, the attribute predictions and the logits of the K mixed views
without their constant terms, plus the saved state. The backward op is once differentiable.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from .._math import compute_dtype
from ._common import chain_rule_error, empty_if_none, implementation, no_autocast


class C2FHeadOptions(NamedTuple):
    """The non-tensor arguments of the head's ops, in their schemas' order: ``c2f_head``'s positional tail after
    its nine tensors, ``c2f_head_backward``'s after ``needs_dx``.

    ``torch.ops.c2f.c2f_head(*tensors, *C2FHeadOptions(...))`` makes a call and ``C2FHeadOptions(*tail)`` reads
    one back. A new option is a field here and a parameter at the same place of both ops' signatures
    (custom-op schemas are positional; tests/test_compile.py checks that the two agree).
    """
    eps: float                  # LayerNorm's
    backend: str                # "triton" or "torch", resolved
    chunk_mib: float            # the torch-op path's temporaries per chunk of samples
    dot_precision: str          # the operand precision of the Triton kernels' dots
    head_reduce: str            # attn: the per-head maps' "mean" or "max"


@torch.library.custom_op("c2f::c2f_head", mutates_args=())
def c2f_head(x: Tensor, g: Tensor, wrg: Tensor, wcg: Tensor, k_bias: Tensor | None, perm: Tensor, mask: Tensor,
             x_mean: Tensor | None, x_var: Tensor | None, eps: float, backend: str, chunk_mib: float,
             dot_precision: str, head_reduce: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(attn [B, P, N], pred [B, P], logits [K, B, classes], probs, zhat, mean, rstd)`` of ``x [B, C, N]``,
    ``perm [B]`` a permutation and ``mask [K, B, P]`` fp32 (K = 1 and all ones: no mixup). ``x_mean, x_var
    [B, N]`` (both or neither): the token mean and biased variance given with x (cached with frozen features),
    used instead of a statistics pass (``rstd = rsqrt(x_var + eps)``)."""
    with no_autocast(x):
        return implementation("c2f_head", backend).c2f_head_fwd(x, g, wrg, wcg, perm, mask, eps, chunk_mib,
                                                                dot_precision, head_reduce, x_mean, x_var)


@c2f_head.register_fake
def _(x, g, wrg, wcg, k_bias, perm, mask, x_mean, x_var, *options):
    b, c, n = x.shape
    h, p, _ = g.shape
    dt = compute_dtype(x)
    probs_shape = (b, h, p, n) if h > 1 else (0,)
    return (x.new_empty(b, p, n, dtype=dt), x.new_empty(b, p, dtype=dt),
            x.new_empty(mask.shape[0], b, wcg.shape[0], dtype=dt), x.new_empty(probs_shape, dtype=dt),
            x.new_empty(b, h, p, n, dtype=dt), x.new_empty(b, n, dtype=dt), x.new_empty(b, n, dtype=dt))


@torch.library.custom_op("c2f::c2f_head_backward", mutates_args=())
def c2f_head_backward(x: Tensor, g: Tensor, wrg: Tensor, wcg: Tensor, perm: Tensor, mask: Tensor, attn: Tensor,
                      probs: Tensor, zhat: Tensor, mean: Tensor, rstd: Tensor, dattn: Tensor | None,
                      dpred: Tensor | None, dlogits: Tensor | None, needs_dx: bool, eps: float, backend: str,
                      chunk_mib: float, dot_precision: str, head_reduce: str
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dx or empty, dg, dwrg, dwcg)``."""
    with no_autocast(x):
        dg, dwrg, dwcg, dx = implementation("c2f_head", backend).c2f_head_bwd(
            x, g, wrg, wcg, perm, mask, attn, probs, zhat, mean, rstd, dattn, dpred, dlogits, needs_dx, chunk_mib,
            dot_precision, head_reduce)
    return empty_if_none(dx, x), dg, dwrg, dwcg


@c2f_head_backward.register_fake
def _(x, g, wrg, wcg, perm, mask, attn, probs, zhat, mean, rstd, dattn, dpred, dlogits, needs_dx, *options):
    dx = torch.empty_like(x) if needs_dx else x.new_empty(0)
    return dx, torch.empty_like(g), torch.empty_like(wrg), torch.empty_like(wcg)


def _setup(ctx, inputs, output):
    x, g, wrg, wcg, k_bias, perm, mask, x_mean, x_var, *options = inputs
    attn, _, _, probs, zhat, mean, rstd = output
    # Saved: x (the caller's), the folded weights, the pairing, the probabilities (attn with one head),
    # the readout before its weighted sum (zhat), the token statistics (computed, or the ones given with x):
    # B·P·N, never B·P·C.
    ctx.save_for_backward(x, g, wrg, wcg, perm, mask, attn, probs, zhat, mean, rstd)
    ctx.options = C2FHeadOptions(*options)
    ctx.bias_like = None if k_bias is None else (k_bias.shape, k_bias.dtype)
    ctx.set_materialize_grads(False)


def _backward(ctx, dattn, dpred, dlogits, dprobs, dzhat, dmean, drstd):
    needs_dx = ctx.needs_input_grad[0]
    dx, dg, dwrg, dwcg = torch.ops.c2f.c2f_head_backward(*ctx.saved_tensors, dattn, dpred, dlogits, needs_dx,
                                                         *ctx.options)
    dbias = None
    if ctx.bias_like is not None and ctx.needs_input_grad[4]:
        # The key bias adds a per-query constant to the scores, which the softmax cancels exactly.
        dbias = dg.new_zeros(ctx.bias_like[0], dtype=ctx.bias_like[1])
    # perm and mask (integer and constant) get no gradient, nor the given statistics, nor the options.
    return (dx if needs_dx else None, dg, dwrg, dwcg, dbias, None, None, None, None) + (None,) * len(ctx.options)


c2f_head.register_autograd(_backward, setup_context=_setup)
c2f_head_backward.register_autograd(chain_rule_error("C2F head"))


# FlopCounterMode sees a custom op as one call: the GEMM FLOPs of the implementations (2 per multiply-add).
def _pooling_flops(b, c, n, h, p, k, classes):
    """coef = M P_j (all heads), U = coef xhatᵀ, logits = U Wcgᵀ: [2K] rows per sample."""
    return 2 * b * 2 * k * (h * p * n + n * c + c * classes)


@register_flop_formula(torch.ops.c2f.c2f_head)
def _(x, g, wrg, wcg, k_bias, perm, mask, *args, out_shape=None, **kwargs):
    (b, c, n), (h, p, _), classes, k = x, g, wcg[0], mask[0]
    return 2 * (h + 1) * p * c * b * n + _pooling_flops(b, c, n, h, p, k, classes)


@register_flop_formula(torch.ops.c2f.c2f_head_backward)
def _(x, g, wrg, wcg, perm, mask, attn, probs, zhat, mean, rstd, dattn, dpred, dlogits, needs_dx, *args,
      out_shape=None, **kwargs):
    (b, c, n), (h, p, _), classes, k = x, g, wcg[0], mask[0]
    # dG and dWrg; the pooled rows recomputed, dWcg, dU, dcoef and its pull-back to dP.
    flops = 2 * (h + 1) * p * c * b * n + 2 * _pooling_flops(b, c, n, h, p, k, classes)
    return flops + (2 * (h + 1) * p * c * b * n + 2 * b * 2 * k * c * n if needs_dx else 0)
