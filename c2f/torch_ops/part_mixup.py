"""Part-wise mixup as torch ops: the torch-op implementation of the contract that
``c2f.kernels.part_mixup`` implements with Triton kernels (same functions and signatures).

In place (docs/design.md, "The algebra" 5): a block of parts of every sample at a time, the block's
partner rows gathered into a bounded scratch (``CHUNK_ELEMS`` values, cache-sized) and one op mixing
the block from it, so each row is read once from memory and written once, nothing of ``[B, P, C]``
size is allocated and no pair loop runs on the host. Pooled (item 6): the K views
are one batched contraction of ``[B, 2K, P]`` weights with the parts.
"""
from __future__ import annotations

import torch

from .._math import inverse_permutation, mixed_views, mixed_views_bwd, pool_matrix

__all__ = ["part_mixup_fwd_", "part_mixup_bwd_", "part_mixup_pool_fwd", "part_mixup_pool_bwd"]

# Elements of the fp32 scratch the in-place mix gathers each block's partner rows into (1 MiB: 2.5% of
# a [16, 312, 2048] fp32 tensor); the pooled backward's gathered gradient rows likewise.
CHUNK_ELEMS = 1 << 18


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _mix_(x: torch.Tensor, perm: torch.Tensor, mask: torch.Tensor, backward: bool) -> None:
    """Mixes ``x [B, P, C]`` in place a block of parts at a time (all samples): the block's partner rows
    ``x[perm, block]`` are gathered into a scratch of ``CHUNK_ELEMS``, then one op reads the block and the
    scratch and writes the block. Each row of x is read once from memory (the second read, by the mix,
    hits the cache) and written once; a sample paired with itself is left exactly as it is.

    Forward: ``F'[b] = lerp(F[perm b], F[b], m[b])``; backward: ``dF[b] = m[b] dY[b] + (1 - m[perm b])
    dY[perm b]``. 16-bit x is widened a block at a time, so the mask math is fp32.
    """
    b, p, c = x.shape
    if x.numel() == 0:
        return
    dt = _compute_dtype(x.dtype)
    rows = max(1, CHUNK_ELEMS // (b * c))
    own = mask.to(dt).unsqueeze(-1)                              # [B, P, 1]: m and 1 - m exact in fp32
    other = (1 - mask[perm]).to(dt).unsqueeze(-1) if backward else None
    widen = x.dtype != dt
    partner_buf = torch.empty(b * rows * c, dtype=dt, device=x.device)
    block_buf = torch.empty(b * rows * c, dtype=dt, device=x.device) if widen else None
    for r0 in range(0, p, rows):
        cols = slice(r0, r0 + rows)
        block = x[:, cols]
        shape = (b, block.shape[1], c)
        src = block_buf[:block.numel()].view(shape).copy_(block) if widen else block
        partner = torch.index_select(src, 0, perm, out=partner_buf[:block.numel()].view(shape))
        if backward:
            torch.addcmul(partner.mul_(other[:, cols]), src, own[:, cols], out=src)
        else:
            torch.lerp(partner, src, own[:, cols], out=src)
        if widen:
            block.copy_(src)


def part_mixup_fwd_(parts: torch.Tensor, perm: torch.Tensor, mask: torch.Tensor) -> None:
    """Mixes ``parts [B, P, C]`` in place: ``parts[b] <- m[b] parts[b] + (1 - m[b]) parts[perm[b]]``
    per part, ``perm [B]`` int64, ``mask [B, P]`` fp32."""
    _mix_(parts, perm, mask, backward=False)


def part_mixup_bwd_(grad: torch.Tensor, perm: torch.Tensor, mask: torch.Tensor) -> None:
    """Turns ``grad [B, P, C]`` of the mixed parts into the gradient of the parts, in place:
    ``d[b] = m[b] grad[b] + (1 - m[perm[b]]) grad[perm[b]]`` (perm an involution)."""
    _mix_(grad, perm, mask, backward=True)


def part_mixup_pool_fwd(parts: torch.Tensor, perm: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[K, B, C]``: the mean over parts of the K mixed views of ``parts [B, P, C]`` (any strides),
    ``perm [B]`` any permutation, ``mask [K, B, P]`` fp32; in the dtype of ``parts``.

    16-bit parts are widened a chunk of samples at a time, so the weights ``m / P`` and ``(1 - m) / P``
    stay fp32 (rounded separately to bf16 they would not sum to 1 / P).
    """
    k = mask.shape[0]
    b, p, c = parts.shape
    dt = _compute_dtype(parts.dtype)
    weights = pool_matrix(mask, inverse_permutation(perm), dt)                    # [B, 2K, P]
    if parts.dtype == dt:
        both = torch.bmm(weights, parts)                                          # [B, 2K, C]
    else:
        both = torch.empty(b, 2 * k, c, dtype=dt, device=parts.device)
        per_chunk = max(1, CHUNK_ELEMS // max(p * c, 1))
        for s in range(0, b, per_chunk):
            js = slice(s, s + per_chunk)
            torch.bmm(weights[js], parts[js].to(dt), out=both[js])
    return mixed_views(both, perm, out=torch.empty(k, b, c, dtype=parts.dtype, device=parts.device))


def part_mixup_pool_bwd(grad: torch.Tensor, perm: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The gradient of the parts ``[B, P, C]`` (in ``dtype``) from ``grad [K, B, C]`` (any strides,
    expanded included), ``perm [B]`` and ``mask [K, B, P]``."""
    k, b, c = grad.shape
    p = mask.shape[-1]
    dt = _compute_dtype(dtype)
    inv = inverse_permutation(perm)
    weights = pool_matrix(mask, inv, dt).transpose(1, 2)                          # [B, P, 2K]
    out = torch.empty((b, p, c), dtype=dtype, device=grad.device)
    per_chunk = max(1, CHUNK_ELEMS // max(2 * k * c, 1))
    for s in range(0, b, per_chunk):
        js = slice(s, s + per_chunk)
        rhs = mixed_views_bwd(grad, inv, dt, js)                                  # [b', 2K, C]
        out[js] = torch.bmm(weights[js], rhs)
    return out
