"""Parity of the fused C2F head (c2f.nn.C2FHead) with c2f.reference.C2FHead.

Two paths, each on the torch-op and Triton (interpreter) backends: the fused algebra (parts never
formed) and ``materialize_parts=True`` (fused attention, a readout that saves nothing, in-place
``part_mixup_`` / ``part_mixup_pool``). Ground truth: the reference in float64; the fused head may err at
most twice as much as the reference in fp32, plus a small relative atol.
"""
import pytest
import torch

from c2f import nn as c2fnn
from c2f import reference
from c2f.losses import attribute_loss, soft_cross_entropy
from tests.parity import assert_within_reference_error

ATOL = 1e-5


def make_heads(dim, parts, classes, heads, qkv_bias=False, **kwargs):
    ref = reference.C2FHead(dim, parts, classes, heads, qkv_bias=qkv_bias)
    with torch.no_grad():
        ref.attention.norm.weight.uniform_(0.5, 1.5)
        ref.attention.norm.bias.normal_(0, 0.5)
        ref.attention.queries.normal_(0, 1.0)
    fused = c2fnn.C2FHead(dim, parts, classes, heads, qkv_bias=qkv_bias, **kwargs)
    fused.load_state_dict(ref.state_dict())
    return ref, fused


def run(module, x, perm, mask, x_grad, seed=1):
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(x_grad)
    out = module(x, perm, mask)
    gen = torch.Generator().manual_seed(seed)
    grads = [torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.dtype) for t in out]
    torch.autograd.backward(list(out), grads)
    result = {"attr_pred": out.attr_pred.detach(), "logits": out.logits.detach(), "attn": out.attn.detach()}
    for name, p in module.named_parameters():
        result[name] = p.grad.detach() if p.grad is not None else torch.zeros_like(p)
    if x_grad:
        result["x"] = x.grad.detach()
    return result


def check(ref, fused, x, perm=None, mask=None, x_grad=False):
    truth_module = reference.C2FHead(ref.attention.dim, ref.attention.num_parts, ref.classifier.out_features,
                                     ref.attention.num_heads, qkv_bias=ref.attention.k.bias is not None)
    truth_module.load_state_dict(ref.state_dict())
    truth_module.double()
    truth = run(truth_module, x.double(), perm, None if mask is None else mask.double(), x_grad)
    baseline = run(ref, x, perm, mask, x_grad)
    got = run(fused, x, perm, mask, x_grad)
    assert got["logits"].shape == truth["logits"].shape
    for name in truth:
        assert_within_reference_error(name, got[name], baseline[name], truth[name], ATOL)


def masks(views, batch, parts, kind="fractional", seed=0):
    gen = torch.Generator().manual_seed(seed)
    if kind == "binary":
        return (torch.rand(views, batch, parts, generator=gen) < 0.5).float()
    return torch.rand(views, batch, parts, generator=gen)


@pytest.mark.parametrize("backend, heads, views", [
    ("torch", 1, None), ("torch", 1, 4), ("torch", 16, None), ("torch", 16, 4),
    ("triton", 1, 4),    # the interpreter runs the real shape once: one head, four views
])
def test_fused_real_shape(backend, heads, views):
    ref, fused = make_heads(2048, 312, 200, heads, backend=backend)
    x = torch.randn(2, 2048, 14, 14)
    perm = torch.tensor([1, 0])
    mask = None if views is None else masks(views, 2, 312, "binary")
    check(ref, fused, x, perm if views else None, mask)


SMALL_CASES = [(heads, views, perm_kind) for heads in (1, 4) for views in (None, 1, 4)
               for perm_kind in ("flip", "general")]
# The interpreter runs a third of them: both head counts, every view count, both pairings.
SMALL_TRITON_CASES = [(1, None, "flip"), (1, 1, "general"), (4, 4, "general"), (4, 1, "flip")]


@pytest.mark.parametrize("backend, heads, views, perm_kind",
                         [("torch",) + case for case in SMALL_CASES]
                         + [("triton",) + case for case in SMALL_TRITON_CASES])
def test_fused_small(backend, heads, views, perm_kind):
    ref, fused = make_heads(64, 7, 5, heads, qkv_bias=True, backend=backend)
    x = torch.randn(5, 64, 4, 4) + 3.0
    perm = torch.arange(5).flip(0) if perm_kind == "flip" else torch.tensor([2, 0, 4, 1, 3])
    mask = None if views is None else masks(views, 5, 7)
    check(ref, fused, x, perm if views else None, mask, x_grad=True)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_single_view_mask_of_rank_two(backend):
    ref, fused = make_heads(64, 7, 5, 1, backend=backend)
    x = torch.randn(4, 64, 3, 3)
    mask = masks(1, 4, 7)[0]
    check(ref, fused, x, torch.tensor([3, 2, 1, 0]), mask)
    assert fused(x, torch.tensor([3, 2, 1, 0]), mask).logits.shape == (4, 5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("views", [None, 1, 4])
def test_materialized(backend, views):
    ref, fused = make_heads(64, 7, 5, 2, materialize_parts=True, backend=backend)
    x = torch.randn(4, 64, 4, 4)
    perm = torch.tensor([3, 2, 1, 0])
    mask = None if views is None else masks(views, 4, 7, "binary")
    check(ref, fused, x, perm if views else None, mask)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_training_steps_match_reference(backend):
    """Same seed, same data: the fused head's losses follow the reference's over several steps."""
    torch.manual_seed(3)
    ref, fused = make_heads(128, 12, 6, 1, backend=backend)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(8, 128, 5, 5, generator=gen)
    attrs = torch.rand(8, 12, generator=gen)
    labels = torch.randint(0, 6, (8,), generator=gen)
    perm = torch.arange(8).flip(0)
    mask = (torch.rand(2, 8, 12, generator=gen) < 0.5).float()
    targets = reference.mix_targets(labels, perm, mask, 6)
    history = {}
    for name, model in (("reference", ref), ("fused", fused)):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        losses = []
        for _ in range(5):
            opt.zero_grad()
            out = model(x, perm, mask)
            loss = attribute_loss(out.attr_pred, attrs) + soft_cross_entropy(out.logits, targets)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        history[name] = torch.tensor(losses)
    assert history["reference"][-1] < history["reference"][0]
    torch.testing.assert_close(history["fused"], history["reference"], rtol=1e-4, atol=1e-5)


def test_bad_inputs():
    _, fused = make_heads(32, 5, 3, 1)
    x = torch.randn(4, 32, 3, 3)
    with pytest.raises(ValueError, match="perm is required"):
        fused(x, None, torch.rand(1, 4, 5))
    with pytest.raises(ValueError, match="mask must be"):
        fused(x, torch.arange(4), torch.rand(1, 4, 6))
    with pytest.raises(ValueError, match="permutation"):
        fused(x, torch.tensor([0, 0, 1, 2]), torch.rand(1, 4, 5))
    with pytest.raises(ValueError, match="expected dim=32"):
        fused(torch.randn(4, 16, 3, 3))


def test_state_dict_interchangeable():
    ref, fused = make_heads(32, 5, 3, 2)
    assert list(ref.state_dict()) == list(fused.state_dict())
    reference.C2FHead(32, 5, 3, 2).load_state_dict(fused.state_dict())
