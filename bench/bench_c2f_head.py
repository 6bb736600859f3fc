"""The C2F head's full training step: c2f eager, torch.compile(c2f), reference, torch.compile(reference).

Forward + backward of both losses (attribute MSE + soft-target cross-entropy over K mixed views),
x frozen, 1 head. Issue targets (CPU, fp32, B=16, K=4): peak live bytes at most 1/10 of the
reference's, at least 3x faster than both, and peak growing at most 10% from K=1 to K=32; the step
at 0.7 of the machine's GEMM throughput (issue 11). ``torch.compile(c2f)`` traces c2f's registered
custom ops (``torch.ops.c2f.*``); its first call (compile time) is reported apart from its steady
state, and a compile that fails is recorded in the report rather than failing the run.
"""
import pytest
import torch

from bench import algebra
from bench.common import failure_note, head_inputs, record, sweep, zero_grads
from c2f import nn as c2fnn
from c2f import reference
from c2f.losses import attribute_loss, soft_cross_entropy

C, HW, P, CLASSES = 2048, 14, 312, 200
_COMPILED = {}


def _model(impl, device):
    ref = reference.C2FHead(C, P, CLASSES).to(device)
    if impl == "reference":
        return ref
    if impl == "compiled":
        if "head" not in _COMPILED:
            _COMPILED["head"] = torch.compile(ref)
        return _COMPILED["head"]
    fused = c2fnn.C2FHead(C, P, CLASSES).to(device)
    fused.load_state_dict(ref.state_dict())
    if impl == "fused_compiled":
        if "fused" not in _COMPILED:
            _COMPILED["fused"] = torch.compile(fused)
        return _COMPILED["fused"]
    return fused


def _case(benchmark, device, impl, B, K, sweep_name):
    model = _model(impl, device)
    x, attrs, perm, mask, targets = head_inputs(B, C, HW, P, CLASSES, K, device)

    def forward():
        return model(x, perm, mask)

    def step():
        out = forward()
        (attribute_loss(out.attr_pred, attrs) + soft_cross_entropy(out.logits, targets)).backward()

    params = {"B": B, "K": K}
    try:
        record(benchmark, step, name="c2f_head_step", impl=impl, device=device, dtype=x.dtype,
               shapes={"x": list(x.shape), "mask": list(mask.shape)}, params=params,
               sweep=sweep_name, forward=forward, setup=lambda: zero_grads(model),
               minimal=algebra.head(B, C, HW * HW, P, 1, K, CLASSES))
    except Exception as e:
        if impl != "fused_compiled":
            raise
        pytest.xfail(failure_note("c2f_head_step", impl, params, e, "torch.compile(c2f)"))


@pytest.mark.parametrize("impl", ["fused", "fused_compiled", "reference", "compiled"])
def test_head_b16_k4(benchmark, device, impl):
    _case(benchmark, device, impl, 16, 4, "K")


@pytest.mark.parametrize("K", sweep([1, 2, 8, 16, 32], quick_values=[1, 8, 32]))
@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_head_sweep_k(benchmark, device, impl, K):
    if impl == "reference" and K > 16:
        pytest.skip("reference at K=32 needs ~4 GB and ~15 s a step on CPU; the plot stops at 16")
    _case(benchmark, device, impl, 16, K, "K")


@pytest.mark.parametrize("B", sweep([8, 32, 64], quick_values=[8, 32]))
@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_head_sweep_b(benchmark, device, impl, B):
    _case(benchmark, device, impl, B, 4, "B")
