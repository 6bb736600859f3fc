"""Part attention as registered custom ops (``torch.ops.c2f.part_attention_folded`` and ``_unfolded``),
with fake implementations and autograd, so ``torch.compile`` traces through them without a graph
break (docs/design.md, "The op contract").

Each op folds the parameters into the weights its formulation contracts with, calls the chosen
implementation (``c2f.kernels.part_attention`` or ``c2f.torch_ops.part_attention``; the two have
the same functions and saved state) and, in backward, applies the chain rule from those weights back
to the parameters. The backward ops are once differentiable: a second derivative raises.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from .._math import compute_dtype
from ._common import chain_rule_error, empty_if_none, implementation, no_autocast

# Rows per block of the [C, C] column dot in the backward's parameter-gradient epilogue: [128, C]
# temporaries (1 MiB at C=2048) instead of a [C, C] one; blocks of 32 rows made 64 pairs of small ops.
EPILOGUE_ROWS = 128
# dQ of one head is written over dG's storage in this many row blocks: each block's product is still
# a large GEMM (blocks of 32 rows ran at about half the GEMM throughput), and the temporary is half dQ.
QUERY_GRAD_BLOCKS = 2


class PartAttentionOptions(NamedTuple):
    """The non-tensor arguments of the four part-attention ops, in their schemas' order: the forward ops'
    positional tail after the eight tensors, the backward ops' after ``needs_dx``.

    ``op(*tensors, *PartAttentionOptions(...))`` makes a call and ``PartAttentionOptions(*tail)`` reads one
    back. A new option is a field here and a parameter at the same place of the four ops' signatures
    (custom-op schemas are positional; tests/test_compile.py checks that the two agree).
    """
    num_heads: int
    scale: float
    eps: float                  # LayerNorm's
    out_dtype: torch.dtype      # of the part features
    backend: str                # "triton" or "torch", resolved
    chunk_mib: float            # the torch-op path's temporaries per chunk of samples
    dot_precision: str          # the operand precision of the Triton kernels' dots
    head_reduce: str            # attn: the per-head maps' "mean" or "max"


def head_queries(queries: Tensor, h: int, dtype: torch.dtype) -> Tensor:
    """``[h, P, d]`` view of the queries ``[P, C]`` in ``dtype``."""
    p, c = queries.shape
    return queries.to(dtype).view(p, h, c // h).transpose(0, 1)


def fold_queries(queries: Tensor, k_weight: Tensor, gamma: Tensor, h: int, scale: float) -> Tensor:
    """``G = scale * Q_j @ Wk_j * gamma``, ``[h, P, C]`` in gamma's dtype (contiguous)."""
    c = k_weight.shape[0]
    qprime = torch.bmm(head_queries(queries, h, gamma.dtype), k_weight.to(gamma.dtype).view(h, c // h, c))
    return qprime.mul_(gamma).mul_(scale)


def _queries_grad_(dg: Tensor, gamma: Tensor, wkh: Tensor, scale: float) -> Tensor:
    """dQ_j = scale * (dG_j * gamma) Wk_jᵀ ``[h, P, d]``; with one head written over dG itself.

    One head: dQ has dG's shape, so it is computed ``QUERY_GRAD_BLOCKS`` blocks of rows at a time into
    dG's storage (a block's rows of dQ need only the same rows of dG), and the step never holds both
    (dG is dead afterwards).
    """
    h, p, _ = dg.shape
    dg.mul_(gamma)
    if h > 1:
        return torch.bmm(dg, wkh.transpose(1, 2)).mul_(scale)
    wt = wkh[0].T
    rows = -(-p // QUERY_GRAD_BLOCKS)
    for r0 in range(0, p, rows):
        block = dg[0, r0:r0 + rows]
        block.copy_(torch.mm(block, wt).mul_(scale))
    return dg


def _column_dot(a: Tensor, b: Tensor, rows: int = EPILOGUE_ROWS) -> Tensor:
    """``(a * b).sum(0)`` for ``[C, C]`` matrices, a block of rows at a time (no [C, C] temporary)."""
    out = torch.zeros(a.shape[1], dtype=a.dtype, device=a.device)
    for r0 in range(0, a.shape[0], rows):
        out += (a[r0:r0 + rows] * b[r0:r0 + rows]).sum(0)
    return out


# ---------------------------------------------------------------------------------------- shared
# The two formulations differ in their forward and backward bodies and in the state their forward
# saves between attn and the token statistics; the rest is registered for both by ``_register``.

def _forward_fake(state_shapes: Callable[[int, int, int, int, int], list[tuple[int, ...]]]) -> Callable:
    """The fake of a forward op: ``(parts, attn, *state, mean, rstd)``, the formulation's state shaped by
    ``state_shapes(b, c, n, p, h)``."""
    def fake(x, queries, k_weight, k_bias, norm_weight, norm_bias, x_mean, x_var, *options):
        opts = PartAttentionOptions(*options)
        (b, c, n), p, dt = x.shape, queries.shape[0], compute_dtype(x)
        state = [x.new_empty(shape, dtype=dt) for shape in state_shapes(b, c, n, p, opts.num_heads)]
        return (x.new_empty(b, p, c, dtype=opts.out_dtype), x.new_empty(b, p, n, dtype=dt), *state,
                x.new_empty(b, n, dtype=dt), x.new_empty(b, n, dtype=dt))
    return fake


def _backward_fake(x, queries, k_weight, norm_weight, state0, state1, mean, rstd, dparts, dattn, needs_dx, *options):
    """The fake of a backward op (``state0, state1``: attn and probs, or keys and lse)."""
    dx = torch.empty_like(x) if needs_dx else x.new_empty(0)
    return (dx, torch.empty_like(queries), torch.empty_like(k_weight), torch.empty_like(norm_weight),
            torch.empty_like(norm_weight))


def _parameter_grads(x, queries, k_weight, norm_weight, dx, dq, dwk, dgamma, dbeta):
    """A backward op's outputs ``(dx or empty, dqueries [P, C], dk_weight, dnorm_weight, dnorm_bias)``, each in
    its input's dtype, from ``dq [h, P, d]``."""
    p, c = queries.shape
    dq = dq.transpose(0, 1).reshape(p, c)
    return (empty_if_none(dx, x), dq.to(queries.dtype), dwk.to(k_weight.dtype), dgamma.to(norm_weight.dtype),
            dbeta.to(norm_weight.dtype))


def _setup_saving(saved_from: int) -> Callable:
    """The forward's setup_context: saves x (the caller's, not a copy), the three parameters the backward op
    reads and the outputs from ``saved_from`` on (its state and the token statistics: computed, or the ones
    given with x), in the backward op's argument order."""
    def setup(ctx, inputs, output):
        x, queries, k_weight, k_bias, norm_weight, norm_bias, x_mean, x_var, *options = inputs
        ctx.save_for_backward(x, queries, k_weight, norm_weight, *output[saved_from:])
        ctx.options = PartAttentionOptions(*options)
        ctx.bias_like = None if k_bias is None else (k_bias.shape, k_bias.dtype)
        ctx.set_materialize_grads(False)
    return setup


def _backward_formula(backward_op) -> Callable:
    """The forward's autograd formula: ``backward_op`` on the saved state, the gradients of parts and attn (the
    state's own gradients are ignored: it is saved for backward, not differentiable output) and the options.
    The given statistics ``x_mean, x_var`` get no gradient (they are constants of frozen features)."""
    def backward(ctx, dparts, dattn, *state_grads):
        needs_dx = ctx.needs_input_grad[0]
        dx, dq, dwk, dgamma, dbeta = backward_op(*ctx.saved_tensors, dparts, dattn, needs_dx, *ctx.options)
        grads = (dx if needs_dx else None, dq, dwk, _bias_grad(ctx, dq), dgamma, dbeta, None, None)
        return grads + (None,) * len(ctx.options)
    return backward


def _bias_grad(ctx, like: Tensor) -> Tensor | None:
    """The key bias adds a constant to each query's scores: the softmax cancels it exactly."""
    if ctx.bias_like is None or not ctx.needs_input_grad[3]:
        return None
    shape, dtype = ctx.bias_like
    return like.new_zeros(shape, dtype=dtype)


def _register(op, backward_op, state_shapes: Callable, saved_from: int) -> None:
    """Fakes and autograd of one formulation's forward and backward ops; the backward op is once
    differentiable."""
    op.register_fake(_forward_fake(state_shapes))
    backward_op.register_fake(_backward_fake)
    op.register_autograd(_backward_formula(backward_op), setup_context=_setup_saving(saved_from))
    backward_op.register_autograd(chain_rule_error("part attention"))


# --------------------------------------------------------------------------------------- folded

@torch.library.custom_op("c2f::part_attention_folded", mutates_args=())
def part_attention_folded(x: Tensor, queries: Tensor, k_weight: Tensor, k_bias: Tensor | None, norm_weight: Tensor,
                          norm_bias: Tensor, x_mean: Tensor | None, x_var: Tensor | None, num_heads: int, scale: float,
                          eps: float, out_dtype: torch.dtype, backend: str, chunk_mib: float, dot_precision: str,
                          head_reduce: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(parts [B, P, C] in out_dtype, attn [B, P, N], probs [B, h, P, N] or empty, mean [B, N], rstd [B, N])``
    of ``x [B, C, N]``; ``k_bias`` only receives its (exactly zero) gradient: the softmax cancels it. ``x_mean,
    x_var [B, N]`` (both or neither): the token mean and biased variance given with x (cached with frozen
    features), used instead of a statistics pass (``rstd = rsqrt(x_var + eps)``)."""
    dt = compute_dtype(x)
    with no_autocast(x):
        gamma, beta = norm_weight.to(dt), norm_bias.to(dt)
        g = fold_queries(queries, k_weight, gamma, num_heads, scale)
        return implementation("part_attention", backend).folded_fwd(x, g, gamma, beta, eps, out_dtype, chunk_mib,
                                                                    dot_precision, head_reduce, x_mean, x_var)


@torch.library.custom_op("c2f::part_attention_folded_backward", mutates_args=())
def part_attention_folded_backward(
        x: Tensor, queries: Tensor, k_weight: Tensor, norm_weight: Tensor, attn: Tensor, probs: Tensor, mean: Tensor,
        rstd: Tensor, dparts: Tensor | None, dattn: Tensor | None, needs_dx: bool, num_heads: int, scale: float,
        eps: float, out_dtype: torch.dtype, backend: str, chunk_mib: float, dot_precision: str, head_reduce: str
        ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(dx or empty, dqueries, dk_weight, dnorm_weight, dnorm_bias)``, each in its input's dtype."""
    with no_autocast(x):
        dt = compute_dtype(x)
        h, c = num_heads, queries.shape[1]
        gamma = norm_weight.to(dt)
        g = fold_queries(queries, k_weight, gamma, h, scale) if needs_dx else None
        dg, dgamma, dbeta, dx = implementation("part_attention", backend).folded_bwd(
            x, g, gamma, attn, probs, mean, rstd, dparts, dattn, h, needs_dx, chunk_mib, dot_precision, head_reduce)
        del g
        # G_j = scale * Q_j Wk_j * gamma: M_j = scale * Q_jᵀ dG_j gives dWk_j = M_j * gamma and gamma's
        # gradient through G as the column sums of Wk * M.
        wk = k_weight.to(dt)
        m = torch.bmm(head_queries(queries, h, dt).transpose(1, 2), dg).mul_(scale)      # [h, d, C]
        dq = _queries_grad_(dg, gamma, wk.view(h, c // h, c), scale)                     # [h, P, d]
        del dg  # peak memory: dG is dead once dQ and M exist
        dgamma += _column_dot(wk, m.view(c, c))
        dwk = m.mul_(gamma).view(c, c)
        return _parameter_grads(x, queries, k_weight, norm_weight, dx, dq, dwk, dgamma, dbeta)


def _folded_state(b: int, c: int, n: int, p: int, h: int) -> list[tuple[int, ...]]:
    """probs ``[B, h, P, N]``; empty with one head, where attn is the probabilities."""
    return [(b, h, p, n) if h > 1 else (0,)]


# Saved: attn (with one head: the probabilities), the per-head probabilities (more heads), the token
# statistics; G is refolded from the parameters if dx is needed.
_register(part_attention_folded, part_attention_folded_backward, _folded_state, saved_from=1)


# ------------------------------------------------------------------------------------- unfolded

def _unfolded_weights(queries: Tensor, k_weight: Tensor, gamma: Tensor, h: int, scale: float, with_wg: bool = True):
    """``q = scale * Q_j [h, P, d]`` and ``wg = Wk * gamma [C, C]`` (None unless ``with_wg``: the backward
    needs it for dx only, and it is as large as Wk), in gamma's dtype."""
    wg = k_weight.to(gamma.dtype) * gamma if with_wg else None
    return head_queries(queries, h, gamma.dtype) * scale, wg


@torch.library.custom_op("c2f::part_attention_unfolded", mutates_args=())
def part_attention_unfolded(x: Tensor, queries: Tensor, k_weight: Tensor, k_bias: Tensor | None,
                            norm_weight: Tensor, norm_bias: Tensor, x_mean: Tensor | None, x_var: Tensor | None,
                            num_heads: int, scale: float, eps: float, out_dtype: torch.dtype, backend: str,
                            chunk_mib: float, dot_precision: str, head_reduce: str
                            ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(parts [B, P, C] in out_dtype, attn [B, P, N], keys [C, B, N], lse [B, h, P], mean [B, N],
    rstd [B, N])``; ``x_mean, x_var`` as in ``part_attention_folded``."""
    dt = compute_dtype(x)
    with no_autocast(x):
        gamma, beta = norm_weight.to(dt), norm_bias.to(dt)
        q, wg = _unfolded_weights(queries, k_weight, gamma, num_heads, scale)
        return implementation("part_attention", backend).unfolded_fwd(x, q, wg, gamma, beta, eps, out_dtype,
                                                                      chunk_mib, dot_precision, head_reduce,
                                                                      x_mean, x_var)


@torch.library.custom_op("c2f::part_attention_unfolded_backward", mutates_args=())
def part_attention_unfolded_backward(
        x: Tensor, queries: Tensor, k_weight: Tensor, norm_weight: Tensor, keys: Tensor, lse: Tensor, mean: Tensor,
        rstd: Tensor, dparts: Tensor | None, dattn: Tensor | None, needs_dx: bool, num_heads: int, scale: float,
        eps: float, out_dtype: torch.dtype, backend: str, chunk_mib: float, dot_precision: str, head_reduce: str
        ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(dx or empty, dqueries, dk_weight, dnorm_weight, dnorm_bias)``, each in its input's dtype."""
    with no_autocast(x):
        dt = compute_dtype(x)
        gamma = norm_weight.to(dt)
        q, wg = _unfolded_weights(queries, k_weight, gamma, num_heads, scale, with_wg=needs_dx)
        dq, dwg, dgamma, dbeta, dx = implementation("part_attention", backend).unfolded_bwd(
            x, q, wg, gamma, keys, lse, mean, rstd, dparts, dattn, needs_dx, chunk_mib, dot_precision, head_reduce)
        # wg = Wk * gamma: dWk = dwg * gamma, and gamma's gradient through the keys is colsum(Wk * dwg).
        dgamma += _column_dot(k_weight.to(dt), dwg)
        dwk = dwg.mul_(gamma)
        return _parameter_grads(x, queries, k_weight, norm_weight, dx, dq.mul_(scale), dwk, dgamma, dbeta)


def _unfolded_state(b: int, c: int, n: int, p: int, h: int) -> list[tuple[int, ...]]:
    """keys ``[C, B, N]`` and the logsumexp ``[B, h, P]``."""
    return [(c, b, n), (b, h, p)]


# Saved: the keys and the logsumexp (backward recomputes the probabilities from them: cheaper than
# keeping [B, h, P, N] with many heads), the token statistics.
_register(part_attention_unfolded, part_attention_unfolded_backward, _unfolded_state, saved_from=2)


# ------------------------------------------------------------------------------------- FLOP counts
# FlopCounterMode sees a custom op as one call: these formulas give the GEMM FLOPs its implementations
# run (2 per multiply-add; elementwise work is not counted, as for aten ops).

@register_flop_formula(torch.ops.c2f.part_attention_folded)
def _(x, queries, k_weight, k_bias, norm_weight, norm_bias, x_mean, x_var, num_heads, *args, out_shape=None,
      **kwargs):
    (b, c, n), p = x, queries[0]
    return 2 * p * c * c + 2 * num_heads * p * c * b * n + 2 * p * n * c * b


@register_flop_formula(torch.ops.c2f.part_attention_folded_backward)
def _(x, queries, k_weight, norm_weight, attn, probs, mean, rstd, dparts, dattn, needs_dx, num_heads, *args,
      out_shape=None, **kwargs):
    (b, c, n), p = x, queries[0]
    flops = 3 * 2 * p * c * b * n + 2 * num_heads * p * c * b * n + 2 * 2 * p * c * c
    return flops + (2 * p * c * c + 2 * num_heads * p * c * b * n if needs_dx else 0)


@register_flop_formula(torch.ops.c2f.part_attention_unfolded)
def _(x, queries, *args, out_shape=None, **kwargs):
    (b, c, n), p = x, queries[0]
    return 2 * c * c * b * n + 2 * 2 * p * c * b * n


@register_flop_formula(torch.ops.c2f.part_attention_unfolded_backward)
def _(x, queries, k_weight, norm_weight, keys, lse, mean, rstd, dparts, dattn, needs_dx, *args, out_shape=None,
      **kwargs):
    (b, c, n), p = x, queries[0]
    return 5 * 2 * p * c * b * n + 2 * c * c * b * n + (2 * c * c * b * n if needs_dx else 0)
