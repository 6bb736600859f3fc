"""Part-wise mixup without copies: in place on the part features, fused with the mean over parts, and
the ``PartMixup`` module that draws pairings and masks.

``part_mixup_`` and ``part_mixup_pool`` compute ``c2f.reference.part_mixup`` (and its mean over parts)
with the algebra of DESIGN.md items 5 and 6: Triton kernels on CUDA (or under the interpreter with
``backend="triton"``), torch ops implementing the same in-place and pooled forms elsewhere, so CPU users
get the memory savings too.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import nn

from ._backend import load_kernels, resolve_backend
from ._validate import check_float, check_same_device, describe
from .reference import mix_attributes, mix_targets

__all__ = ["part_mixup_", "part_mixup_pool", "mix_targets", "mix_attributes", "PartMixup", "MixupOutput"]

# Torch-op path: elements per chunk of temporaries. The in-place mix copies one chunk of a row (1 MiB in
# fp32, 2.5% of a [16, 312, 2048] tensor, L2-sized); the pooled backward's gathered gradient rows likewise.
CHUNK_ELEMS = 1 << 18

MODES = ("binary", "blend", "part")
PAIRINGS = ("flip", "random")


# ---------------------------------------------------------------------------------------------- checks

def _check_parts(parts: torch.Tensor) -> None:
    check_float("parts", parts)
    if parts.dim() != 3:
        raise ValueError(f"parts must be [B, P, C], got {describe(parts)}")


def _check_perm(perm: torch.Tensor, b: int, involution: bool) -> None:
    if not isinstance(perm, torch.Tensor) or perm.dtype != torch.int64 or perm.shape != (b,):
        got = describe(perm) if isinstance(perm, torch.Tensor) else type(perm).__name__
        raise ValueError(f"perm must be an int64 tensor of shape ({b},), got {got}")
    if b == 0:
        return
    if int(perm.min()) < 0 or int(perm.max()) >= b:
        raise ValueError(f"perm must hold sample indices in [0, {b}), got values in "
                         f"[{int(perm.min())}, {int(perm.max())}]")
    if involution:
        if not torch.equal(perm[perm], torch.arange(b, device=perm.device)):
            raise ValueError("perm must be an involution (perm[perm] == arange(B)) to mix in place: each "
                             "pair is mixed by one program; use part_mixup_pool or the reference "
                             "part_mixup for other permutations")
    elif not bool((torch.bincount(perm, minlength=b) == 1).all()):
        raise ValueError(f"perm must be a permutation of range({b}) (every sample exactly once)")


def _check_mask(mask: torch.Tensor, shapes: tuple[tuple[int, ...], ...], what: str) -> torch.Tensor:
    """Validates ``mask`` and returns it as fp32 with unit stride along parts (a no-op when it already is)."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if tuple(mask.shape) not in shapes:
        raise ValueError(f"mask must be {what}, got {describe(mask)}")
    if not (mask.dtype.is_floating_point or mask.dtype == torch.bool):
        raise TypeError(f"mask must be a float or bool tensor, got {describe(mask)}")
    if mask.requires_grad:
        raise ValueError("mask requires grad, but part-wise mixup gives no gradient to the mask (masks are "
                         "sampled): pass mask.detach()")
    mask = mask.float()
    if mask.numel() and not bool(((mask >= 0) & (mask <= 1)).all()):
        raise ValueError(f"mask values must lie in [0, 1], got min {mask.min().item():g}, "
                         f"max {mask.max().item():g} (NaN counts as outside)")
    return mask if mask.stride(-1) == 1 else mask.contiguous()


# --------------------------------------------------------------------------------- in place, torch ops

def _mix_pairs_torch_(x: torch.Tensor, perm: torch.Tensor, mask: torch.Tensor, backward: bool) -> None:
    """Mixes every pair (a, c = perm[a]), a < c, of ``x [B, P, C]`` in place, a chunk of parts at a time.

    Forward rows of a pair's 2 x 2 mix are ``[[m_a, 1 - m_a], [1 - m_c, m_c]]`` (two lerps); backward uses
    the transpose. The rows are views of ``x``; the only temporary is one chunk-sized copy of row a, reused.
    """
    b, p, c = x.shape
    first = (torch.arange(b, device=perm.device) < perm).nonzero().squeeze(1)
    if first.numel() == 0 or x.numel() == 0:
        return
    second = perm[first]
    m_a, m_c = mask[first].unsqueeze(-1).to(x.dtype), mask[second].unsqueeze(-1).to(x.dtype)  # [pairs, P, 1]
    step = max(1, CHUNK_ELEMS // max(c, 1))
    buffer = x.new_empty((min(step, p), c))
    for i, (a, cc) in enumerate(zip(first.tolist(), second.tolist())):
        for s in range(0, p, step):
            rows = slice(s, s + step)
            x_a, x_c = x[a, rows], x[cc, rows]
            old_a = buffer[:x_a.shape[0]].copy_(x_a)
            if backward:
                x_a.mul_(m_a[i, rows]).addcmul_(x_c, 1 - m_c[i, rows])
                x_c.mul_(m_c[i, rows]).addcmul_(old_a, 1 - m_a[i, rows])
            else:
                x_a.lerp_(x_c, 1 - m_a[i, rows])
                x_c.lerp_(old_a, 1 - m_c[i, rows])


def _mix_pairs_(x: torch.Tensor, perm: torch.Tensor, mask: torch.Tensor, backward: bool, backend: str) -> None:
    if backend == "triton":
        kernels = load_kernels("part_mixup")
        (kernels.part_mixup_bwd_ if backward else kernels.part_mixup_fwd_)(x, perm, mask)
    else:
        _mix_pairs_torch_(x, perm, mask, backward)


def _owns_storage(t: torch.Tensor) -> bool:
    """True when nothing but autograd's buffer references ``t`` and it fills its storage densely.

    A gradient can be shared (a user's ``backward(grad)``, add's backward handing one tensor to both
    inputs): mixing it in place would corrupt the other reader, so such gradients are copied first.
    """
    use_count = getattr(t, "_use_count", None)
    return (use_count is not None and use_count() == 1 and t.is_contiguous() and t.storage_offset() == 0
            and t.untyped_storage().nbytes() == t.numel() * t.element_size())


class _PartMixupInplace(torch.autograd.Function):
    @staticmethod
    def forward(ctx, parts, perm, mask, backend):
        _mix_pairs_(parts, perm, mask, backward=False, backend=backend)
        ctx.mark_dirty(parts)
        # Only perm and the [B, P] mask: the mix is linear, its backward mixes the gradient in place.
        ctx.save_for_backward(perm, mask)
        ctx.backend = backend
        return parts

    @staticmethod
    def backward(ctx, grad):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        perm, mask = ctx.saved_tensors
        if not _owns_storage(grad):
            grad = grad.clone(memory_format=torch.contiguous_format)
        _mix_pairs_(grad, perm, mask, backward=True, backend=ctx.backend)
        return grad, None, None, None


def part_mixup_(parts: torch.Tensor, perm: torch.Tensor, mask: torch.Tensor,
                backend: str = "auto") -> torch.Tensor:
    """Part-wise mixup in place: ``parts[b, p] <- m[b, p] parts[b, p] + (1 - m[b, p]) parts[perm[b], p]``.

    ``parts [B, P, C]`` contiguous, ``perm [B]`` an int64 involution (``perm[perm] == arange(B)``; the flip
    ``B-1-b`` or random pairs, a sample paired with itself is left as it is), ``mask [B, P]`` in [0, 1].
    Returns ``parts`` itself, mixed. Differentiable: backward mixes the incoming gradient in place and
    saves only ``perm`` and ``mask``. Every check runs before anything is written.
    """
    _check_parts(parts)
    b, p, _ = parts.shape
    if isinstance(mask, torch.Tensor) and mask.dim() == 3:
        raise ValueError(f"part_mixup_ mixes one view in place and takes mask [B={b}, P={p}], got "
                         f"{describe(mask)}; use part_mixup_pool for K views")
    mask = _check_mask(mask, ((b, p),), f"[B={b}, P={p}]")
    _check_perm(perm, b, involution=True)
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
        return _PartMixupInplace.apply(parts, perm, mask, backend)
    _mix_pairs_(parts, perm, mask, backward=False, backend=backend)
    # Kernel stores do not bump the version counter: an op that saved parts must still see the change.
    torch.autograd.graph.increment_version(parts)
    return parts


# ---------------------------------------------------------------------------------------------- pooled

def _inverse(perm: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return inv


def _pool_weights(mask: torch.Tensor, inv: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[B, 2K, P]``: row k of sample j weighs F[j] for its own view k, row K + k weighs F[j] for view k
    of the sample paired with j (``inv[j]``), both divided by P."""
    p = mask.shape[-1]
    own = mask.transpose(0, 1)
    partner = (1 - mask[:, inv]).transpose(0, 1)
    return (torch.cat([own, partner], 1) / p).to(dtype)


def _pool_fwd_torch(parts: torch.Tensor, perm: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    k = mask.shape[0]
    both = torch.bmm(_pool_weights(mask, _inverse(perm), parts.dtype), parts)    # [B, 2K, C]
    out = torch.empty((k,) + both.shape[::2], dtype=parts.dtype, device=parts.device)
    return torch.add(both[:, :k].transpose(0, 1), both[perm, k:].transpose(0, 1), out=out)


def _pool_bwd_torch(grad: torch.Tensor, inv: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    k, b, c = grad.shape
    p = mask.shape[-1]
    weights = _pool_weights(mask, inv, dtype).transpose(1, 2)                     # [B, P, 2K]
    out = torch.empty((b, p, c), dtype=dtype, device=grad.device)
    per_chunk = max(1, CHUNK_ELEMS // (2 * k * c))
    for s in range(0, b, per_chunk):
        js = slice(s, s + per_chunk)
        rhs = torch.cat([grad[:, js], grad[:, inv[js]]], 0).transpose(0, 1).to(dtype)   # [b', 2K, C]
        torch.bmm(weights[js], rhs, out=out[js])
    return out


class _PartMixupPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, parts, perm, mask, backend):
        if backend == "triton":
            out = load_kernels("part_mixup").part_mixup_pool_fwd(parts, perm, mask)
        else:
            out = _pool_fwd_torch(parts, perm, mask)
        # perm and the [K, B, P] mask only: d parts is linear in d pooled and needs no parts.
        ctx.save_for_backward(perm, mask)
        ctx.backend, ctx.dtype = backend, parts.dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        perm, mask = ctx.saved_tensors
        inv = _inverse(perm)
        if ctx.backend == "triton":
            dparts = load_kernels("part_mixup").part_mixup_pool_bwd(grad, inv, mask, ctx.dtype)
        else:
            dparts = _pool_bwd_torch(grad, inv, mask, ctx.dtype)
        return dparts, None, None, None


def part_mixup_pool(parts: torch.Tensor, perm: torch.Tensor, mask: torch.Tensor,
                    backend: str = "auto") -> torch.Tensor:
    """Mean over parts of the part-wise mixup, without forming ``[K, B, P, C]``.

    ``parts [B, P, C]``, ``perm [B]`` any int64 permutation, ``mask [K, B, P]`` (returns ``[K, B, C]``) or
    ``[B, P]`` (returns ``[B, C]``) in [0, 1]. Backward gives d parts from ``perm``'s inverse and the mask.
    """
    _check_parts(parts)
    b, p, _ = parts.shape
    shapes = ((b, p),) + (((mask.shape[0], b, p),) if isinstance(mask, torch.Tensor) and mask.dim() == 3 else ())
    mask = _check_mask(mask, shapes, f"[K, B={b}, P={p}] or [B={b}, P={p}]")
    _check_perm(perm, b, involution=False)
    check_same_device(parts=parts, perm=perm, mask=mask)
    if p == 0:
        raise ValueError(f"parts has no parts to pool (P = 0): {describe(parts)}")
    backend = resolve_backend(backend, parts.device)
    single = mask.dim() == 2
    out = _PartMixupPool.apply(parts, perm, mask.unsqueeze(0) if single else mask, backend)
    return out[0] if single else out


# ---------------------------------------------------------------------------------------------- module

class MixupOutput(NamedTuple):
    features: torch.Tensor            # [B, P, C] mixed in place (views == 1) or [views, B, C] pooled
    targets: torch.Tensor             # [B, num_classes] or [views, B, num_classes] soft class targets
    attrs: Optional[torch.Tensor]     # [B, P] or [views, B, P] mixed attribute targets; None without attrs


def _sample_beta(alpha: float, shape: tuple[int, ...], generator: Optional[torch.Generator],
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
        self.alpha, self.mode, self.views, self.pairing = float(alpha), mode, views, pairing
        self.num_classes, self.label_smoothing, self.backend = num_classes, label_smoothing, backend

    def extra_repr(self) -> str:
        return (f"alpha={self.alpha:g}, mode={self.mode!r}, views={self.views}, pairing={self.pairing!r}, "
                f"num_classes={self.num_classes}, label_smoothing={self.label_smoothing:g}")

    def sample(self, batch_size: int, num_parts: int, device: Optional[torch.device] = None,
               generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Draws ``(perm [B] int64, mask [views, B, P] float32)`` as ``forward`` does, on ``device``.

        Drawn on the generator's device (CPU without one, from torch's default generator) in this order:
        the pairing, the lambdas, the binary mask, so one generator state gives one result anywhere.
        """
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

    def forward(self, parts: torch.Tensor, labels: torch.Tensor, attrs: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None) -> MixupOutput:
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
