"""Part-wise mixup as registered custom ops: ``torch.ops.c2f.part_mixup_`` (in place, mutating its
first argument) and ``torch.ops.c2f.part_mixup_pool`` (with its backward), with fake implementations.

Both mixes are linear (docs/design.md, "The algebra" 5-6), so their backwards are mixes too and twice
differentiable: the pooled backward's own gradient is the pooled forward, and the in-place
backward, under ``create_graph=True``, runs as differentiable torch ops.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from ._common import implementation

# -------------------------------------------------------------------------------------- in place

@torch.library.custom_op("c2f::part_mixup_", mutates_args=("x",))
def part_mixup_inplace(x: Tensor, perm: Tensor, mask: Tensor, backward: bool, backend: str) -> None:
    """Mixes ``x [B, P, C]`` in place (``backward``: the transposed mix, for gradients)."""
    impl = implementation("part_mixup", backend)
    (impl.part_mixup_bwd_ if backward else impl.part_mixup_fwd_)(x, perm, mask)


@part_mixup_inplace.register_fake
def _(x, perm, mask, backward, backend):
    return None


def _storage_is_private(t: Tensor) -> bool:
    """True only when ``t`` provably owns its storage: nothing else references the tensor (autograd's
    buffer aside), no other tensor (a view, a tensor it is a view of) shares the storage, and it fills
    the storage densely. A gradient that arrived through ``view``/``reshape``/``permute`` shares its
    storage with the gradient it was made from, which another branch of the graph may still read."""
    use_count = getattr(t, "_use_count", None)
    storage_use_count = getattr(torch._C, "_storage_Use_Count", None)
    if use_count is None or storage_use_count is None or use_count() != 1:
        return False
    if not (t.is_contiguous() and t.storage_offset() == 0):
        return False
    storage = t.untyped_storage()
    # One reference from t itself and one from the ``storage`` wrapper held here.
    return storage.nbytes() == t.numel() * t.element_size() and storage_use_count(storage._cdata) == 2


def mix_transposed(grad: Tensor, perm: Tensor, mask: Tensor) -> Tensor:
    """``d[b] = m[b] grad[b] + (1 - m[perm b]) grad[perm b]`` as differentiable torch ops (double backward)."""
    m = mask.to(grad.dtype).unsqueeze(-1)
    return m * grad + (1 - m[perm]) * grad[perm]


class PartMixupInplace(torch.autograd.Function):
    """Autograd of the in-place mix: saves only ``perm`` and the ``[B, P]`` mask; backward mixes the
    incoming gradient in place when it provably owns its storage, else a copy of it."""

    @staticmethod
    def forward(ctx, parts, perm, mask, backend):
        torch.ops.c2f.part_mixup_(parts, perm, mask, False, backend)
        ctx.mark_dirty(parts)
        ctx.save_for_backward(perm, mask)
        ctx.backend = backend
        return parts

    @staticmethod
    def backward(ctx, grad):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        perm, mask = ctx.saved_tensors
        if torch.is_grad_enabled():      # create_graph=True: keep the graph of the (linear) mix
            return mix_transposed(grad, perm, mask), None, None, None
        # Under torch.compile the graph is functionalised: mix a copy and let the compiler reuse buffers.
        if torch.compiler.is_compiling() or not _storage_is_private(grad):
            grad = grad.clone(memory_format=torch.contiguous_format)
        torch.ops.c2f.part_mixup_(grad, perm, mask, True, ctx.backend)
        return grad, None, None, None


# ------------------------------------------------------------------------------------------ pooled

@torch.library.custom_op("c2f::part_mixup_pool", mutates_args=())
def part_mixup_pool(parts: Tensor, perm: Tensor, mask: Tensor, backend: str) -> Tensor:
    """``[K, B, C]``: the mean over parts of the K mixed views of ``parts [B, P, C]``."""
    return implementation("part_mixup", backend).part_mixup_pool_fwd(parts, perm, mask)


@part_mixup_pool.register_fake
def _(parts, perm, mask, backend):
    return parts.new_empty(mask.shape[0], parts.shape[0], parts.shape[2])


@torch.library.custom_op("c2f::part_mixup_pool_backward", mutates_args=())
def part_mixup_pool_backward(grad: Tensor, perm: Tensor, mask: Tensor, dtype: torch.dtype, backend: str) -> Tensor:
    """``[B, P, C]`` in ``dtype``: the gradient of the parts from ``grad [K, B, C]``."""
    return implementation("part_mixup", backend).part_mixup_pool_bwd(grad, perm, mask, dtype)


@part_mixup_pool_backward.register_fake
def _(grad, perm, mask, dtype, backend):
    return grad.new_empty(grad.shape[1], mask.shape[2], grad.shape[2], dtype=dtype)


def _pool_setup(ctx, inputs, output):
    parts, perm, mask, backend = inputs
    # perm and the [K, B, P] mask only: d parts is linear in d pooled and needs no parts.
    ctx.save_for_backward(perm, mask)
    ctx.backend, ctx.dtype = backend, parts.dtype


def _pool_backward(ctx, grad):
    if not ctx.needs_input_grad[0]:
        return None, None, None, None
    perm, mask = ctx.saved_tensors
    return torch.ops.c2f.part_mixup_pool_backward(grad, perm, mask, ctx.dtype, ctx.backend), None, None, None


def _pool_backward_setup(ctx, inputs, output):
    grad, perm, mask, dtype, backend = inputs
    ctx.save_for_backward(perm, mask)
    ctx.backend, ctx.dtype = backend, grad.dtype


def _pool_backward_backward(ctx, ggrad):
    perm, mask = ctx.saved_tensors
    # The backward is linear in grad: its adjoint is the pooled forward itself.
    return torch.ops.c2f.part_mixup_pool(ggrad.to(ctx.dtype), perm, mask, ctx.backend), None, None, None, None


part_mixup_pool.register_autograd(_pool_backward, setup_context=_pool_setup)
part_mixup_pool_backward.register_autograd(_pool_backward_backward, setup_context=_pool_backward_setup)


# FlopCounterMode sees a custom op as one call: the pooled mix is a [B, 2K, P] x [P, C] contraction per
# sample (forward and backward); the in-place mix is elementwise, which is not counted (as for aten ops).
@register_flop_formula([torch.ops.c2f.part_mixup_pool, torch.ops.c2f.part_mixup_pool_backward])
def _(first, perm, mask, *args, out_shape=None, **kwargs):
    k, b, p = mask
    c = first[-1]
    return 2 * b * 2 * k * p * c
