"""Fused part attention: LayerNorm + QKᵀ + softmax + weighted sum, as one differentiable op.

The algebra (docs/design.md, "The algebra" 1-4): the key projection is folded into the queries, or
the LayerNorm into the key projection, and LayerNorm is folded into the contraction over channels, so
neither the normalised tokens nor (with few heads) the keys are ever formed::

    S_j[p, n] = rstd[n] * (G_j @ (X - mean))[p, n]         G_j = scale * Q_j @ Wk_j * gamma
    parts_j   = gamma * ((P_j * rstd) @ (X - mean)ᵀ)_j + beta

Two formulations, picked by head count and backend (``formulation="auto"``, ``pick_formulation``):
- "folded": G = [h, P, C] is formed once per step; scores cost h·P·C·N per sample. Cheapest while
  h·P < C + P (h < C/P + 1, about 7.6 at C=2048, P=312): the torch backend's rule. The Triton backend
  keeps it up to twice the unfolded FLOPs (16 heads at C=2048, P=312): its kernels take the heads as a
  grid axis, where the unfolded formulation is chunked torch ops.
- "unfolded": keys K' = (Wk * gamma) @ (X - mean) * rstd, C·C·N per sample, then scores P·C·N.
  Cheaper with many heads.
The op is ``torch.ops.c2f.part_attention_folded`` / ``_unfolded`` (``c2f.ops.part_attention``); its two
implementations are the Triton kernels (``c2f.kernels.part_attention``) and batched torch ops
(``c2f.torch_ops.part_attention``).
"""
from __future__ import annotations

import torch

from . import reference
from ._backend import check_backend, resolve_backend
from ._math import AMP_PRECISIONS, DEFAULT_CHUNK_MIB, autocast_dtype, autocast_softmax_dtype
from ._validate import (
    check_float,
    check_head_reduce,
    check_same_device,
    describe,
    feature_map_as_channels,
    token_stats_args,
)
from .ops.part_attention import PartAttentionOptions  # (importing it registers torch.ops.c2f.part_attention_*)

FORMULATIONS = ("auto", "folded", "unfolded")
# kernels/plans.py DOT_PRECISIONS: c2f imports no kernels module until the Triton backend runs (a source
# checkout on the path has no c2f.kernels).
DOT_PRECISIONS = ("tf32", "ieee", "bf16", "fp16")


# The Triton backend runs the folded formulation with the heads as a grid axis: 1 forward and 2 backward
# launches whatever the heads and the batch, the scores kept on chip up to 256 tokens. Its unfolded
# formulation is the torch-op one on the device, chunked by samples: at 16 heads the default budget holds one
# sample a chunk, about 60 aten ops (most of them kernel launches) per sample and pass: thousands at B=64. So
# on the Triton backend "auto" stays folded up to this many times the unfolded formulation's FLOPs (1.9x at 16
# heads, C=2048, P=312); a guess until a GPU measures it: the GPU verdict runs 16 heads both ways.
TRITON_FOLDED_FLOPS = 2.0


def pick_formulation(formulation: str, num_heads: int, dim: int, num_parts: int, backend: str = "torch") -> str:
    """"folded" or "unfolded" for ``formulation="auto"``. The torch backend: folded while h·P < C + P, the
    FLOP crossover of the two score formulations. The Triton backend: folded while its FLOPs (forward and
    backward, x frozen: (4h + 4) P C N a sample) are at most ``TRITON_FOLDED_FLOPS`` times the unfolded
    formulation's (4 C^2 N + 10 P C N)."""
    if formulation not in FORMULATIONS:
        raise ValueError(f"formulation must be one of {FORMULATIONS}, got {formulation!r}")
    if formulation != "auto":
        return formulation
    if backend == "triton":
        folded_flops, unfolded_flops = (4 * num_heads + 4) * num_parts, 4 * dim + 10 * num_parts
        return "folded" if folded_flops <= TRITON_FOLDED_FLOPS * unfolded_flops else "unfolded"
    return "folded" if num_heads * num_parts < dim + num_parts else "unfolded"


def check_options(backend: str, formulation: str, chunk_mib: float, dot_precision: str) -> None:
    """Validates the options shared by the functional forms and the modules."""
    check_backend(backend)
    if formulation not in FORMULATIONS:
        raise ValueError(f"formulation must be one of {FORMULATIONS}, got {formulation!r}")
    if not chunk_mib > 0:
        raise ValueError(f"chunk_mib must be positive, got {chunk_mib!r}")
    if dot_precision not in DOT_PRECISIONS:
        raise ValueError(f"dot_precision must be one of {DOT_PRECISIONS}, got {dot_precision!r}")


def part_attention(x: torch.Tensor, queries: torch.Tensor, k_weight: torch.Tensor, norm_weight: torch.Tensor,
                   norm_bias: torch.Tensor, num_heads: int = 1, scale: float | None = None, eps: float = 1e-5,
                   backend: str = "auto", formulation: str = "auto", k_bias: torch.Tensor | None = None,
                   chunk_mib: float = DEFAULT_CHUNK_MIB, dot_precision: str = "tf32", head_reduce: str = "mean",
                   x_stats: tuple[torch.Tensor, torch.Tensor] | None = None):
    """Fused part attention on a feature map ``[B, C, H, W]`` or tokens ``[B, N, C]``.

    Returns ``(parts [B, P, C], attn [B, P, N])`` in ``x.dtype``, computed in fp32. Under
    ``torch.autocast`` the GEMM operands run in the autocast dtype (fp32 accumulation; LayerNorm
    statistics and the softmax stay fp32) and the dtypes follow the reference's under autocast:
    parts in the autocast dtype, attn as autocast returns a softmax (fp32 on CUDA, the autocast dtype
    on CPU). ``k_bias`` only receives its (exactly zero) gradient: a
    key bias drops out of the softmax. ``chunk_mib`` bounds the torch-op path's temporaries per chunk
    of samples; ``dot_precision`` (``DOT_PRECISIONS``: "tf32", "ieee", "bf16", "fp16") sets the operand
    precision of the Triton kernels' dots on a GPU (autocast picks bf16/fp16 itself). ``head_reduce``:
    ``attn`` is the mean ("mean") or the max ("max") of the heads' maps; with one head both are its map.
    ``x_stats``: ``(x_mean, x_var)``, the per-token mean and biased variance over channels of x, ``[B, N]``
    fp32 (the feature cache's): the op uses them (``rstd = rsqrt(x_var + eps)``) instead of computing them;
    ignored when x requires grad.
    """
    check_options(backend, formulation, chunk_mib, dot_precision)
    check_head_reduce(head_reduce)
    check_float("queries", queries)
    if queries.dim() != 2:
        raise ValueError(f"queries must be [P, C], got {describe(queries)}")
    p, c = queries.shape
    xv = feature_map_as_channels(x, c)
    for name, t, shape in (("k_weight", k_weight, (c, c)), ("norm_weight", norm_weight, (c,)),
                           ("norm_bias", norm_bias, (c,))):
        check_float(name, t)
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {describe(t)}")
    if k_bias is not None and tuple(k_bias.shape) != (c,):
        raise ValueError(f"k_bias must have shape ({c},), got {describe(k_bias)}")
    check_same_device(x=x, queries=queries, k_weight=k_weight, norm_weight=norm_weight, norm_bias=norm_bias,
                      k_bias=k_bias)
    x_mean, x_var = token_stats_args(x_stats, xv)
    if num_heads <= 0 or c % num_heads:
        raise ValueError(f"num_heads={num_heads} must be positive and divide C={c}")
    scale = scale or (c // num_heads) ** -0.5
    chosen = resolve_backend(backend, x.device)
    form = pick_formulation(formulation, num_heads, c, p, chosen)
    op = torch.ops.c2f.part_attention_folded if form == "folded" else torch.ops.c2f.part_attention_unfolded
    amp = autocast_dtype(x.device.type)
    precision = AMP_PRECISIONS.get(amp, dot_precision)
    options = PartAttentionOptions(num_heads=num_heads, scale=float(scale), eps=float(eps), out_dtype=amp or x.dtype,
                                   backend=chosen, chunk_mib=float(chunk_mib), dot_precision=precision,
                                   head_reduce=head_reduce)
    out = op(xv, queries, k_weight, k_bias, norm_weight, norm_bias, x_mean, x_var, *options)
    attn_dtype = x.dtype if amp is None else autocast_softmax_dtype(x.device.type, amp)
    return out[0], out[1].to(attn_dtype)


class PartAttention(reference.PartAttention):
    """The fused part attention: same constructor, parameters and ``state_dict`` as
    ``c2f.reference.PartAttention``, same outputs and gradients.

    ``backend``: "auto" (Triton on CUDA, torch ops on CPU), "triton" (on CPU: the interpreter) or
    "torch". ``formulation``: "auto" (``pick_formulation``: on the torch backend folded below about C/P + 1
    heads, on Triton up to twice the unfolded FLOPs), "folded" or "unfolded".
    ``chunk_mib``: temporaries per chunk of samples on the torch-op path (larger chunks run closer
    to the machine's GEMM throughput, smaller ones keep the peak low). ``dot_precision``: the operand
    precision of the Triton kernels' dots on a GPU, "tf32" (default), "ieee", "bf16" or "fp16".
    ``head_reduce``: ``attn`` is the mean ("mean", default) or the max ("max") of the heads' maps.
    ``forward(x, x_stats=None)``: ``x_stats = (x_mean, x_var)`` as in ``part_attention``.
    """

    def __init__(self, dim: int, num_parts: int = 312, num_heads: int = 1, qkv_bias: bool = False,
                 qk_scale: float | None = None, eps: float = 1e-5, backend: str = "auto",
                 formulation: str = "auto", chunk_mib: float = DEFAULT_CHUNK_MIB, dot_precision: str = "tf32",
                 device=None, dtype=None, head_reduce: str = "mean"):
        super().__init__(dim, num_parts, num_heads, qkv_bias, qk_scale, eps, device=device, dtype=dtype,
                         head_reduce=head_reduce)
        check_options(backend, formulation, chunk_mib, dot_precision)
        self.backend, self.formulation = backend, formulation
        self.chunk_mib, self.dot_precision = chunk_mib, dot_precision

    def forward(self, x: torch.Tensor, x_stats: tuple[torch.Tensor, torch.Tensor] | None = None):
        return part_attention(x, self.queries, self.k.weight, self.norm.weight, self.norm.bias,
                              self.num_heads, self.scale, self.eps, backend=self.backend,
                              formulation=self.formulation, k_bias=self.k.bias, chunk_mib=self.chunk_mib,
                              dot_precision=self.dot_precision, head_reduce=self.head_reduce, x_stats=x_stats)
