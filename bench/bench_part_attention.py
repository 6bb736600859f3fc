"""Part attention, fused vs reference vs torch.compile(reference): forward + backward, x frozen.

Upstream gradients on both outputs (parts and attn), created before the step so they are inputs,
not measured allocations. Issue targets (CPU, fp32, B=16): 1 head >= 3x faster than both and at
most 1/3 of the reference's peak; 16 heads no slower and at most 1/2 of its peak.
"""
import pytest
import torch

from bench import algebra
from bench.common import B_SWEEP, record, sweep, zero_grads
from c2f import reference
from c2f.part_attention import PartAttention, pick_formulation

C, HW, P = 2048, 14, 312
_COMPILED = {}


def _models(heads, impl, device):
    ref = reference.PartAttention(C, P, heads).to(device)
    if impl == "reference":
        return ref
    if impl == "compiled":
        if heads not in _COMPILED:  # compile once per head count; recompiles on new B are dynamic
            _COMPILED[heads] = (ref, torch.compile(ref))
        return _COMPILED[heads][1]
    fused = PartAttention(C, P, heads).to(device)
    fused.load_state_dict(ref.state_dict())
    return fused


def _case(benchmark, device, impl, heads, B, sweep_name=None):
    model = _models(heads, impl, device)
    x = torch.randn(B, C, HW, HW, device=device)
    grads = (torch.randn(B, P, C, device=device), torch.randn(B, P, HW * HW, device=device))

    def forward():
        return model(x)

    def step():
        torch.autograd.backward(forward(), grads)

    record(benchmark, step, name=f"attention_h{heads}", impl=impl, device=device, dtype=x.dtype,
           shapes={"x": list(x.shape), "parts": [B, P, C]}, params={"B": B, "heads": heads},
           sweep=sweep_name, forward=forward, setup=lambda: zero_grads(model),
           minimal=algebra.attention(B, C, HW * HW, P, heads, pick_formulation("auto", heads, C, P) == "folded"))


@pytest.mark.parametrize("impl", ["fused", "reference", "compiled"])
@pytest.mark.parametrize("heads", [1, 16])
def test_attention_b16(benchmark, device, impl, heads):
    _case(benchmark, device, impl, heads, 16, sweep_name="B" if heads == 1 else None)


@pytest.mark.parametrize("B", sweep([b for b in B_SWEEP if b != 16], quick_values=[8, 32]))
@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_attention_sweep_b(benchmark, device, impl, B):
    _case(benchmark, device, impl, 1, B, sweep_name="B")
