"""Part-wise mixup: in place and pooled, both backends, against ``c2f.reference``; the PartMixup module.

Tests marked ``cuda`` take the ``device`` fixture: compiled on the GPU where there is one. The others
check autograd and argument semantics on CPU tensors, where the Triton backend is the interpreter (on a
machine with a GPU, CPU tensors with backend="triton" are an error by design: those cases run there with
the torch backend only).
"""
import inspect

import pytest
import torch

from c2f import reference as ref
from c2f.part_mixup import MixupOutput, PartMixup, mix_targets, part_mixup_, part_mixup_pool
from tests.conftest import CUDA

BACKENDS = ["torch", "triton"]
CPU_BACKENDS = ["torch"] if CUDA else BACKENDS
# (dtype, atol): fp32 is compared directly (rtol 1e-5); fp16 and bf16 by the half rule: the error against
# the fp32 reference is at most twice the reference's own error in that dtype, plus atol.
DTYPES = [(torch.float32, 1e-5), (torch.float16, 1e-3), (torch.bfloat16, 1e-2)]


def _flip(b):
    return torch.arange(b - 1, -1, -1)


def _involution(b, seed=1):
    order = torch.randperm(b, generator=torch.Generator().manual_seed(seed))
    perm = torch.arange(b)
    half = b // 2
    perm[order[:half]] = order[half:2 * half]
    perm[order[half:2 * half]] = order[:half]
    return perm


def _general(b, seed=2):
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(b, generator=g)
        if not torch.equal(perm[perm], torch.arange(b)):
            return perm


PERMS = {"flip": _flip, "involution": _involution, "general": _general}


def _mask(kind, shape):
    if kind == "zeros":
        return torch.zeros(shape)
    if kind == "ones":
        return torch.ones(shape)
    if kind == "binary":
        return (torch.rand(shape) < 0.5).float()
    return torch.rand(shape)


def _assert_close(name, got, want, dtype, atol, ref_lowp=None):
    """fp32: |got - want| <= atol + 1e-5 |want|. 16-bit: error <= 2 x error of the reference in that dtype + atol."""
    got, want = got.double().cpu(), want.double().cpu()
    err = (got - want).abs()
    if dtype == torch.float32:
        ok = bool((err <= atol + 1e-5 * want.abs()).all())
        bound = f"atol {atol} rtol 1e-5"
    else:
        ref_err = (ref_lowp.double().cpu() - want).abs().max().item()
        ok = err.max().item() <= 2 * ref_err + atol
        bound = f"2 x reference {dtype} error {ref_err:.3g} + {atol}"
    assert ok, (f"{name}: max abs diff {err.max().item():.3g}, mean {err.mean().item():.3g} "
                f"({dtype}, bound {bound})")


def _reference_grads(fn, x32, dtype, grad):
    """Output and d x of ``fn`` run on fp32 and on ``dtype`` copies of x32: (out32, dx32, out_lp, dx_lp)."""
    results = []
    for dt in (torch.float32, dtype):
        x = x32.detach().to(dt).requires_grad_()
        out = fn(x)
        out.backward(grad.to(dt))
        results += [out.detach().float(), x.grad.float()]
    return results


# ------------------------------------------------------------------------------------------- in place

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,atol", DTYPES)
@pytest.mark.parametrize("pairing,b", [("flip", 6), ("flip", 5), ("involution", 7)])
@pytest.mark.parametrize("p,c,mask_kind", [(7, 40, "fractional"), (7, 40, "zeros"), (7, 40, "ones"),
                                            (13, 600, "fractional")])  # 600: several part and channel blocks
@pytest.mark.cuda
def test_part_mixup_inplace_matches_reference(backend, dtype, atol, pairing, b, mask_kind, p, c, device):
    x32 = torch.randn(b, p, c)
    perm, mask = PERMS[pairing](b), _mask(mask_kind, (b, p))
    grad = torch.randn(b, p, c)
    want, want_dx, ref_lp, ref_dx_lp = _reference_grads(lambda x: ref.part_mixup(x, perm, mask), x32, dtype, grad)

    x32, perm, mask, grad = (t.to(device) for t in (x32, perm, mask, grad))
    leaf = x32.to(dtype).requires_grad_()
    x = leaf.clone()
    ptr, version = x.data_ptr(), x._version
    y = part_mixup_(x, perm, mask, backend=backend)
    assert y is x and y.data_ptr() == ptr and x._version > version
    y.backward(grad.to(dtype))
    _assert_close("output", y.detach(), want, dtype, atol, ref_lp)
    _assert_close("d parts", leaf.grad, want_dx, dtype, atol, ref_dx_lp)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_odd_batch_flip_leaves_middle_sample(backend):
    x = torch.randn(5, 7, 40)
    before = x.clone()
    part_mixup_(x, _flip(5), torch.rand(5, 7), backend=backend)
    assert torch.equal(x[2], before[2])
    assert not torch.equal(x[0], before[0])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_inplace_backward_keeps_shared_gradients_intact(backend):
    """A gradient another branch also reads (add's backward hands one tensor to both inputs, or the
    user's own ``backward(grad)``) must not be mixed in place under that branch."""
    b, p, c = 4, 3, 16
    perm, mask, w = _flip(b), torch.rand(b, p), torch.randn(b, p, c)
    x, z = torch.randn(b, p, c, requires_grad=True), torch.randn(b, p, c, requires_grad=True)
    ez = z.exp()                                        # created first, so its backward runs after ours
    y = part_mixup_(x.clone(), perm, mask, backend=backend)
    ((y + ez) * w).sum().backward()
    torch.testing.assert_close(z.grad, w * z.exp().detach())
    upstream = torch.randn(b, p, c)
    kept = upstream.clone()
    x.grad = None
    part_mixup_(x.clone(), perm, mask, backend=backend).backward(upstream)
    assert torch.equal(upstream, kept)
    want = torch.autograd.grad(ref.part_mixup(x, perm, mask), x, upstream)[0]
    torch.testing.assert_close(x.grad, want)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_inplace_on_saved_tensor_raises_autograd_error(backend):
    x = torch.randn(4, 3, 16, requires_grad=True)
    s = torch.sigmoid(x)                               # sigmoid saves its output for backward
    part_mixup_(s, _flip(4), torch.rand(4, 3), backend=backend)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        s.sum().backward()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_inplace_without_grad(backend):
    x = torch.randn(4, 3, 16)
    perm, mask = _involution(4), torch.rand(4, 3)
    want = ref.part_mixup(x, perm, mask)
    version = x._version
    with torch.no_grad():
        assert part_mixup_(x, perm, mask, backend=backend) is x
    torch.testing.assert_close(x, want)
    assert x._version > version
    leaf = torch.randn(4, 3, 16, requires_grad=True)
    want = ref.part_mixup(leaf.detach(), perm, mask)
    with torch.no_grad():                               # torch allows in-place on leaves without grad mode
        part_mixup_(leaf, perm, mask, backend=backend)
    torch.testing.assert_close(leaf.detach(), want)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_inplace_on_tensor_saved_for_another_input_raises(backend):
    """parts needs no grad, but ``parts * w`` saved it for d w: mixing it must still be caught."""
    s, w = torch.randn(4, 3, 16), torch.randn(4, 3, 16, requires_grad=True)
    out = (s * w).sum()
    part_mixup_(s, _flip(4), torch.rand(4, 3), backend=backend)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward()


def _bad_inplace_cases():
    b, p, c = 4, 3, 8
    good = dict(perm=_flip(b), mask=torch.rand(b, p))
    leaf = torch.randn(b, p, c, requires_grad=True)
    return [
        ("not an involution", dict(good, perm=torch.tensor([1, 2, 3, 0])), None, ValueError, "involution"),
        ("perm out of range", dict(good, perm=torch.tensor([3, 2, 1, 4])), None, ValueError, "indices"),
        ("perm dtype", dict(good, perm=_flip(b).int()), None, ValueError, "int64"),
        ("mask above 1", dict(good, mask=torch.full((b, p), 1.5)), None, ValueError, r"\[0, 1\]"),
        ("mask below 0", dict(good, mask=torch.full((b, p), -0.1)), None, ValueError, r"\[0, 1\]"),
        ("mask NaN", dict(good, mask=torch.full((b, p), float("nan"))), None, ValueError, r"\[0, 1\]"),
        ("mask shape", dict(good, mask=torch.rand(b, p + 1)), None, ValueError, "mask must be"),
        ("mask with views", dict(good, mask=torch.rand(2, b, p)), None, ValueError, "part_mixup_pool"),
        ("mask requires grad", dict(good, mask=torch.rand(b, p, requires_grad=True)), None, ValueError, "detach"),
        ("non-contiguous", good, torch.randn(b, c, p).transpose(1, 2), ValueError, "contiguous"),
        ("leaf requiring grad", good, leaf, RuntimeError, "leaf"),
        ("view of such a leaf", good, leaf[:], RuntimeError, "leaf"),
        ("integer parts", good, torch.zeros(b, p, c, dtype=torch.int64), TypeError, "float32"),
    ]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name,args,parts,error,match", _bad_inplace_cases(),
                         ids=lambda v: v if isinstance(v, str) else "")
def test_bad_inplace_inputs_raise_and_leave_parts_untouched(backend, name, args, parts, error, match):
    x = torch.randn(4, 3, 8) if parts is None else parts
    before, version = x.detach().clone(), x._version
    with pytest.raises(error, match=match):
        part_mixup_(x, args["perm"], args["mask"], backend=backend)
    assert torch.equal(x.detach(), before) and x._version == version


# ---------------------------------------------------------------------------------------------- pooled

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,atol", DTYPES)
@pytest.mark.parametrize("k", [1, 4, 16])
@pytest.mark.parametrize("perm_kind", ["flip", "involution", "general"])
@pytest.mark.cuda
def test_pool_matches_reference(backend, dtype, atol, k, perm_kind, device):
    b, p, c = 5, 37, 150                                # P and C not multiples of the blocks
    x32 = torch.randn(b, p, c)
    perm, mask = PERMS[perm_kind](b), _mask("fractional", (k, b, p))
    grad = torch.randn(k, b, c)
    fn_ref = lambda x: ref.part_mixup_pool(x, perm, mask)  # noqa: E731
    want, want_dx, ref_lp, ref_dx_lp = _reference_grads(fn_ref, x32, dtype, grad)
    x32, perm, mask, grad = (t.to(device) for t in (x32, perm, mask, grad))
    x = x32.to(dtype).requires_grad_()
    out = part_mixup_pool(x, perm, mask, backend=backend)
    assert out.shape == (k, b, c) and out.dtype == dtype
    out.backward(grad.to(dtype))
    _assert_close("pooled", out.detach(), want, dtype, atol, ref_lp)
    _assert_close("d parts", x.grad, want_dx, dtype, atol, ref_dx_lp)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask_kind", ["zeros", "ones", "binary"])
@pytest.mark.cuda
def test_pool_mask_extremes_and_single_view(backend, mask_kind, device):
    b, p, c = 4, 9, 24
    x = torch.randn(b, p, c, device=device, requires_grad=True)
    perm, mask = _general(b).to(device), _mask(mask_kind, (b, p)).to(device)
    out = part_mixup_pool(x, perm, mask, backend=backend)    # [B, P] mask: one view, [B, C]
    assert out.shape == (b, c)
    grad = torch.randn(b, c, device=device)
    out.backward(grad)
    xr = x.detach().requires_grad_()
    want = ref.part_mixup(xr, perm, mask).mean(-2)
    want.backward(grad)
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(x.grad, xr.grad, atol=1e-6, rtol=1e-5)
    if mask_kind == "ones":
        torch.testing.assert_close(out, x.detach().mean(1))
    if mask_kind == "zeros":
        torch.testing.assert_close(out, x.detach()[perm].mean(1))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.cuda
def test_pool_expanded_gradient_and_strided_parts(backend, device):
    """``.sum()`` hands backward an expanded (stride 0) gradient; parts may be a transposed view."""
    b, p, c = 4, 5, 24
    base = torch.randn(b, c, p, device=device, requires_grad=True)
    parts = base.transpose(1, 2)
    perm, mask = _general(b).to(device), torch.rand(3, b, p, device=device)
    part_mixup_pool(parts, perm, mask, backend=backend).sum().backward()
    base_ref = base.detach().requires_grad_()
    ref.part_mixup_pool(base_ref.transpose(1, 2), perm, mask).sum().backward()
    torch.testing.assert_close(base.grad, base_ref.grad, atol=1e-6, rtol=1e-5)


def _half_ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Half the spacing of ``dtype`` at |x| (float64; the smallest normal's spacing below it)."""
    info = torch.finfo(dtype)
    exponent = torch.floor(torch.log2(x.abs().clamp_min(info.tiny)))
    return 0.5 * info.eps * torch.exp2(exponent)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_pool_16bit_exact_in_the_mask(backend, dtype, device):
    """16-bit parts with fp32 mask math: each part's weights m and 1 - m sum to 1 to fp32 accuracy, so
    every pooled value is the exact result rounded once. Paired samples are opposite (F[perm b] = -F[b])
    and masks near 1/2, so the pooled values (2m - 1) F / P are small next to the terms: weights rounded
    to 16 bits each (bf16(m) + bf16(1 - m) != 1, up to 2^-9 off) show as errors many ulps of the result.
    Bound: one ulp of the result (the interpreter's bf16 stores truncate: up to one ulp, not a half) plus
    the 16-bit mask pieces' 2^-17 (bf16) / 2^-21 (fp16) of the terms' magnitude."""
    b, p, c, k = 6, 37, 150, 4
    half = torch.randn(b // 2, p, c).to(dtype)
    parts = torch.cat([half, -half.flip(0)])                   # flip pairing: F[b - 1 - i] = -F[i]
    perm = _flip(b)
    delta = (torch.rand(k, b // 2, p) * 2 - 1) * 2 ** -6
    mask = 0.5 + torch.cat([delta, delta.flip(1)], 1)           # m[perm b] = m[b]: the backward cancels too
    grad_half = torch.randn(k, b // 2, c).to(dtype)
    grad = torch.cat([grad_half, -grad_half.flip(1)], 1)
    mass = parts.double().abs().mean(1)                          # [B, C]: the terms' magnitude / P
    truth = ref.part_mixup_pool(parts.double(), perm, mask.double())
    x = parts.to(device).detach().requires_grad_()
    out = part_mixup_pool(x, perm.to(device), mask.to(device), backend=backend)
    out.backward(grad.to(device))
    piece = 2 ** -17 if dtype == torch.bfloat16 else 2 ** -21
    err = (out.detach().double().cpu() - truth).abs()
    bound = 2 * _half_ulp(truth, dtype) + piece * mass
    assert (err <= bound).all(), f"pooled: max error {err.max():.3g}, {int((err > bound).sum())} over the bound"
    # Backward: dF[j] = (1/P) sum_k m[k,j] G[k,j] + (1 - m[k,i]) G[k,i], i = perm^-1 j, G[k,i] = -G[k,j].
    xr = parts.detach().double().requires_grad_()
    ref.part_mixup_pool(xr, perm, mask.double()).backward(grad.double())
    gmass = grad.double().abs().sum(0)[:, None, :] / p           # [B, 1, C]
    err = (x.grad.double().cpu() - xr.grad).abs()
    bound = 2 * _half_ulp(xr.grad, dtype) + piece * gmass
    assert (err <= bound).all(), f"d parts: max error {err.max():.3g}, {int((err > bound).sum())} over the bound"


def test_pool_rejects_bad_inputs():
    x = torch.randn(4, 3, 8)
    with pytest.raises(ValueError, match="permutation"):
        part_mixup_pool(x, torch.tensor([0, 0, 1, 2]), torch.rand(2, 4, 3))
    with pytest.raises(ValueError, match="mask must be"):
        part_mixup_pool(x, _flip(4), torch.rand(2, 4, 5))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        part_mixup_pool(x, _flip(4), torch.full((2, 4, 3), 2.0))
    with pytest.raises(ValueError, match="backend"):
        part_mixup_pool(x, _flip(4), torch.rand(2, 4, 3), backend="cuda")


# ------------------------------------------------------------------------------------------- contract

def _public_functions(module) -> dict:
    """The functions ``module`` defines itself whose names do not start with an underscore (jitted kernels
    are not functions, and are private by name anyway)."""
    return {name: f for name, f in vars(module).items()
            if inspect.isfunction(f) and f.__module__ == module.__name__ and not name.startswith("_")}


def test_implementations_share_signatures():
    """One contract: the Triton launchers and the torch ops have exactly the same functions and signatures."""
    from c2f.kernels import part_mixup as triton_impl
    from c2f.torch_ops import part_mixup as torch_impl
    triton_fns, torch_fns = _public_functions(triton_impl), _public_functions(torch_impl)
    assert sorted(triton_fns) == sorted(torch_fns) == sorted(torch_impl.__all__)
    for name in torch_impl.__all__:
        assert inspect.signature(triton_fns[name]) == inspect.signature(torch_fns[name]), name


# --------------------------------------------------------------------------------------------- targets

@pytest.mark.parametrize("k", [None, 3])
def test_targets_sum_to_one_and_match_part_fraction(k):
    b, p, classes = 6, 10, 7
    labels = torch.tensor([0, 1, 2, 3, 4, 5])           # distinct, so each weight is readable alone
    perm = _involution(b)
    mask = (torch.rand((b, p) if k is None else (k, b, p)) < 0.3).float()
    targets = mix_targets(labels, perm, mask, classes)
    torch.testing.assert_close(targets.sum(-1), torch.ones(targets.shape[:-1]))
    own = targets.gather(-1, labels.expand(targets.shape[:-1]).unsqueeze(-1)).squeeze(-1)
    fixed = perm == torch.arange(b)
    torch.testing.assert_close(own[..., ~fixed], mask.mean(-1)[..., ~fixed])
    torch.testing.assert_close(own[..., fixed], torch.ones_like(own[..., fixed]))


# ---------------------------------------------------------------------------------------------- module

@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("mode", ["binary", "blend", "part"])
@pytest.mark.parametrize("views", [1, 3])
@pytest.mark.parametrize("pairing", ["flip", "random"])
def test_part_mixup_module_matches_reference(backend, mode, views, pairing):
    b, p, c, classes = 6, 5, 24, 10
    mixup = PartMixup(alpha=0.7, mode=mode, views=views, pairing=pairing, num_classes=classes,
                      label_smoothing=0.1, backend=backend)
    parts, labels, attrs = torch.randn(b, p, c), torch.randint(0, classes, (b,)), torch.rand(b, p)
    perm, mask = mixup.sample(b, p, generator=torch.Generator().manual_seed(3))
    assert perm.dtype == torch.int64 and mask.shape == (views, b, p) and mask.dtype == torch.float32
    assert torch.equal(perm[perm], torch.arange(b))
    if mode == "binary":
        assert bool(((mask == 0) | (mask == 1)).all())
    if mode == "blend":
        assert torch.equal(mask, mask[..., :1].expand_as(mask))
    m = mask[0] if views == 1 else mask
    want_features = ref.part_mixup(parts, perm, m) if views == 1 else ref.part_mixup_pool(parts, perm, m)
    want_targets = ref.mix_targets(labels, perm, m, classes, smoothing=0.1)

    out = mixup(parts.clone(), labels, attrs, generator=torch.Generator().manual_seed(3))
    assert isinstance(out, MixupOutput)
    torch.testing.assert_close(out.features, want_features, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.targets, want_targets)
    torch.testing.assert_close(out.attrs, ref.mix_attributes(attrs, perm, m))
    torch.testing.assert_close(out.targets.sum(-1), torch.ones(out.targets.shape[:-1]))


@pytest.mark.parametrize("mode", ["binary", "blend", "part"])
def test_same_generator_state_same_result(mode):
    mixup = PartMixup(alpha=0.4, mode=mode, views=2, pairing="random")
    parts, labels = torch.randn(8, 6, 16), torch.randint(0, 200, (8,))
    first = mixup(parts, labels, generator=torch.Generator().manual_seed(11))
    again = mixup(parts, labels, generator=torch.Generator().manual_seed(11))
    other = mixup(parts, labels, generator=torch.Generator().manual_seed(12))
    assert torch.equal(first.features, again.features) and torch.equal(first.targets, again.targets)
    assert not torch.equal(first.targets, other.targets)
    torch.manual_seed(5)
    a = mixup.sample(8, 6)
    torch.manual_seed(5)
    b = mixup.sample(8, 6)
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))


def test_random_pairing_is_an_involution_with_at_most_one_fixed_point():
    mixup = PartMixup(pairing="random")
    g = torch.Generator().manual_seed(0)
    for b in (1, 2, 7, 64):
        perm, _ = mixup.sample(b, 3, generator=g)
        assert torch.equal(perm[perm], torch.arange(b))
        assert int((perm == torch.arange(b)).sum()) == b % 2


@pytest.mark.parametrize("alpha", [0.2, 1.0, 4.0])
def test_lambda_follows_beta(alpha):
    """Blend masks hold one lambda per sample: mean 1/2 and variance 1 / (4 (2 alpha + 1))."""
    mixup = PartMixup(alpha=alpha, mode="blend", views=4)
    _, mask = mixup.sample(5000, 1, generator=torch.Generator().manual_seed(0))
    lam = mask.flatten().double()
    assert bool(((lam >= 0) & (lam <= 1)).all())
    assert abs(lam.mean().item() - 0.5) < 0.01
    want_var = 1 / (4 * (2 * alpha + 1))
    assert abs(lam.var().item() - want_var) < 0.05 * want_var


def test_module_rejects_bad_arguments():
    for kwargs, match in [(dict(alpha=0.0), "alpha"), (dict(mode="cutmix"), "mode"), (dict(views=0), "views"),
                          (dict(pairing="shuffle"), "pairing"), (dict(label_smoothing=1.0), "label_smoothing")]:
        with pytest.raises(ValueError, match=match):
            PartMixup(**kwargs)
    with pytest.raises(ValueError, match="labels"):
        PartMixup()(torch.randn(4, 3, 8), torch.zeros(5, dtype=torch.int64))


def test_sample_mix_targets_and_losses_name_bad_arguments():
    """Each was a raw torch RuntimeError naming no argument (or no error at all)."""
    from c2f.losses import attribute_loss, soft_cross_entropy
    mixup = PartMixup(num_classes=5)
    for args, match in [((-1, 3), r"batch_size must be an int >= 1, got -1"),
                        ((4, 0), r"num_parts must be an int >= 1"),
                        ((2.5, 3), r"batch_size must be an int >= 1, got 2.5")]:
        with pytest.raises(ValueError, match=match):
            mixup.sample(*args)
    perm, mask = mixup.sample(4, 3, generator=torch.Generator().manual_seed(0))
    for labels, match in [(torch.tensor([0, 1, 5, 2]), r"labels must be class indices in \[0, num_classes=5\), got "
                                                          r"values in \[0, 5\]"),
                          (torch.tensor([0, -1, 2, 2]), r"labels must be class indices in \[0, num_classes=5\)"),
                          (torch.tensor([0.0, 1, 2, 3]), r"labels must be an int64 tensor \[B\]"),
                          (torch.tensor([0, 1, 2]), r"mask must be \[B=3, P\] or \[K, B=3, P\]")]:
        with pytest.raises(ValueError, match=match):
            mix_targets(labels, perm, mask, 5)
    with pytest.raises(ValueError, match=r"num_classes must be an int >= 1, got 0"):
        mix_targets(torch.tensor([0, 1, 2, 3]), perm, mask, 0)
    with pytest.raises(ValueError, match=r"perm must be an int64 tensor of shape \(4,\)"):
        mix_targets(torch.tensor([0, 1, 2, 3]), perm[:3], mask, 5)
    logits, targets = torch.randn(4, 5), torch.softmax(torch.randn(4, 5), -1)
    for call, error, match in [
        (lambda: soft_cross_entropy(logits, -targets), ValueError, r"targets must be probabilities in \[0, 1\]"),
        (lambda: soft_cross_entropy(torch.tensor(1.0), torch.tensor(1.0)), ValueError, r"\[\.\.\., num_classes >= 1\]"),
        (lambda: soft_cross_entropy(logits.long(), targets), TypeError, r"logits must be a floating tensor"),
        (lambda: attribute_loss(logits, targets, weight=-torch.ones(4, 5)), ValueError, r"weight must be >= 0"),
        (lambda: attribute_loss(logits, targets + 1, kind="bce"), ValueError, r"target must lie in \[0, 1\]"),
        (lambda: attribute_loss(logits[:0], targets[:0]), ValueError, r"one non-empty shape"),
        (lambda: attribute_loss(logits, targets, kind="l1"), ValueError, r"kind must be 'mse' or 'bce'"),
    ]:
        with pytest.raises(error, match=match):
            call()
