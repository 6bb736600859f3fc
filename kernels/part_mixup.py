"""Part-wise mixup kernels: in place on the part features, and fused with the mean over parts.

Mixed sample b takes part p as ``m[b,p] * F[b,p] + (1 - m[b,p]) * F[perm[b],p]`` (docs/design.md, "The algebra"
items 5 and 6).

- In place (``perm`` an involution): one program per (pair, part block, channel block) owns both rows of
  the pair ``b < perm[b]``, reads each once and writes each once; ``b == perm[b]`` is a no-op and
  ``b > perm[b]`` is its partner's job, so no program reads a row another program writes. The backward
  is the transposed 2 x 2 mix on the incoming gradient, in place:
  ``dF[b] = m[b] dY[b] + (1 - m[perm b]) dY[perm b]``.
- Pooled (any permutation):
  ``pooled[k,b] = (1/P) sum_p m[k,b,p] F[b,p] + (1 - m[k,b,p]) F[perm b,p]``, one program per (sample,
  channel block, view block) contracting the masks with part chunks of both samples, so ``[K, B, P, C]``
  never exists. The backward writes ``d parts`` once from ``d pooled`` and the inverse permutation:
  ``dF[j,p] = (1/P) sum_k m[k,j,p] G[k,j] + (1 - m[k,i,p]) G[k,i]`` with ``i = perm^-1[j]``.

The launchers (the Triton side of the contract ``c2f.torch_ops.part_mixup`` implements with torch ops)
check shapes and layouts; the semantic checks (involution, mask range) live in ``c2f._validate``,
shared with the torch-op path.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._math import inverse_permutation
from . import targets
from .common import F32, check, check_dims, check_perm, describe, make_plans
from .dots import mma, round_operand
from .launch import launch
from .plans_part_mixup import mixup_pairs, mixup_pool_bwd, mixup_pool_fwd

OP = "part mixup"


@triton.jit
def _mix_pair_tile(
    X_ptr,                      # [B, P, C] parts (forward) or their gradient (backward), mixed in place
    Perm_ptr,                   # [B] int64 involution
    M_ptr,                      # [B, P] fp32 mask
    P, C,
    stride_xb, stride_xp,
    stride_mb,
    BACKWARD: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    a = tl.program_id(0).to(tl.int64)
    c = tl.load(Perm_ptr + a)
    if a < c:
        offs_p = (tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)
        offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        p_ok = offs_p < P
        tile_ok = p_ok[:, None] & (offs_c[None, :] < C)
        m_a = tl.load(M_ptr + a * stride_mb + offs_p, mask=p_ok, other=0.0)[:, None]
        m_c = tl.load(M_ptr + c * stride_mb + offs_p, mask=p_ok, other=0.0)[:, None]
        tile = offs_p[:, None] * stride_xp + offs_c[None, :]
        xa_ptrs = X_ptr + a * stride_xb + tile
        xc_ptrs = X_ptr + c * stride_xb + tile
        x_a = tl.load(xa_ptrs, mask=tile_ok, other=0.0).to(tl.float32)
        x_c = tl.load(xc_ptrs, mask=tile_ok, other=0.0).to(tl.float32)
        # Forward rows of the pair's 2 x 2 mix: [[m_a, 1 - m_a], [1 - m_c, m_c]]; backward is its transpose.
        if BACKWARD:
            y_a = m_a * x_a + (1.0 - m_c) * x_c
            y_c = (1.0 - m_a) * x_a + m_c * x_c
        else:
            y_a = m_a * x_a + (1.0 - m_a) * x_c
            y_c = (1.0 - m_c) * x_a + m_c * x_c
        tl.store(xa_ptrs, y_a.to(X_ptr.dtype.element_ty), mask=tile_ok)
        tl.store(xc_ptrs, y_c.to(X_ptr.dtype.element_ty), mask=tile_ok)


@triton.jit
def _part_mixup_fwd_kernel(
    X_ptr,                      # [B, P, C] parts, mixed in place
    Perm_ptr,                   # [B] int64 involution
    M_ptr,                      # [B, P] fp32 mask
    P, C,
    stride_xb, stride_xp,
    stride_mb,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    _mix_pair_tile(X_ptr, Perm_ptr, M_ptr, P, C, stride_xb, stride_xp, stride_mb,
                   False, BLOCK_P, BLOCK_C)


@triton.jit
def _part_mixup_bwd_kernel(
    X_ptr,                      # [B, P, C] gradient of the mixed parts, turned into d parts in place
    Perm_ptr,                   # [B] int64 involution
    M_ptr,                      # [B, P] fp32 mask
    P, C,
    stride_xb, stride_xp,
    stride_mb,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    _mix_pair_tile(X_ptr, Perm_ptr, M_ptr, P, C, stride_xb, stride_xp, stride_mb,
                   True, BLOCK_P, BLOCK_C)


@triton.jit
def _mask_dot(m, f, acc, PRECISION: tl.constexpr, SPLIT: tl.constexpr):
    """``acc + m @ f`` with the fp32 mask ``m`` exact to 2^-18: for 16-bit parts (``SPLIT``) ``m`` goes to
    the dot as two 16-bit pieces, ``hi = round(m)`` and ``lo = round(m - hi)``, both multiplied at the
    16-bit rate; fp32 parts multiply it at ``PRECISION`` (fp32-accurate)."""
    if SPLIT:
        hi = round_operand(m, PRECISION)
        lo = round_operand(m - hi.to(tl.float32), PRECISION)
        acc = mma(hi, f, acc, PRECISION)
        return mma(lo, f, acc, PRECISION)
    else:
        return mma(m, f, acc, PRECISION)


@triton.jit(do_not_specialize=["K"])
def _part_mixup_pool_fwd_kernel(
    F_ptr,                      # [B, P, C] parts
    Perm_ptr,                   # [B] int64 permutation
    M_ptr,                      # [K, B, P] fp32 masks
    Out_ptr,                    # [K, B, C] pooled mixed features
    K, P, C,
    stride_fb, stride_fp, stride_fc,
    stride_mk, stride_mb,
    stride_ok, stride_ob,
    inv_P,                      # 1 / P
    PRECISION: tl.constexpr,    # dots.mma precision: the parts' own 16-bit dtype, or fp32-accurate
    SPLIT: tl.constexpr,        # 16-bit parts: the mask as two 16-bit pieces (_mask_dot)
    BLOCK_K: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_k = (tl.program_id(2) * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
    pb = tl.load(Perm_ptr + b)
    c_ok = offs_c < C
    k_ok = offs_k < K
    f_cols = offs_c[None, :].to(tl.int64) * stride_fc
    acc = tl.zeros([BLOCK_K, BLOCK_C], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        offs_p = (p0 + tl.arange(0, BLOCK_P)).to(tl.int64)
        p_ok = offs_p < P
        tile_ok = p_ok[:, None] & c_ok[None, :]
        rows = offs_p[:, None] * stride_fp + f_cols
        f_b = round_operand(tl.load(F_ptr + b * stride_fb + rows, mask=tile_ok, other=0.0), PRECISION)
        f_pb = round_operand(tl.load(F_ptr + pb * stride_fb + rows, mask=tile_ok, other=0.0), PRECISION)
        m = tl.load(M_ptr + offs_k[:, None] * stride_mk + b * stride_mb + offs_p[None, :],
                    mask=k_ok[:, None] & p_ok[None, :], other=0.0)
        # Two products of stored values (not one of F[b] - F[perm b]): 16-bit parts stay exact, and
        # m and 1 - m are both fp32 values, so the weights of a part sum to 1 (not so if each were
        # rounded to bf16 on its own: up to 2^-9 off).
        acc = _mask_dot(m, f_b, acc, PRECISION, SPLIT)
        acc = _mask_dot(1.0 - m, f_pb, acc, PRECISION, SPLIT)
    out_ptrs = Out_ptr + offs_k[:, None] * stride_ok + b * stride_ob + offs_c[None, :]
    tl.store(out_ptrs, (acc * inv_P).to(Out_ptr.dtype.element_ty), mask=k_ok[:, None] & c_ok[None, :])


@triton.jit(do_not_specialize=["K"])
def _part_mixup_pool_bwd_kernel(
    G_ptr,                      # [K, B, C] gradient of the pooled features
    Inv_ptr,                    # [B] int64 inverse permutation
    M_ptr,                      # [K, B, P] fp32 masks
    DF_ptr,                     # [B, P, C] gradient of the parts
    K, P, C,
    stride_gk, stride_gb, stride_gc,
    stride_mk, stride_mb,
    stride_db, stride_dp,
    inv_P,                      # 1 / P
    PRECISION: tl.constexpr,    # dots.mma precision: the gradient's own 16-bit dtype, or fp32-accurate
    SPLIT: tl.constexpr,        # 16-bit gradient: the mask as two 16-bit pieces (_mask_dot)
    BLOCK_K: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    j = tl.program_id(0).to(tl.int64)
    offs_p = (tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)
    offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    i = tl.load(Inv_ptr + j)    # the sample paired with j: its views took (1 - m) of F[j]
    p_ok = offs_p < P
    c_ok = offs_c < C
    g_cols = offs_c[None, :].to(tl.int64) * stride_gc
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        k_ok = offs_k < K
        m_rows = offs_k[None, :] * stride_mk + offs_p[:, None]
        m_ok = p_ok[:, None] & k_ok[None, :]
        m_j = tl.load(M_ptr + j * stride_mb + m_rows, mask=m_ok, other=0.0)
        m_i = tl.load(M_ptr + i * stride_mb + m_rows, mask=m_ok, other=1.0)
        g_rows = offs_k[:, None] * stride_gk + g_cols
        g_ok = k_ok[:, None] & c_ok[None, :]
        g_j = round_operand(tl.load(G_ptr + j * stride_gb + g_rows, mask=g_ok, other=0.0), PRECISION)
        g_i = round_operand(tl.load(G_ptr + i * stride_gb + g_rows, mask=g_ok, other=0.0), PRECISION)
        acc = _mask_dot(m_j, g_j, acc, PRECISION, SPLIT)
        acc = _mask_dot(1.0 - m_i, g_i, acc, PRECISION, SPLIT)
    df_ptrs = DF_ptr + j * stride_db + offs_p[:, None] * stride_dp + offs_c[None, :]
    tl.store(df_ptrs, (acc * inv_P).to(DF_ptr.dtype.element_ty), mask=p_ok[:, None] & c_ok[None, :])


def _check_mix(name: str, x: torch.Tensor, perm, mask, mask_shape: tuple, in_place: bool) -> None:
    """Layouts of a mix's other arguments, ``x`` being a tensor already: ``x`` contiguous when mixed
    ``in_place``, ``perm`` int64 ``[B]``, ``mask`` fp32 of ``mask_shape`` with unit stride along P, all on
    x's device."""
    if in_place and not x.is_contiguous():
        raise ValueError(f"{name} must be contiguous to be mixed in place, got {describe(x)}")
    check_perm(perm, mask_shape[-2], x.device)
    check("mask", mask, mask_shape, F32, x.device, unit_stride=True)


def _mix_in_place(kernel, name: str, x, perm, mask) -> None:
    """Checks and launches an in-place mix of ``x [B, P, C]`` (``kernel``: forward or backward)."""
    b, p, c = check_dims(name, x, "[B, P, C]")
    _check_mix(name, x, perm, mask, (b, p), in_place=True)
    target = targets.current(x.device)
    plan = make_plans(lambda: mixup_pairs(b, p, c, x.dtype, target), OP, x, target, name=name)
    if x.numel() == 0:
        return
    launch(kernel, plan, X_ptr=x, Perm_ptr=perm, M_ptr=mask, P=p, C=c, stride_xb=x.stride(0),
           stride_xp=x.stride(1), stride_mb=mask.stride(0))


def part_mixup_fwd_(parts: torch.Tensor, perm: torch.Tensor, mask: torch.Tensor) -> None:
    """Mixes ``parts [B, P, C]`` in place by the involution ``perm [B]`` and ``mask [B, P]`` (fp32)."""
    _mix_in_place(_part_mixup_fwd_kernel, "parts", parts, perm, mask)


def part_mixup_bwd_(grad: torch.Tensor, perm: torch.Tensor, mask: torch.Tensor) -> None:
    """Turns ``grad [B, P, C]`` of the mixed parts into the gradient of the parts, in place."""
    _mix_in_place(_part_mixup_bwd_kernel, "grad", grad, perm, mask)


def part_mixup_pool_fwd(parts: torch.Tensor, perm: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over parts of the K mixed views: ``parts [B, P, C]`` (any strides), ``perm [B]`` a permutation,
    ``mask [K, B, P]`` fp32; returns ``[K, B, C]`` in the dtype of ``parts``."""
    b, p, c = check_dims("parts", parts, "[B, P, C]")
    k, _, _ = check_dims("mask", mask, "[K, B, P]")
    _check_mix("parts", parts, perm, mask, (k, b, p), in_place=False)
    target = targets.current(parts.device)
    plan = make_plans(lambda: mixup_pool_fwd(k, b, p, c, parts.dtype, target), OP, parts, target, name="parts")
    out = torch.empty((k, b, c), device=parts.device, dtype=parts.dtype)
    if out.numel() == 0 or p == 0:
        return out.zero_() if p == 0 else out
    launch(_part_mixup_pool_fwd_kernel, plan,
           F_ptr=parts, Perm_ptr=perm, M_ptr=mask, Out_ptr=out, K=k, P=p, C=c,
           stride_fb=parts.stride(0), stride_fp=parts.stride(1), stride_fc=parts.stride(2),
           stride_mk=mask.stride(0), stride_mb=mask.stride(1), stride_ok=out.stride(0), stride_ob=out.stride(1),
           inv_P=1.0 / p)
    return out


def part_mixup_pool_bwd(grad: torch.Tensor, perm: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Gradient of the parts ``[B, P, C]`` (in ``dtype``) from ``grad [K, B, C]`` (any strides, expanded
    included), the permutation ``perm [B]`` and ``mask [K, B, P]`` fp32."""
    k, b, c = check_dims("grad", grad, "[K, B, C]")
    p = check_dims("mask", mask, "[K, B, P]")[2]
    _check_mix("grad", grad, perm, mask, (k, b, p), in_place=False)
    target = targets.current(grad.device)
    plan = make_plans(lambda: mixup_pool_bwd(k, b, p, c, grad.dtype, target), OP, grad, target, name="grad")
    out = torch.empty((b, p, c), device=grad.device, dtype=dtype)
    if out.numel() == 0:
        return out
    if k == 0:
        return out.zero_()
    inv = inverse_permutation(perm)   # the sample paired with j took (1 - m) of F[j] in its views
    launch(_part_mixup_pool_bwd_kernel, plan,
           G_ptr=grad, Inv_ptr=inv, M_ptr=mask, DF_ptr=out, K=k, P=p, C=c,
           stride_gk=grad.stride(0), stride_gb=grad.stride(1), stride_gc=grad.stride(2),
           stride_mk=mask.stride(0), stride_mb=mask.stride(1), stride_db=out.stride(0), stride_dp=out.stride(1),
           inv_P=1.0 / p)
    return out
