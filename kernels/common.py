"""What every launcher shares (``part_attention.py``, ``part_mixup.py``, ``c2f_head.py``): argument checks
that name the tensor, its shape, strides, dtype and device; the strides of the ``[B, C, N]`` map as kernel
arguments; the token statistics, given with x or left for the statistics kernel; making an op's plans
before anything is allocated or launched. No launcher imports another's names: what two of them need
lives here.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from .._math import given_token_stats, reduce_heads_grad_, stats_given
from .launch import FLOAT_DTYPES
from .plans import MAX_TOKENS, PlanError

__all__ = ["F32", "describe", "check", "check_dims", "check_x", "check_stats", "check_perm", "xstrides", "token_stats",
           "make_plans", "DAttn", "dattn_operand"]

F32 = (torch.float32,)


def describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, stride {tuple(t.stride())}, dtype {t.dtype}, device {t.device}"


def check(name: str, t, shape: tuple, dtypes: tuple, device: torch.device, contiguous: bool = False,
          unit_stride: bool = False) -> None:
    """Raises naming ``name`` when ``t`` is not a tensor of ``shape``, one of ``dtypes``, on ``device``;
    ``contiguous``, or with ``unit_stride`` a stride of 1 along its last dim, when asked."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {describe(t)}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {describe(t)}")
    if t.device != device:
        raise RuntimeError(f"{name} must be on {device} with the other inputs, got {describe(t)}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got {describe(t)}")
    if unit_stride and t.stride(-1) != 1:
        raise ValueError(f"{name} must have unit stride along its last dim, got {describe(t)}")


def check_dims(name: str, t, layout: str) -> tuple[int, ...]:
    """The shape of ``t``, raising naming ``name`` unless it is a tensor of as many dims as ``layout``
    (e.g. ``"[h, P, C]"``) names."""
    if not isinstance(t, torch.Tensor) or t.dim() != layout.count(",") + 1:
        raise ValueError(f"{name} must be a {layout} tensor, got {describe(t) if isinstance(t, torch.Tensor) else t!r}")
    return tuple(t.shape)


def check_x(x, g, h: int, p: int) -> tuple[int, int, int]:
    """``(B, C, N)`` of the map ``x [B, C, N]`` (any strides) that part attention and the head read with
    ``h`` heads of ``p`` queries, and ``g [h, P, C]`` (fp32 contiguous) when given; raises naming what
    the kernels cannot take (int32 offsets inside a sample, rows of more than ``MAX_TOKENS`` tokens)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ValueError(f"x must be a [B, C, N] tensor, got "
                         f"{describe(x) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16, got {describe(x)}")
    bsz, c, n = x.shape
    if c == 0 or n == 0:
        raise ValueError(f"x must have C, N > 0, got {describe(x)}")
    if n > MAX_TOKENS:
        raise ValueError(f"x has N={n} tokens; the softmax kernels hold whole rows of at most "
                         f"{MAX_TOKENS} tokens: {describe(x)}")
    if not isinstance(h, int) or h <= 0 or c % h:
        raise ValueError(f"num_heads must be a positive divisor of C={c}, got {h!r}")
    if p <= 0:
        raise ValueError(f"there must be P > 0 queries, got {p}")
    if g is not None:
        check("g", g, (h, p, c), F32, x.device, contiguous=True)
    # Offsets inside one sample (and within g) are int32 in the kernels; only per-sample bases are int64.
    span = max((c - 1) * abs(x.stride(1)) + (n - 1) * abs(x.stride(2)) + 1, h * p * max(c, n), bsz * h * p)
    if span >= 2 ** 31:
        raise ValueError(f"one sample of x (or h * P * max(C, N) = {h * p * max(c, n)}, or the B * h * P = "
                         f"{bsz * h * p} rows of the probabilities) spans {span} elements, more than int32 offsets "
                         f"address: x {describe(x)}")
    return bsz, c, n


def check_stats(x_mean, x_var, b: int, n: int, device: torch.device) -> bool:
    """Whether the token statistics come with x (``c2f._math.stats_given``); when they do, ``x_mean`` and
    ``x_var`` are ``[B, N]`` fp32 on ``device``."""
    if not stats_given(x_mean, x_var):
        return False
    check("x_mean", x_mean, (b, n), F32, device)
    check("x_var", x_var, (b, n), F32, device)
    return True


def token_stats(x_mean, x_var, eps: float, b: int, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The token ``mean, rstd [B, N]`` fp32 the kernels read: from the statistics given with x
    (``c2f._math.given_token_stats``), else empty, for the statistics kernel to fill."""
    given = given_token_stats(x_mean, x_var, eps, torch.float32)
    if given is not None:
        return given
    return torch.empty(b, n, device=device, dtype=torch.float32), torch.empty(b, n, device=device, dtype=torch.float32)


def check_perm(perm, b: int, device: torch.device) -> None:
    """``perm [B]`` int64 on ``device`` (its values are ``c2f._validate``'s to check)."""
    check("perm", perm, (b,), (torch.int64,), device)


def xstrides(x: torch.Tensor) -> dict:
    """The strides of ``x [B, C, N]`` as the kernels' ``stride_xb, stride_xc, stride_xn`` arguments."""
    return dict(stride_xb=x.stride(0), stride_xc=x.stride(1), stride_xn=x.stride(2))


class DAttn(NamedTuple):
    """The gradient of ``attn`` as the backward kernels read it: sample b, head j at ``b * stride_b + j *
    stride_h`` (``[P, N]`` rows), scaled by ``scale``."""
    tensor: torch.Tensor
    stride_b: int
    stride_h: int
    scale: float

    @property
    def per_head(self) -> bool:
        """Each head reads its own rows (the max); the mean's heads share one ``[P, N]`` block (stride 0)."""
        return self.stride_h != 0


def dattn_operand(dattn: torch.Tensor | None, probs: torch.Tensor, head_reduce: str) -> DAttn:
    """``dattn [B, P, N]`` for the backward kernels. The mean over heads shares it (stride 0 over heads, scaled
    by 1/h); the max routes it to the heads that reach the max, ties sharing evenly: a per-head ``[B, h, P, N]``
    fp32 gradient (``c2f._math.reduce_heads_grad_`` from ``probs [B, h, P, N]``), the memory of the probs.
    Without ``dattn`` (kernels compiled without HAS_DATTN never read it) ``probs`` stands in for the pointer."""
    b, h, p, n = probs.shape
    if dattn is None:
        return DAttn(probs, 0, 0, 1.0 / h)
    if head_reduce != "max" or h == 1:
        return DAttn(dattn, p * n, 0, 1.0 / h)
    per_head = torch.zeros(b, h, p, n, device=probs.device, dtype=torch.float32)
    reduce_heads_grad_(per_head.transpose(0, 1), dattn.float(), probs.transpose(0, 1), "max")
    return DAttn(per_head, h * p * n, p * n, 1.0)


def make_plans(make: Callable[[], dict], op: str, x: torch.Tensor, target, dot_precision: str | None = None,
               name: str = "x") -> dict:
    """The plans of an op's kernels (``make()``), made before anything is allocated or launched; a shape
    no plan fits on ``target`` raises here, naming the op, the tensor ``name`` (its shape and dtype), the
    dot precision, the target and its limit."""
    try:
        return make()
    except PlanError as e:
        precision = f" with dot_precision={dot_precision!r}" if dot_precision is not None else ""
        raise PlanError(f"{op} on {name} {describe(x)}{precision} cannot run on {target.name} "
                        f"({target.devices}): {e}") from None
