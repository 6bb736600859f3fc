"""The shape grid ``python -m c2f.kernels.inspect`` checks: per op, labelled cases that call the real
launchers on ``meta`` tensors (inside ``launch.recording(target)`` they record their launches instead of
running them). Shapes that map to the same plan compile once (``inspect.distinct_launches``).
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from .launch import TL_DTYPES
from .plans import plan_flags

ATTENTION_TOKENS = (49, 196, 324, 576, 1024)      # 7x7 .. 32x32 maps
ATTENTION_HEADS = (1, 3, 16)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MIXUP_VIEWS = (1, 4, 32)
HEAD_VIEWS = (1, 4)          # no mixup (one view per sample) and the training default
AUTOCAST = ((torch.bfloat16, "bf16"), (torch.float16, "fp16"))   # (storage dtype, dot_precision) pairs


def _meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device="meta")


def _attention_case(n: int, h: int, dtype: torch.dtype, dot_precision: str = "tf32") -> Callable[[], None]:
    from . import part_attention as pa

    c, p, b = (1536 if h == 3 else 2048), 312, 2    # C divisible by the heads; d = 512 or 128 or 2048

    def run():
        x = _meta(b, c, n, dtype=dtype)             # a [B, C, H, W] map viewed as [B, C, N]
        g, gamma, beta = _meta(h, p, c), _meta(c), _meta(c)
        parts, attn, probs, mean, rstd = pa.folded_fwd(x, g, gamma, beta, 1e-5, dtype, 16.0, dot_precision)
        # Frozen features with their cached token statistics: the short-row forward reads them (HAS_STATS).
        pa.folded_fwd(x, g, gamma, beta, 1e-5, dtype, 16.0, dot_precision, "mean", _meta(b, n), _meta(b, n))
        # What backward receives from c2f.ops: dparts in the parts' dtype; dattn in fp32, since the public
        # function returns attn.to(x.dtype), whose backward casts the gradient back to fp32.
        for dattn in (_meta(b, p, n), None):
            for needs_dx in (True, False):
                pa.folded_bwd(x, g, gamma, attn, probs, mean, rstd, _meta(b, p, c, dtype=dtype), dattn, h, needs_dx,
                              16.0, dot_precision)
    return run


def _mixup_case(k: int, dtype: torch.dtype) -> Callable[[], None]:
    from . import part_mixup as pm

    b, p, c = 4, 312, 2048

    def run():
        parts, perm = _meta(b, p, c, dtype=dtype), _meta(b, dtype=torch.int64)
        if k == MIXUP_VIEWS[1]:      # the in-place kernels have no K: once per dtype
            pm.part_mixup_fwd_(parts, perm, _meta(b, p))
            pm.part_mixup_bwd_(parts, perm, _meta(b, p))
        mask = _meta(k, b, p)
        pm.part_mixup_pool_fwd(parts, perm, mask)
        pm.part_mixup_pool_bwd(_meta(k, b, c, dtype=dtype), perm, mask, dtype)
    return run


def _head_case(n: int, h: int, dtype: torch.dtype, k: int, dot_precision: str = "tf32") -> Callable[[], None]:
    from . import c2f_head as ch

    c, p, b, classes = (1536 if h == 3 else 2048), 312, 2, 200

    def run():
        x = _meta(b, c, n, dtype=dtype)
        g, wrg, wcg = _meta(h, p, c), _meta(p, c), _meta(classes, c)
        perm, mask = _meta(b, dtype=torch.int64), _meta(k, b, p)
        attn, _, _, probs, zhat, mean, rstd = ch.c2f_head_fwd(x, g, wrg, wcg, perm, mask, 1e-5, 16.0, dot_precision)
        with plan_flags(head_fwd_one_pass=True):       # the one-pass forward (a plan flag, off by default)
            ch.c2f_head_fwd(x, g, wrg, wcg, perm, mask, 1e-5, 16.0, dot_precision)
        state = (attn, probs, zhat, mean, rstd)
        dpred, dlogits = _meta(b, p), _meta(k, b, classes)
        # Training (attention maps unused, frozen backbone), then every gradient with dx.
        ch.c2f_head_bwd(x, g, wrg, wcg, perm, mask, *state, None, dpred, dlogits, False, 16.0, dot_precision)
        ch.c2f_head_bwd(x, g, wrg, wcg, perm, mask, *state, _meta(b, p, n), dpred, dlogits, True, 16.0,
                        dot_precision)
    return run

def cases(quick: bool = False) -> dict[str, list[tuple[str, Callable[[], None]]]]:
    """``{op: [(shape label, run)]}``: the shape grid every plan is checked at. Attention and the head:
    every N, head count and storage dtype with fp32 (TF32) dots, plus the autocast precisions (bf16
    operands on bf16 maps, fp16 on fp16). ``quick``: the production shapes only (N = 196, 1 and 16
    heads, K = 4 and 32 (4 for the head), fp32 and bf16)."""
    tokens, heads, views, head_views, dtypes = ((196,), (1, 16), (4, 32), (4,), DTYPES[:2]) if quick else \
        (ATTENTION_TOKENS, ATTENTION_HEADS, MIXUP_VIEWS, HEAD_VIEWS, DTYPES)
    autocast = [(dt, prec) for dt, prec in AUTOCAST if dt in dtypes]
    attention = [(f"N={n} h={h} {TL_DTYPES[dt]}", _attention_case(n, h, dt))
                 for n in tokens for h in heads for dt in dtypes]
    attention += [(f"N={n} h={h} {TL_DTYPES[dt]} dot={prec}", _attention_case(n, h, dt, prec))
                  for n in tokens for h in heads for dt, prec in autocast]
    mixup = [(f"K={k} {TL_DTYPES[dt]}", _mixup_case(k, dt)) for k in views for dt in dtypes]
    head = [(f"N={n} h={h} K={k} {TL_DTYPES[dt]}", _head_case(n, h, dt, k))
            for n in tokens for h in heads for k in head_views for dt in dtypes]
    head += [(f"N={n} h={h} K={k} {TL_DTYPES[dt]} dot={prec}", _head_case(n, h, dt, k, prec))
             for n in tokens for h in heads for k in head_views for dt, prec in autocast]
    return {"part_attention": attention, "part_mixup": mixup, "c2f_head": head}
