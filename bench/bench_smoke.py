"""A small end-to-end case for the report pipeline: LayerNorm over tokens, fused vs reference.

"fused" is ``F.layer_norm`` (one ATen kernel); "reference" writes the mean, variance and scaling as
separate tensor ops. Forward + backward on ``[B, N, C]`` with N=196 and a small C.
"""
import pytest
import torch
import torch.nn.functional as F

from bench.common import B_SWEEP, record, sweep, zero_grads

C, N = 256, 196


def _reference_layer_norm(x, weight, bias, eps=1e-5):
    mean = x.mean(-1, keepdim=True)
    var = (x - mean).pow(2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


@pytest.mark.parametrize("B", sweep(B_SWEEP))
@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_smoke_layer_norm(benchmark, device, impl, B):
    x = torch.randn(B, N, C, device=device)
    weight = torch.ones(C, device=device, requires_grad=True)
    bias = torch.zeros(C, device=device, requires_grad=True)
    layer_norm = F.layer_norm if impl == "fused" else None

    def forward():
        if layer_norm is not None:
            return layer_norm(x, (C,), weight, bias, 1e-5)
        return _reference_layer_norm(x, weight, bias)

    def step():
        forward().square().mean().backward()

    record(benchmark, step, name="smoke_layer_norm", impl=impl, device=device, dtype=x.dtype,
           shapes={"x": list(x.shape)}, params={"B": B}, sweep="B", forward=forward,
           setup=lambda: zero_grads(weight, bias))
