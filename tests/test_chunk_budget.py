"""``chunk_mib`` is what a chunk holds: the torch-op paths plan their chunks from a count of the temporaries
one sample adds (``_per_sample_bytes`` in ``c2f.torch_ops``), and every temporary they create is in it.

Measured with the live-storage tracker: the peak of a pass with the whole batch in one chunk minus its
peak with one sample a chunk, per extra sample, must not exceed the count, forward and backward, with and
without dx, one and several heads, both attention formulations and the head, in fp32, under bf16 autocast
(16-bit GEMM operands), with bf16-stored features (outputs and their gradients in bf16) and in float64.
A count that misses a temporary lets a chunk overrun the budget the user set, and the peak-memory figures
with it.
"""
import contextlib

import pytest
import torch

from bench.memtrack import peak_live_bytes
from c2f import nn as cn
from c2f.torch_ops import c2f_head as torch_head
from c2f.torch_ops import part_attention as torch_attention

B, K, CLASSES = 3, 2, 10
# (C, H, W, P): more queries than tokens, fewer, and the [h, P, N] temporaries outweighing the map (as at 16 heads).
SHAPES = [(256, 7, 7, 40), (128, 10, 10, 12), (64, 7, 7, 96)]
ONE_SAMPLE, WHOLE_BATCH = 1e-9, 1e9
# name: (x's dtype, the module's dtype, autocast dtype or None)
PRECISIONS = {
    "fp32": (torch.float32, torch.float32, None),
    "bf16_autocast": (torch.float32, torch.float32, torch.bfloat16),
    "bf16_features": (torch.bfloat16, torch.float32, None),
    "fp64": (torch.float64, torch.float64, None),
}


def _growth(make, call, precision, planner, monkeypatch):
    """Bytes each sample past the first adds to the forward's and the backward's peak when the batch runs
    as one chunk instead of a chunk per sample, and the per-sample counts ``planner`` (the torch-op module)
    planned the forward's and the backward's chunks with."""
    amp = PRECISIONS[precision][2]
    planned = []
    plan = planner.chunk_size

    def recording_chunk_size(batch, per_sample_bytes, chunk_mib):
        planned.append(per_sample_bytes)
        return plan(batch, per_sample_bytes, chunk_mib)
    monkeypatch.setattr(planner, "chunk_size", recording_chunk_size)
    peaks = []
    for chunk_mib in (ONE_SAMPLE, WHOLE_BATCH):
        module = make(chunk_mib)
        with torch.autocast("cpu", dtype=amp) if amp else contextlib.nullcontext():
            planned.clear()
            forward = peak_live_bytes(lambda m=module: call(m), "cpu")
            forward_count = _only_plan(planned, "forward")
            outputs = call(module)
        torch.manual_seed(1)
        loss = sum((o * torch.randn_like(o)).sum() for o in outputs)
        planned.clear()
        backward = peak_live_bytes(loss.backward, "cpu")
        backward_count = _only_plan(planned, "backward")
        peaks.append((forward, backward))
    (f1, b1), (fb, bb) = peaks
    return ((fb - f1) / (B - 1), (bb - b1) / (B - 1)), (forward_count, backward_count)


def _only_plan(planned, what):
    assert len(planned) == 1, f"the {what} planned its chunks {len(planned)} times, expected once"
    return planned[0]


def _assert_within(growth, counts, what):
    for name, grew, count in zip(("forward", "backward"), growth, counts, strict=True):
        assert grew <= count, f"{what}: a sample adds {grew:.0f} bytes to the {name} chunk, counted {count}"


def _inputs(shape, precision, needs_dx):
    """x [B, C, H, W] in the precision's storage dtype, C, P and the module's dtype."""
    c, hh, ww, p = shape
    torch.manual_seed(0)
    x = torch.randn(B, c, hh, ww).to(PRECISIONS[precision][0]).requires_grad_(needs_dx)
    return x, c, p, PRECISIONS[precision][1]


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("needs_dx", [False, True], ids=["frozen", "dx"])
@pytest.mark.parametrize("heads", [1, 4])
@pytest.mark.parametrize("formulation", ["folded", "unfolded"])
def test_attention_chunks_hold_what_they_count(formulation, heads, needs_dx, shape, precision, monkeypatch):
    x, c, p, dtype = _inputs(shape, precision, needs_dx)
    growth, counts = _growth(
        lambda mib: cn.PartAttention(c, p, heads, formulation=formulation, chunk_mib=mib, dtype=dtype),
        lambda m: list(m(x)), precision, torch_attention, monkeypatch)
    _assert_within(growth, counts, f"{formulation}, {heads} heads, dx={needs_dx}, {shape}, {precision}")


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("needs_dx", [False, True], ids=["frozen", "dx"])
@pytest.mark.parametrize("heads", [1, 4])
def test_head_chunks_hold_what_they_count(heads, needs_dx, shape, precision, monkeypatch):
    x, c, p, dtype = _inputs(shape, precision, needs_dx)
    perm = torch.tensor([1, 2, 0])
    mask = (torch.rand(K, B, p) > 0.5).float()

    def call(m):
        out = m(x, perm, mask)
        return [out.attr_pred, out.logits, out.attn]
    growth, counts = _growth(lambda mib: cn.C2FHead(c, p, CLASSES, heads, chunk_mib=mib, dtype=dtype), call,
                             precision, torch_head, monkeypatch)
    _assert_within(growth, counts, f"head, {heads} heads, dx={needs_dx}, {shape}, {precision}")
