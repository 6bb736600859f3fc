"""Part-wise mixup without copies: in place on the part features, fused with the mean over parts, and
the ``PartMixup`` module that draws pairings and masks, with the soft targets of the mixed samples.

``part_mixup_`` and ``part_mixup_pool`` compute ``c2f.reference.part_mixup`` (and its mean over parts)
with the algebra of docs/design.md ("The algebra" 5 and 6), as the registered ops
``torch.ops.c2f.part_mixup_`` and ``torch.ops.c2f.part_mixup_pool`` (``c2f.ops.part_mixup``): Triton
kernels on CUDA (or under the interpreter with ``backend="triton"``), torch ops implementing the same
in-place and pooled forms elsewhere, so CPU users get the memory savings too.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from ._backend import check_backend, resolve_backend
from ._validate import check_float, check_pairing, check_perm, check_same_device, describe, values_checked
from .ops import part_mixup as _ops

__all__ = ["part_mixup_", "part_mixup_pool", "mix_targets", "mix_attributes", "PartMixup", "MixupOutput",
           "MODES", "PAIRINGS"]

MODES = ("binary", "blend", "part")
PAIRINGS = ("flip", "random")


def _check_parts(parts: torch.Tensor) -> None:
    check_float("parts", parts)
    if parts.dim() != 3:
        raise ValueError(f"parts must be [B, P, C], got {describe(parts)}")


def part_mixup_(parts: torch.Tensor, perm: torch.Tensor, mask: torch.Tensor,
                backend: str = "auto") -> torch.Tensor:
    """Part-wise mixup in place: ``parts[b, p] <- m[b, p] parts[b, p] + (1 - m[b, p]) parts[perm[b], p]``.

    ``parts [B, P, C]`` contiguous, ``perm [B]`` an int64 involution (``perm[perm] == arange(B)``; the flip
    ``B-1-b`` or random pairs, a sample paired with itself is left as it is), ``mask [B, P]`` in [0, 1]
    (float or bool). Returns ``parts`` itself, mixed. Differentiable: backward mixes the incoming gradient
    in place and saves only ``perm`` and ``mask``. Every check runs before anything is written.
    """
    _check_parts(parts)
    b, p, _ = parts.shape
    perm, mask = check_pairing(perm, mask, b, p, involution=True, views=False)
    check_same_device(parts=parts, perm=perm, mask=mask)
    if not parts.is_contiguous():
        raise ValueError(f"parts must be contiguous to be mixed in place, got {describe(parts)} with "
                         f"stride {parts.stride()}; call .contiguous() first")
    tracked = parts.requires_grad and torch.is_grad_enabled()
    if tracked and (parts.is_leaf or (parts._base is not None and parts._base.is_leaf)):
        raise RuntimeError("parts is a leaf tensor (or a view of one) that requires grad and cannot be mixed "
                           "in place; mix the output of the layer that produced it, or a clone")
    backend = resolve_backend(backend, parts.device)
    if tracked:
        return _ops.PartMixupInplace.apply(parts, perm, mask, backend)
    torch.ops.c2f.part_mixup_(parts, perm, mask, False, backend)
    return parts


def part_mixup_pool(parts: torch.Tensor, perm: torch.Tensor, mask: torch.Tensor,
                    backend: str = "auto") -> torch.Tensor:
    """Mean over parts of the part-wise mixup, without forming ``[K, B, P, C]``.

    ``parts [B, P, C]``, ``perm [B]`` any int64 permutation, ``mask [K, B, P]`` (returns ``[K, B, C]``) or
    ``[B, P]`` (returns ``[B, C]``) in [0, 1]. Backward gives d parts from ``perm``'s inverse and the mask.
    """
    _check_parts(parts)
    b, p, _ = parts.shape
    perm, mask = check_pairing(perm, mask, b, p, involution=False, views=True)
    check_same_device(parts=parts, perm=perm, mask=mask)
    if p == 0:
        raise ValueError(f"parts has no parts to pool (P = 0): {describe(parts)}")
    backend = resolve_backend(backend, parts.device)
    single = mask.dim() == 2
    out = torch.ops.c2f.part_mixup_pool(parts, perm, mask.unsqueeze(0) if single else mask, backend)
    return out[0] if single else out


def mix_attributes(attrs: torch.Tensor, perm: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attribute targets ``[B, P]`` mixed per part with the same mask: ``[B, P]`` or ``[K, B, P]``."""
    m = mask.to(attrs.dtype)
    return torch.lerp(attrs[perm], attrs, m)


def _check_targets_args(labels, perm, mask, num_classes, smoothing) -> None:
    """``mix_targets``'s arguments, each named with its valid range (values read where validation is on)."""
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
    if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64 or labels.dim() != 1:
        got = describe(labels) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels must be an int64 tensor [B] of class indices, got {got}")
    b = labels.shape[0]
    if not isinstance(mask, torch.Tensor) or mask.dim() not in (2, 3) or mask.shape[-2] != b:
        got = describe(mask) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"mask must be [B={b}, P] or [K, B={b}, P], got {got}")
    check_perm(perm, b, involution=False)
    if b and values_checked(labels):
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= num_classes:
            raise ValueError(f"labels must be class indices in [0, num_classes={num_classes}), got values in "
                             f"[{low}, {high}]")


def mix_targets(labels: torch.Tensor, perm: torch.Tensor, mask: torch.Tensor, num_classes: int,
                part_weights: torch.Tensor | None = None, smoothing: float = 0.0) -> torch.Tensor:
    """Soft class targets of mixed samples: ``[B, num_classes]`` or ``[K, B, num_classes]`` (fp32).

    The weight on ``labels[b]`` is the (``part_weights``-weighted) mean of ``mask[..., b, :]`` over parts;
    the rest goes to ``labels[perm[b]]``. ``smoothing`` spreads that much mass uniformly first.
    """
    _check_targets_args(labels, perm, mask, num_classes, smoothing)
    mask = mask.float()
    if part_weights is None:
        lam = mask.mean(-1)
    else:
        w = part_weights.float()
        if w.shape != mask.shape[-1:]:
            raise ValueError(f"part_weights must be [P={mask.shape[-1]}], got {describe(part_weights)}")
        lam = mask @ w / w.sum()
    keep = 1.0 - smoothing
    targets = torch.full(lam.shape + (num_classes,), smoothing / num_classes, device=lam.device)
    index = labels.expand(lam.shape).unsqueeze(-1)
    targets.scatter_add_(-1, index, (keep * lam).unsqueeze(-1))
    return targets.scatter_add_(-1, labels[perm].expand(lam.shape).unsqueeze(-1), (keep * (1 - lam)).unsqueeze(-1))


# ---------------------------------------------------------------------------------------------- module

class MixupOutput(NamedTuple):
    features: torch.Tensor            # [B, P, C] mixed in place (views == 1) or [views, B, C] pooled
    targets: torch.Tensor             # [B, num_classes] or [views, B, num_classes] soft class targets
    attrs: torch.Tensor | None     # [B, P] or [views, B, P] mixed attribute targets; None without attrs


def _sample_beta(alpha: float, shape: tuple[int, ...], generator: torch.Generator | None,
                 device: torch.device) -> torch.Tensor:
    """Beta(alpha, alpha) draws as a Gamma ratio (fp64, so tiny Gamma draws for small alpha stay nonzero)."""
    conc = torch.full((2,) + shape, float(alpha), dtype=torch.float64, device=device)
    g = torch._standard_gamma(conc, generator=generator)
    total = g[0] + g[1]
    return torch.where(total > 0, g[0] / total.clamp_min(torch.finfo(torch.float64).tiny), 0.5).float()


class PartMixup(nn.Module):
    """Part-wise mixup of part features with soft class targets (and mixed attribute targets).

    ``forward(parts [B, P, C], labels [B], attrs [B, P] = None, generator=None)`` returns ``MixupOutput``:
    with ``views == 1`` the parts mixed in place (``part_mixup_``) and targets ``[B, num_classes]``; with
    ``views > 1`` the K = views mixed samples pooled over parts ``[views, B, C]`` (``part_mixup_pool``) and
    targets ``[views, B, num_classes]``. It always mixes: call it on training batches only.

    Masks, per sample and view, with lambda ~ Beta(alpha, alpha): ``"binary"`` takes each part from the
    sample itself with probability lambda, ``"blend"`` weighs every part by lambda (feature mixup),
    ``"part"`` draws an independent lambda per part. Pairing: ``"flip"`` (b <-> B-1-b) or ``"random"``
    (a random involution). ``sample`` draws exactly what ``forward`` uses, for fused heads.
    """

    def __init__(self, alpha: float = 1.0, mode: str = "binary", views: int = 1, pairing: str = "flip",
                 num_classes: int = 200, label_smoothing: float = 0.0, backend: str = "auto"):
        super().__init__()
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not isinstance(views, int) or views < 1:
            raise ValueError(f"views must be a positive int, got {views!r}")
        if pairing not in PAIRINGS:
            raise ValueError(f"pairing must be one of {PAIRINGS}, got {pairing!r}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        check_backend(backend)
        self.alpha, self.mode, self.views, self.pairing = float(alpha), mode, views, pairing
        self.num_classes, self.label_smoothing, self.backend = num_classes, label_smoothing, backend

    def extra_repr(self) -> str:
        return (f"alpha={self.alpha:g}, mode={self.mode!r}, views={self.views}, pairing={self.pairing!r}, "
                f"num_classes={self.num_classes}, label_smoothing={self.label_smoothing:g}")

    def sample(self, batch_size: int, num_parts: int, device: torch.device | None = None,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Draws ``(perm [B] int64, mask [views, B, P] float32)`` as ``forward`` does, on ``device``.

        Drawn on the generator's device (CPU without one, from torch's default generator) in this order:
        the pairing, the lambdas, the binary mask, so one generator state gives one result anywhere.
        """
        for name, value in (("batch_size", batch_size), ("num_parts", num_parts)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        gen_device = generator.device if generator is not None else torch.device("cpu")
        b, p, v = batch_size, num_parts, self.views
        if self.pairing == "flip":
            perm = torch.arange(b - 1, -1, -1, device=gen_device)
        else:
            order = torch.randperm(b, generator=generator, device=gen_device)
            half = b // 2
            perm = torch.arange(b, device=gen_device)
            perm[order[:half]] = order[half:2 * half]
            perm[order[half:2 * half]] = order[:half]
        if self.mode == "part":
            mask = _sample_beta(self.alpha, (v, b, p), generator, gen_device)
        else:
            lam = _sample_beta(self.alpha, (v, b), generator, gen_device).unsqueeze(-1)
            if self.mode == "blend":
                mask = lam.expand(v, b, p).contiguous()
            else:
                mask = (torch.rand((v, b, p), generator=generator, device=gen_device) < lam).float()
        return perm.to(device or gen_device), mask.to(device or gen_device)

    def forward(self, parts: torch.Tensor, labels: torch.Tensor, attrs: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> MixupOutput:
        _check_parts(parts)
        b, p, _ = parts.shape
        if labels.shape != (b,) or labels.dtype != torch.int64:
            raise ValueError(f"labels must be int64 class indices of shape ({b},), got {describe(labels)}")
        if attrs is not None and tuple(attrs.shape) != (b, p):
            raise ValueError(f"attrs must be [B={b}, P={p}], got {describe(attrs)}")
        perm, mask = self.sample(b, p, parts.device, generator)
        if self.views == 1:
            mask = mask[0]
            features = part_mixup_(parts, perm, mask, backend=self.backend)
        else:
            features = part_mixup_pool(parts, perm, mask, backend=self.backend)
        targets = mix_targets(labels.to(parts.device), perm, mask, self.num_classes,
                              smoothing=self.label_smoothing)
        mixed_attrs = None if attrs is None else mix_attributes(attrs, perm, mask)
        return MixupOutput(features, targets, mixed_attrs)
