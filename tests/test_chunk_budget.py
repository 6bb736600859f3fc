"""``chunk_mib`` is what a chunk holds: the torch-op paths plan their chunks from a count of the temporaries
one sample adds (``_per_sample_bytes`` in ``c2f.torch_ops``), and every temporary they create is in it.

Measured with the live-storage tracker: the peak of a pass with the whole batch in one chunk minus its
peak with one sample a chunk, per extra sample, must not exceed the count (fp32, and bf16 autocast with its
16-bit GEMM operands; forward and backward, with and without dx, one and several heads, both attention
formulations and the head). A count that
misses a temporary lets a chunk overrun the budget the user set, and the peak-memory figures with it.
"""
import contextlib

import pytest
import torch

from bench.memtrack import peak_live_bytes
from c2f import nn as cn
from c2f.torch_ops import c2f_head as torch_head
from c2f.torch_ops import part_attention as torch_attention

B, K, CLASSES = 3, 2, 10
# (C, H, W, P): more queries than tokens, and fewer.
SHAPES = [(256, 7, 7, 40), (128, 10, 10, 12)]
ONE_SAMPLE, WHOLE_BATCH = 1e-9, 1e9


PRECISIONS = {"fp32": 4, "bf16": 2}   # the GEMM operands' bytes


def _precision(name):
    return torch.autocast("cpu", dtype=torch.bfloat16) if name == "bf16" else contextlib.nullcontext()


def _growth(make, call, precision):
    """Bytes each sample past the first adds to the forward's and the backward's peak when the batch runs
    as one chunk instead of a chunk per sample."""
    peaks = []
    for chunk_mib in (ONE_SAMPLE, WHOLE_BATCH):
        module = make(chunk_mib)
        with _precision(precision):
            forward = peak_live_bytes(lambda m=module: call(m), "cpu")
            outputs = call(module)
        torch.manual_seed(1)
        loss = sum((o.float() * torch.randn_like(o.float())).sum() for o in outputs)
        backward = peak_live_bytes(loss.backward, "cpu")
        peaks.append((forward, backward))
    (f1, b1), (fb, bb) = peaks
    return (fb - f1) / (B - 1), (bb - b1) / (B - 1)


def _assert_within(growth, counts, what):
    for name, grew, count in zip(("forward", "backward"), growth, counts, strict=True):
        assert grew <= count, f"{what}: a sample adds {grew:.0f} bytes to the {name} chunk, counted {count}"


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("needs_dx", [False, True], ids=["frozen", "dx"])
@pytest.mark.parametrize("heads", [1, 4])
@pytest.mark.parametrize("formulation", ["folded", "unfolded"])
def test_attention_chunks_hold_what_they_count(formulation, heads, needs_dx, shape, precision):
    c, hh, ww, p = shape
    n = hh * ww
    torch.manual_seed(0)
    x = torch.randn(B, c, hh, ww).requires_grad_(needs_dx)
    growth = _growth(lambda mib: cn.PartAttention(c, p, heads, formulation=formulation, chunk_mib=mib),
                     lambda m: list(m(x)), precision)
    count = (torch_attention._per_sample_bytes if formulation == "folded"
             else torch_attention._unfolded_per_sample_bytes)
    ob = PRECISIONS[precision]
    _assert_within(growth, (count(c, n, p, heads, False, ob=ob), count(c, n, p, heads, True, needs_dx, ob)),
                   f"{formulation}, {heads} heads, dx={needs_dx}, {shape}, {precision}")


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("needs_dx", [False, True], ids=["frozen", "dx"])
@pytest.mark.parametrize("heads", [1, 4])
def test_head_chunks_hold_what_they_count(heads, needs_dx, shape, precision):
    c, hh, ww, p = shape
    n = hh * ww
    torch.manual_seed(0)
    x = torch.randn(B, c, hh, ww).requires_grad_(needs_dx)
    perm = torch.tensor([1, 2, 0])
    mask = (torch.rand(K, B, p) > 0.5).float()

    def call(m):
        out = m(x, perm, mask)
        return [out.attr_pred, out.logits, out.attn]
    growth = _growth(lambda mib: cn.C2FHead(c, p, CLASSES, heads, chunk_mib=mib), call, precision)
    count, ob = torch_head._per_sample_bytes, PRECISIONS[precision]
    _assert_within(growth, (count(c, n, p, heads, K, False, ob=ob), count(c, n, p, heads, K, True, needs_dx, ob)),
                   f"head, {heads} heads, dx={needs_dx}, {shape}, {precision}")
