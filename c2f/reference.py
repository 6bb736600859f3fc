"""Plain PyTorch reference modules, written the obvious way.

Tests, benchmarks and docs import these; nothing else defines a reference, and no library code runs
them (training uses ``c2f.nn`` and ``c2f.part_mixup``). The fused modules in ``c2f.nn`` subclass these to
share their constructors and ``state_dict`` keys. ``mix_targets`` and ``mix_attributes`` here are
the obvious one-hot formulas, independent of ``c2f.part_mixup``'s, which tests check against them.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ._validate import check_float, check_head_reduce, describe, feature_map_as_channels


class PartAttention(nn.Module):
    """Learned part queries attending over LayerNorm-ed tokens.

    ``forward(x, x_stats=None)`` takes ``[B, C, H, W]`` or ``[B, N, C]`` and returns ``(parts [B, P, C], attn
    [B, P, N])``:
    per head j (channels ``j*d:(j+1)*d``), ``P_j = softmax(scale * queries_j @ k(t)_j^T)`` over tokens and
    ``parts_j = P_j @ t_j``, with ``t = LayerNorm(tokens)``; ``attn`` is the mean of ``P_j`` over heads, or
    with ``head_reduce="max"`` their max. ``x_stats`` (the tokens' cached LayerNorm statistics, which the fused
    module may use) is accepted and ignored: the LayerNorm computes its own.
    """

    def __init__(self, dim: int, num_parts: int = 312, num_heads: int = 1, qkv_bias: bool = False,
                 qk_scale: float | None = None, eps: float = 1e-5, device=None, dtype=None, head_reduce: str = "mean"):
        super().__init__()
        check_head_reduce(head_reduce)
        factory = dict(device=device, dtype=dtype)
        if dim <= 0 or num_parts <= 0 or num_heads <= 0:
            raise ValueError(f"dim, num_parts and num_heads must be positive, got {dim}, {num_parts}, {num_heads}")
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        self.dim, self.num_parts, self.num_heads = dim, num_parts, num_heads
        self.head_dim = dim // num_heads
        self.scale = qk_scale or self.head_dim ** -0.5
        self.eps = eps
        self.head_reduce = head_reduce
        self.norm = nn.LayerNorm(dim, eps=eps, **factory)
        self.queries = nn.Parameter(torch.empty(num_parts, dim, **factory))
        self.k = nn.Linear(dim, dim, bias=qkv_bias, **factory)
        nn.init.trunc_normal_(self.queries, std=0.02)

    def extra_repr(self) -> str:
        reduce = f", head_reduce={self.head_reduce!r}" if self.head_reduce != "mean" else ""
        return f"dim={self.dim}, num_parts={self.num_parts}, num_heads={self.num_heads}, scale={self.scale:.4g}{reduce}"

    def forward(self, x: torch.Tensor, x_stats: tuple[torch.Tensor, torch.Tensor] | None = None):
        tokens = feature_map_as_channels(x, self.dim).transpose(1, 2)  # [B, N, C]
        b, n, c = tokens.shape
        h, d, p = self.num_heads, self.head_dim, self.num_parts
        t = self.norm(tokens)
        keys = self.k(t)
        q = (self.scale * self.queries).view(p, h, d).transpose(0, 1)      # [h, P, d]
        k = keys.view(b, n, h, d).permute(0, 2, 3, 1)                        # [B, h, d, N]
        attn = torch.softmax(q @ k, dim=-1)                                  # [B, h, P, N]
        v = t.view(b, n, h, d).transpose(1, 2)                               # [B, h, N, d]
        parts = (attn @ v).transpose(1, 2).reshape(b, p, c)
        return parts, (attn.amax(1) if self.head_reduce == "max" else attn.mean(1))


def _check_mixup_args(parts: torch.Tensor, perm: torch.Tensor, mask: torch.Tensor) -> None:
    check_float("parts", parts)
    if parts.dim() != 3:
        raise ValueError(f"parts must be [B, P, C], got {describe(parts)}")
    b, p, _ = parts.shape
    if perm.dtype != torch.long or perm.shape != (b,):
        raise ValueError(f"perm must be an int64 tensor of shape ({b},), got {describe(perm)}")
    if mask.dim() not in (2, 3) or tuple(mask.shape[-2:]) != (b, p):
        raise ValueError(f"mask must be [B, P] or [K, B, P] with B={b}, P={p}, got {describe(mask)}")


def part_mixup(parts: torch.Tensor, perm: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Part-wise mixup: ``mask * parts + (1 - mask) * parts[perm]`` per part.

    ``parts [B, P, C]``, ``perm [B]``, ``mask [B, P]`` or ``[K, B, P]``; returns ``[B, P, C]`` or ``[K, B, P, C]``.
    """
    _check_mixup_args(parts, perm, mask)
    m = mask.to(parts.dtype).unsqueeze(-1)
    return m * parts + (1 - m) * parts[perm]


def part_mixup_pool(parts: torch.Tensor, perm: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over parts of ``part_mixup``: ``mask [K, B, P]`` gives ``[K, B, C]``."""
    return part_mixup(parts, perm, mask).mean(-2)


def mix_attributes(attrs: torch.Tensor, perm: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attribute targets ``[B, P]`` mixed per part with the same mask: ``[B, P]`` or ``[K, B, P]``."""
    m = mask.to(attrs.dtype)
    return m * attrs + (1 - m) * attrs[perm]


def mix_targets(labels: torch.Tensor, perm: torch.Tensor, mask: torch.Tensor, num_classes: int,
                part_weights: torch.Tensor | None = None, smoothing: float = 0.0) -> torch.Tensor:
    """Soft class targets of mixed samples: ``[B, num_classes]`` or ``[K, B, num_classes]``.

    The weight on ``labels[b]`` is the (``part_weights``-weighted) mean of ``mask[..., b, :]`` over parts;
    the rest goes to ``labels[perm[b]]``. ``smoothing`` spreads that much mass uniformly first.
    """
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
    mask = mask.float()
    if part_weights is None:
        lam = mask.mean(-1)
    else:
        w = part_weights.float()
        if w.shape != mask.shape[-1:]:
            raise ValueError(f"part_weights must be [P={mask.shape[-1]}], got {describe(part_weights)}")
        lam = (mask * w).sum(-1) / w.sum()
    onehot = F.one_hot(labels, num_classes).float()
    onehot = onehot * (1.0 - smoothing) + smoothing / num_classes
    lam = lam.unsqueeze(-1)
    return lam * onehot + (1 - lam) * onehot[perm]


class PartRegressor(nn.Module):
    """Per-part attribute readout: ``pred[b, p] = <parts[b, p], weight[p]> + bias[p]``."""

    def __init__(self, num_parts: int, dim: int, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_parts, dim, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(num_parts, device=device, dtype=dtype))
        nn.init.normal_(self.weight, std=dim ** -0.5)

    def forward(self, parts: torch.Tensor) -> torch.Tensor:
        return (parts * self.weight).sum(-1) + self.bias


class C2FOutput(NamedTuple):
    attr_pred: torch.Tensor   # [B, P]
    logits: torch.Tensor      # [B, num_classes] or [K, B, num_classes]
    attn: torch.Tensor        # [B, P, N]


class C2FHead(nn.Module):
    """Part attention, attribute regression, part mixup and the fine classifier.

    ``forward(x, perm=None, mask=None, x_stats=None)``: attribute predictions on the unmixed parts; logits of the
    mean over parts, or of ``part_mixup_pool(parts, perm, mask)`` when a mask is given. ``x_stats`` is ignored
    (``PartAttention``).
    """

    def __init__(self, dim: int = 2048, num_parts: int = 312, num_classes: int = 200, num_heads: int = 1,
                 qkv_bias: bool = False, qk_scale: float | None = None, eps: float = 1e-5, device=None,
                 dtype=None, head_reduce: str = "mean"):
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        self.attention = PartAttention(dim, num_parts, num_heads, qkv_bias, qk_scale, eps, head_reduce=head_reduce,
                                       **factory)
        self.regressor = PartRegressor(num_parts, dim, **factory)
        self.classifier = nn.Linear(dim, num_classes, **factory)


    def forward(self, x: torch.Tensor, perm: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                x_stats: tuple[torch.Tensor, torch.Tensor] | None = None) -> C2FOutput:
        parts, attn = self.attention(x)
        attr_pred = self.regressor(parts)
        if mask is None:
            pooled = parts.mean(1)
        else:
            if perm is None:
                raise ValueError("perm is required when mask is given")
            pooled = part_mixup(parts, perm, mask).mean(-2)
        return C2FOutput(attr_pred, self.classifier(pooled), attn)
