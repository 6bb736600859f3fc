"""Mixed precision (issue 12): bf16 and fp16, under torch.autocast and as plain low-precision modules.

The rule is flash-attention's: the fused result's error against the float64 reference is at most twice
the error of the reference module itself run the same way (autocast, or ``.to(dtype)``), plus a small
atol relative to the quantity's scale, for every output and every gradient. Shapes are odd and small:
on a CPU without AVX-512 BF16, bf16 GEMMs are emulated and slow.
"""
import copy

import pytest
import torch

from c2f import nn as cn
from c2f import reference as ref
from c2f.part_mixup import part_mixup_pool
from tests.parity import assert_within_reference_error

LOW = [torch.bfloat16, torch.float16]
ATOL = {torch.bfloat16: 2e-2, torch.float16: 3e-3}
C, P, CLASSES, HW = 72, 7, 5, (7, 7)


def _inputs(kind, b=3, generator_seed=0):
    g = torch.Generator().manual_seed(generator_seed)
    x = torch.randn(b, C, *HW, generator=g)
    if kind == "offset":
        x = x + 1000.0
    elif kind == "near-constant":
        x = 5.0 + 1e-3 * x
        x[1, :, 0, 0] = 2.0
    perm = torch.tensor([2, 1, 0])
    mask = (torch.rand(2, b, P, generator=g) < 0.5).float()
    return x, perm, mask


def _pair(module_cls, fused_cls, heads):
    torch.manual_seed(0)
    reference = module_cls(C, P, CLASSES, heads) if module_cls is ref.C2FHead else module_cls(C, P, heads)
    with torch.no_grad():
        attention = reference.attention if module_cls is ref.C2FHead else reference
        attention.norm.weight.uniform_(0.5, 1.5)
        attention.norm.bias.normal_(0, 0.5)
        attention.queries.normal_(0, 1.0)
    fused = fused_cls(C, P, CLASSES, heads) if module_cls is ref.C2FHead else fused_cls(C, P, heads)
    fused.load_state_dict(reference.state_dict())
    return reference, fused


def _run(module, inputs, grads, autocast_dtype=None, cast_dtype=None):
    """Outputs and parameter gradients of one forward (under autocast, or with module and inputs cast)."""
    module.zero_grad(set_to_none=True)
    if cast_dtype is not None:
        module = module.to(cast_dtype)
        inputs = [t.to(cast_dtype) if t.is_floating_point() and t.dim() == 4 else t for t in inputs]
    with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        out = module(*inputs)
    out = tuple(out)
    torch.autograd.backward(out, [g.to(o.dtype) for g, o in zip(grads, out, strict=True)])
    result = {f"out{i}": o.detach().double() for i, o in enumerate(out)}
    result.update({n: p.grad.detach().double() for n, p in module.named_parameters() if p.grad is not None})
    return result, [o.dtype for o in out]


def _check(reference, fused, inputs, dtype, mode):
    truth_module = copy.deepcopy(reference).double()
    truth_inputs = [t.double() if t.is_floating_point() and t.dim() == 4 else t for t in inputs]
    with torch.no_grad():
        shapes = [o.shape for o in truth_module(*truth_inputs)]
    g = torch.Generator().manual_seed(3)
    grads = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    truth, _ = _run(truth_module, truth_inputs, grads)
    kwargs = dict(autocast_dtype=dtype) if mode == "autocast" else dict(cast_dtype=dtype)
    baseline, ref_dtypes = _run(copy.deepcopy(reference), inputs, grads, **kwargs)
    got, fused_dtypes = _run(copy.deepcopy(fused), inputs, grads, **kwargs)
    assert fused_dtypes == ref_dtypes, f"output dtypes {fused_dtypes}, the reference gives {ref_dtypes}"
    assert set(got) == set(truth)
    for name in truth:
        if name == "k.bias" or name.endswith(".k.bias"):
            continue
        assert_within_reference_error(name, got[name], baseline[name], truth[name], ATOL[dtype])


@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
@pytest.mark.parametrize("mode", ["autocast", "cast"])
@pytest.mark.parametrize("kind", ["plain", "offset", "near-constant"])
@pytest.mark.parametrize("heads", [1, 3])
def test_attention(dtype, mode, kind, heads):
    reference, fused = _pair(ref.PartAttention, cn.PartAttention, heads)
    x, _, _ = _inputs(kind)
    _check(reference, fused, [x], dtype, mode)


@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
@pytest.mark.parametrize("mode", ["autocast", "cast"])
@pytest.mark.parametrize("kind", ["plain", "offset"])
def test_head(dtype, mode, kind):
    reference, fused = _pair(ref.C2FHead, cn.C2FHead, 1)
    x, perm, mask = _inputs(kind)
    _check(reference, fused, [x, perm, mask], dtype, mode)


@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
def test_unfolded_attention_under_autocast(dtype):
    reference, _ = _pair(ref.PartAttention, cn.PartAttention, 8)
    fused = cn.PartAttention(C, P, 8, formulation="unfolded")
    fused.load_state_dict(reference.state_dict())
    x, _, _ = _inputs("plain")
    _check(reference, fused, [x], dtype, "autocast")


@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_pooled_mixup_low_precision(dtype, backend):
    """Plain 16-bit parts: the pooled mean of the mixed views with fp32 mask math."""
    g = torch.Generator().manual_seed(0)
    parts = torch.randn(3, P, C, generator=g)
    perm, mask = torch.tensor([1, 2, 0]), torch.rand(4, 3, P, generator=g)
    grad = torch.randn(4, 3, C, generator=g)
    results = {}
    for name, fn, dt in (("truth", ref.part_mixup_pool, torch.float64), ("baseline", ref.part_mixup_pool, dtype),
                         ("got", lambda *a: part_mixup_pool(*a, backend=backend), dtype)):
        leaf = parts.to(dt).requires_grad_()
        out = fn(leaf, perm, mask)
        out.backward(grad.to(dt))
        results[name] = (out.detach().double(), leaf.grad.double())
    for i, what in enumerate(("pooled", "d parts")):
        assert_within_reference_error(what, results["got"][i], results["baseline"][i], results["truth"][i],
                                      ATOL[dtype])
