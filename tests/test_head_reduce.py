"""``head_reduce``: the heads' attention maps reduced by their mean or their max, on every path.

Ground truth is the reference module in float64 (``c2f.reference``: ``attn.amax(1)``, whose gradient
``torch.amax`` shares evenly between tied heads); the parity rule is tests/parity.py's.
"""
import pytest
import torch

from c2f import model_file, reference
from c2f import nn as cn
from tests.test_part_attention import check_parity, make_pair

FORMS = ["folded", "unfolded"]


@pytest.mark.parametrize("formulation", FORMS)
@pytest.mark.parametrize("head_reduce", ["max", "mean"])
def test_attention_matches_the_float64_reference(formulation, head_reduce):
    torch.manual_seed(0)
    ref, fused = make_pair(32, 6, 4, formulation=formulation, head_reduce=head_reduce)
    check_parity(ref, fused, torch.randn(3, 32, 3, 3), torch.float32, 1e-5, x_grad=True)


def max_and_mean(dim, parts, heads, formulation):
    """Two fused modules with the same weights, one reducing the heads' maps by their max, one by their mean."""
    _, fused_max = make_pair(dim, parts, heads, formulation=formulation, head_reduce="max")
    fused_mean = cn.PartAttention(dim, parts, heads, qkv_bias=True, backend="torch", formulation=formulation)
    fused_mean.load_state_dict(fused_max.state_dict())
    return fused_max, fused_mean


@pytest.mark.parametrize("formulation", FORMS)
def test_the_max_differs_from_the_mean_and_bounds_every_head(formulation):
    torch.manual_seed(1)
    fused_max, fused_mean = max_and_mean(32, 6, 4, formulation)
    x = torch.randn(2, 32, 3, 3)
    with torch.no_grad():
        amax, amean = fused_max(x)[1], fused_mean(x)[1]
    assert (amax >= amean - 1e-6).all() and (amax - amean).abs().max() > 1e-3
    assert (amax.sum(-1) >= 1 - 1e-5).all()     # a max of distributions sums to at least one


@pytest.mark.parametrize("formulation", FORMS)
def test_tied_heads_share_the_gradient_evenly(formulation):
    """Zero queries give every head the uniform map, an exact tie in any arithmetic: through the max each head
    gets dattn / h, as through the mean, and the queries' gradient (nonzero) equals the reference's."""
    c, p, h = 16, 3, 4
    ref = reference.PartAttention(c, p, h, head_reduce="max").double()
    with torch.no_grad():
        ref.queries.zero_()
        ref.norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, c, 2, 2, dtype=torch.float64)
    dattn = torch.randn(2, p, 4, dtype=torch.float64)
    grads = {}
    for reduce in ("max", "mean"):
        fused = cn.PartAttention(c, p, h, backend="torch", formulation=formulation, head_reduce=reduce).double()
        fused.load_state_dict(ref.state_dict())
        xr = x.clone().requires_grad_(True)
        fused(xr)[1].backward(dattn)
        grads[reduce] = (xr.grad, fused.queries.grad)
    xr = x.clone().requires_grad_(True)
    ref(xr)[1].backward(dattn)
    assert ref.queries.grad.abs().max() > 1e-3
    for got_max, got_mean, want in zip(grads["max"], grads["mean"], (xr.grad, ref.queries.grad), strict=True):
        torch.testing.assert_close(got_max, want, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(got_max, got_mean, rtol=1e-9, atol=1e-12)


def test_the_max_gradient_is_amaxs_with_ties():
    """``reduce_heads_grad_`` against ``torch.amax``'s autograd, with two- and three-way ties."""
    from c2f._math import reduce_heads_grad_
    probs = torch.rand(4, 2, 3, 5, dtype=torch.float64)
    probs[1] = probs[0]                    # two-way ties everywhere
    probs[2, 0] = probs[3, 0] = probs[0, 0]   # three... four-way ties in sample 0
    dattn = torch.randn(2, 3, 5, dtype=torch.float64)
    leaf = probs.clone().requires_grad_(True)
    (want,) = torch.autograd.grad(leaf.amax(0), leaf, dattn)
    got = reduce_heads_grad_(torch.zeros_like(probs), dattn, probs, "max")
    torch.testing.assert_close(got, want, rtol=0, atol=1e-15)


@pytest.mark.parametrize("formulation", FORMS)
def test_one_head_max_is_the_mean(formulation):
    torch.manual_seed(2)
    fused_max, fused_mean = max_and_mean(16, 4, 1, formulation)
    x = torch.randn(2, 16, 3, 3)
    assert torch.equal(fused_max(x)[1], fused_mean(x)[1])


def test_bad_head_reduce_names_the_argument():
    with pytest.raises(ValueError, match="head_reduce must be one of \\('mean', 'max'\\), got 'min'"):
        cn.PartAttention(16, 4, 2, head_reduce="min")
    with pytest.raises(ValueError, match="head_reduce must be one of"):
        reference.C2FHead(16, 4, 3, 2, head_reduce="median")


def test_head_reduce_travels_in_model_files(tmp_path):
    head = cn.C2FHead(16, 4, 3, num_heads=2, head_reduce="max", backend="torch")
    path = str(tmp_path / "best.pt")
    model_file.save_model(path, head)
    loaded = model_file.load_model(path)
    assert loaded.attention.head_reduce == "max"
    assert model_file.model_args(loaded)["head_reduce"] == "max"
    x = torch.randn(2, 16, 2, 2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).attn, head(x).attn)


@pytest.mark.interpreter
@pytest.mark.cuda
@pytest.mark.parametrize("head_reduce", ["max", "mean"])
@pytest.mark.parametrize("tiled", [False, True])
def test_attention_kernels_match_the_float64_reference(head_reduce, tiled, device, monkeypatch):
    """The Triton kernels (the interpreter on CPU, compiled where CUDA is), short-row and tiled backward."""
    if tiled:
        from c2f.kernels import plans_part_attention
        monkeypatch.setattr(plans_part_attention, "ROW_TOKENS", 0)
    torch.manual_seed(3)
    ref, fused = make_pair(32, 6, 4, backend="triton", formulation="folded", head_reduce=head_reduce)
    check_parity(ref, fused, torch.randn(2, 32, 3, 3), torch.float32, 1e-5, x_grad=True, device=device)


def _head_pair(head_reduce, backend, materialize_parts=False, heads=4):
    torch.manual_seed(4)
    ref = reference.C2FHead(32, 6, 5, num_heads=heads, qkv_bias=True, head_reduce=head_reduce)
    with torch.no_grad():
        ref.attention.norm.weight.uniform_(0.5, 1.5)
        ref.attention.queries.normal_(0, 1.0)
    fused = cn.C2FHead(32, 6, 5, num_heads=heads, qkv_bias=True, head_reduce=head_reduce, backend=backend,
                       materialize_parts=materialize_parts, dot_precision="ieee")
    fused.load_state_dict(ref.state_dict())
    return ref, fused


def _head_run(module, x, perm, mask, grads):
    module.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    out = module(x, perm, mask)
    torch.autograd.backward(tuple(out), tuple(g.to(o.dtype) for g, o in zip(grads, out, strict=True)))
    res = {"attr_pred": out.attr_pred, "logits": out.logits, "attn": out.attn, "x": x.grad}
    res.update({n: p.grad for n, p in module.named_parameters() if p.grad is not None})
    return {k: v.detach().double().cpu() for k, v in res.items()}


@pytest.mark.parametrize("path", ["fused-torch", "fused-triton", "materialized-torch"])
def test_head_matches_the_float64_reference(path, device):
    """Every output and gradient of C2FHead with head_reduce="max" against the reference in float64."""
    kind, backend = path.split("-")
    if backend == "triton":
        pytest.importorskip("triton")
    dev = device if backend == "triton" else "cpu"
    ref, fused = _head_pair("max", backend, materialize_parts=kind == "materialized")
    x = torch.randn(4, 32, 3, 3)
    perm = torch.tensor([3, 2, 1, 0])
    mask = (torch.rand(2, 4, 6) > 0.5).float()
    truth_out = ref.double()(x.double(), perm, mask)
    gen = torch.Generator().manual_seed(5)
    grads = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in truth_out]
    truth = _head_run(ref, x.double(), perm, mask, grads)
    got = _head_run(fused.to(dev), x.to(dev), perm.to(dev), mask.to(dev), [g.to(dev) for g in grads])
    assert set(got) >= {"attr_pred", "logits", "attn", "x", "attention.queries", "attention.k.weight"}
    for name, want in truth.items():
        if name == "attention.k.bias":
            continue
        torch.testing.assert_close(got[name], want, rtol=1e-4, atol=1e-5 * max(1.0, want.abs().max().item()),
                                   msg=lambda m, name=name: f"{name}: {m}")
