"""LayerNorm statistics given with x (issue 24 item 2): the part-attention and head ops take the tokens' mean
and biased variance (``x_stats = (x_mean, x_var)``, the feature cache's) instead of computing them.

With them, outputs and every gradient equal the on-the-fly path to 1e-6 relative (fp32), on both
implementations, folded and unfolded, the head fused and materialised; no statistics pass runs (no
reduction over channels on the torch path, no statistics kernel on the Triton path, the short-row kernel
reading them); when x requires grad they are ignored; a bad argument raises an error naming it.
"""
import inspect

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from c2f import nn as cn
from c2f import reference
from c2f._validate import feature_map_as_channels
from c2f.torch_ops import c2f_head as torch_head
from c2f.torch_ops import part_attention as torch_attention

REL = 1e-6          # normwise: max|with - without| <= REL x max|without|
EPS = 1e-5


def cache_stats(x: torch.Tensor):
    """What the feature cache stores for x (a map or tokens): per token, the mean and the biased variance over
    channels, in float64 from the fp32 values, rounded to fp32."""
    tokens = feature_map_as_channels(x, x.shape[1] if x.dim() == 4 else x.shape[2]).double()     # [B, C, N]
    return tokens.mean(1).float(), tokens.var(1, unbiased=False).float()


def features(b=3, c=64, hw=(5, 5), seed=0):
    """Frozen features with per-token offsets and scales, as a backbone's are (not zero-mean, not unit-std)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, *hw, generator=gen)
    return x * (0.5 + torch.rand(b, 1, *hw, generator=gen)) + torch.randn(b, 1, *hw, generator=gen)


def assert_rel(name, got, want, rel=REL):
    err = (got.double() - want.double()).abs().max().item()
    scale = want.double().abs().max().item()
    assert err <= rel * scale, f"{name}: max abs diff {err:.3e} exceeds {rel:g} x max|without| {scale:.3e}"


def run(module, x, grads, **kwargs):
    """Outputs and every parameter's gradient of ``module(x, **kwargs)`` under the upstream ``grads``."""
    module.zero_grad(set_to_none=True)
    out = tuple(module(x, **kwargs))
    torch.autograd.backward(out, [g.to(o.dtype) for g, o in zip(grads, out, strict=True)])
    res = {f"out{i}": o.detach() for i, o in enumerate(out)}
    res.update({n: p.grad.detach() for n, p in module.named_parameters() if p.grad is not None})
    return res


def upstream(module, x, **kwargs):
    with torch.no_grad():
        out = module(x, **kwargs)
    gen = torch.Generator().manual_seed(7)
    return [torch.randn(o.shape, generator=gen) for o in out]


def assert_same_with_stats(module, x, **kwargs):
    """``module`` with the cache's statistics equals it without them, outputs and every gradient."""
    grads = upstream(module, x, **kwargs)
    without = run(module, x, grads, **kwargs)
    given = run(module, x, grads, x_stats=cache_stats(x), **kwargs)
    assert set(given) == set(without) and len(without) >= 6
    for name, want in without.items():
        assert_rel(name, given[name], want)


def attention(backend, formulation, heads=1, chunk_mib=16.0):
    torch.manual_seed(0)
    module = cn.PartAttention(64, 6, heads, qkv_bias=True, backend=backend, formulation=formulation,
                              chunk_mib=chunk_mib, dot_precision="ieee")
    with torch.no_grad():
        module.norm.weight.uniform_(0.5, 1.5)
        module.norm.bias.normal_(0, 0.5)
        module.queries.normal_(0, 1.0)
    return module


def head(backend, materialize_parts, heads=1):
    torch.manual_seed(1)
    module = cn.C2FHead(64, 6, 5, heads, qkv_bias=True, backend=backend, materialize_parts=materialize_parts,
                        dot_precision="ieee")
    with torch.no_grad():
        module.attention.norm.weight.uniform_(0.5, 1.5)
        module.attention.norm.bias.normal_(0, 0.5)
        module.attention.queries.normal_(0, 1.0)
    return module


def pairing(b=4, k=2, p=6):
    gen = torch.Generator().manual_seed(3)
    return torch.arange(b).flip(0), (torch.rand(k, b, p, generator=gen) < 0.5).float()


# ------------------------------------------------------------------------------------------ parity

@pytest.mark.parametrize("formulation, heads", [("folded", 1), ("folded", 2), ("unfolded", 2)])
@pytest.mark.parametrize("chunk_mib", [16.0, 1e-3])      # one chunk, then a chunk per sample
def test_attention_torch_equals_on_the_fly(formulation, heads, chunk_mib):
    assert_same_with_stats(attention("torch", formulation, heads, chunk_mib), features())


def test_attention_takes_stats_of_tokens():
    """Tokens ``[B, N, C]``: the statistics are per token, ``[B, N]``, as for a map."""
    x = features().flatten(2).transpose(1, 2).contiguous()
    assert_same_with_stats(attention("torch", "folded"), x)


@pytest.mark.interpreter
@pytest.mark.cuda
@pytest.mark.parametrize("formulation, heads, tiled", [("folded", 1, False), ("folded", 2, False),
                                                       ("folded", 1, True), ("unfolded", 2, False)])
def test_attention_triton_equals_on_the_fly(formulation, heads, tiled, device, monkeypatch):
    """Short rows (the forward kernel reads the statistics) and tiled (no statistics kernel)."""
    if tiled:
        from c2f.kernels import plans_part_attention
        monkeypatch.setattr(plans_part_attention, "ROW_TOKENS", 0)
    assert_same_with_stats(attention("triton", formulation, heads).to(device), features().to(device))


@pytest.mark.parametrize("materialize_parts", [False, True])
@pytest.mark.parametrize("heads", [1, 2])
def test_head_torch_equals_on_the_fly(materialize_parts, heads):
    perm, mask = pairing()
    assert_same_with_stats(head("torch", materialize_parts, heads), features(b=4, seed=2), perm=perm, mask=mask)


@pytest.mark.interpreter
@pytest.mark.cuda
@pytest.mark.parametrize("materialize_parts", [False, True])
@pytest.mark.parametrize("heads", [1, 2])
def test_head_triton_equals_on_the_fly(materialize_parts, heads, device):
    perm, mask = (t.to(device) for t in pairing())
    assert_same_with_stats(head("triton", materialize_parts, heads).to(device), features(b=4, seed=2).to(device),
                           perm=perm, mask=mask)


def test_head_without_mixup_equals_on_the_fly():
    assert_same_with_stats(head("torch", False), features(b=4, seed=2))


MODULES = {"folded": lambda: attention("torch", "folded"), "unfolded": lambda: attention("torch", "unfolded"),
           "head": lambda: head("torch", False), "materialised": lambda: head("torch", True)}


@pytest.mark.parametrize("which", list(MODULES))
def test_the_statistics_are_used(which):
    """Statistics other than x's change the result: the op reads what it is given."""
    module = MODULES[which]()
    x = features()
    x_mean, x_var = cache_stats(x)
    with torch.no_grad():
        given = module(x, x_stats=(x_mean, x_var))
        shifted = module(x, x_stats=(x_mean + 0.5, x_var))
    assert (given[0] - shifted[0]).abs().max() > 1e-3


# --------------------------------------------------------------------------- no statistics pass

class _ChannelReductions(TorchDispatchMode):
    """Counts the token statistics the torch ops compute: a mean or a vector norm over the channels of a
    ``[C, b, N]`` map."""

    def __init__(self, c: int):
        super().__init__()
        self.c, self.count = c, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mean, torch.ops.aten.linalg_vector_norm):
            t = args[0]
            self.count += t.dim() == 3 and t.shape[0] == self.c
        return func(*args, **(kwargs or {}))


def _attention_weights(c=64, p=6, h=2):
    gen = torch.Generator().manual_seed(4)
    g = torch.randn(h, p, c, generator=gen) / c
    q, wg = torch.randn(h, p, c // h, generator=gen), torch.randn(c, c, generator=gen) / c
    return g, q, wg, 1 + 0.1 * torch.randn(c, generator=gen), 0.1 * torch.randn(c, generator=gen)


def _torch_forwards(x, stats):
    """The three torch-op forwards that compute token statistics, with ``stats`` (x_mean, x_var) or None."""
    g, q, wg, gamma, beta = _attention_weights(x.shape[1])
    perm, mask = pairing(x.shape[0], p=g.shape[1])
    extra = () if stats is None else stats
    torch_attention.folded_fwd(x, g, gamma, beta, EPS, x.dtype, 16.0, "tf32", "mean", *extra)
    torch_attention.unfolded_fwd(x, q, wg, gamma, beta, EPS, x.dtype, 16.0, "tf32", "mean", *extra)
    torch_head.c2f_head_fwd(x, g, torch.randn(g.shape[1], x.shape[1]), torch.randn(5, x.shape[1]), perm, mask, EPS,
                            16.0, "tf32", "mean", *extra)


def test_no_statistics_pass_on_the_torch_path():
    fmap = features(b=4)
    x = fmap.flatten(2)
    with _ChannelReductions(x.shape[1]) as counted:
        _torch_forwards(x, None)
    assert counted.count >= 3                 # the counter sees them: one per forward at least
    with _ChannelReductions(x.shape[1]) as counted:
        _torch_forwards(x, cache_stats(fmap))
    assert counted.count == 0


def _launched(tiled: bool, stats: bool, monkeypatch):
    """``(kernel name, constexprs)`` of the Triton forwards' launches, recorded on meta tensors."""
    from c2f.kernels import c2f_head as triton_head
    from c2f.kernels import part_attention as triton_attention
    from c2f.kernels import plans_part_attention, targets
    from c2f.kernels.launch import recording
    if tiled:
        monkeypatch.setattr(plans_part_attention, "ROW_TOKENS", 0)
    b, c, n, p = 2, 64, 25, 6
    meta = dict(device="meta")
    x, g = torch.empty(b, c, n, **meta), torch.empty(2, p, c, **meta)
    extra = (torch.empty(b, n, **meta), torch.empty(b, n, **meta)) if stats else ()
    with recording(targets.TARGETS["sm_90"]) as launches:
        triton_attention.folded_fwd(x, g, torch.empty(c, **meta), torch.empty(c, **meta), EPS, x.dtype, 16.0,
                                    "tf32", "mean", *extra)
        triton_head.c2f_head_fwd(x, g, torch.empty(p, c, **meta), torch.empty(5, c, **meta),
                                 torch.empty(b, dtype=torch.int64, **meta), torch.empty(4, b, p, **meta), EPS, 16.0,
                                 "tf32", "mean", *extra)
    return [(launch.name, launch.plan.constexprs) for launch in launches]


@pytest.mark.parametrize("tiled", [False, True])
def test_no_statistics_kernel_on_the_triton_path(tiled, monkeypatch):
    stats_kernel = "_part_attention_stats_kernel"
    without = _launched(tiled, False, monkeypatch)
    given = _launched(tiled, True, monkeypatch)
    assert [name for name, _ in without].count(stats_kernel) == (2 if tiled else 1)
    assert stats_kernel not in [name for name, _ in given]
    rows = [flags["HAS_STATS"] for name, flags in given + without if name == "_part_attention_fwd_rows_kernel"]
    assert rows == ([] if tiled else [True, False])       # the short-row kernel reads them instead


# ------------------------------------------------------------------ the modules pass them, or not

class _OpInputs(TorchDispatchMode):
    """The ``x_mean, x_var`` arguments of the c2f forward ops dispatched inside the mode."""

    def __init__(self):
        super().__init__()
        self.stats = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        names = [a.name for a in func._schema.arguments]
        if "x_mean" in names:
            self.stats[func._schema.name] = (args[names.index("x_mean")], args[names.index("x_var")])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("which, op", [("folded", "c2f::part_attention_folded"),
                                       ("unfolded", "c2f::part_attention_unfolded"), ("head", "c2f::c2f_head"),
                                       ("materialised", "c2f::part_attention_folded")])
def test_modules_pass_the_statistics_unless_x_requires_grad(which, op):
    """x frozen: the op gets them. x requiring grad (features that train): the op gets none and computes its
    own, so the result (values and gradients) is the on-the-fly one exactly, whatever statistics came."""
    module = MODULES[which]()
    x = features()
    x_mean, x_var = cache_stats(x)
    with _OpInputs() as seen, torch.no_grad():
        module(x, x_stats=(x_mean, x_var))
    assert seen.stats[op][0] is not None and torch.equal(seen.stats[op][1], x_var)
    xg = x.clone().requires_grad_(True)
    with _OpInputs() as seen:
        out = module(xg, x_stats=(x_mean + 1, x_var))
    assert seen.stats[op] == (None, None)
    out[0].sum().backward()
    dx = xg.grad.clone()
    xg.grad = None
    expected = module(xg)
    expected[0].sum().backward()
    torch.testing.assert_close(out[0], expected[0], rtol=0, atol=0)
    torch.testing.assert_close(dx, xg.grad, rtol=0, atol=0)


def test_reference_modules_accept_and_ignore_the_statistics():
    """Same forward signatures as the fused modules; the reference's LayerNorm computes its own."""
    for ref, fused in ((reference.PartAttention, cn.PartAttention), (reference.C2FHead, cn.C2FHead)):
        assert inspect.signature(ref.forward) == inspect.signature(fused.forward)
    torch.manual_seed(0)
    ref = reference.PartAttention(64, 6, 2)
    x = features()
    with torch.no_grad():
        x_mean, x_var = cache_stats(x)
        for a, b in zip(ref(x), ref(x, x_stats=(x_mean + 1, x_var)), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("bad, error, match", [
    (lambda m, v: m, TypeError, r"x_stats must be a pair \(x_mean, x_var\) or None, got Tensor"),
    (lambda m, v: (m, v, v), TypeError, r"x_stats must be a pair"),
    (lambda m, v: (m, None), TypeError, r"x_stats' x_var must be a torch.Tensor, got NoneType"),
    (lambda m, v: (m[:, :-1], v), ValueError, r"x_stats' x_mean must be a \[B, N\] = \[3, 25\] torch.float32"),
    (lambda m, v: (m, v.T), ValueError, r"x_stats' x_var must be a \[B, N\] = \[3, 25\].*got shape \(25, 3\)"),
    (lambda m, v: (m.half(), v), ValueError, r"x_stats' x_mean .*got shape \(3, 25\), dtype torch.float16"),
    (lambda m, v: (m, v.double()), ValueError, r"x_stats' x_var .*dtype torch.float64"),
    (lambda m, v: (m, v.to("meta")), ValueError, r"x_stats' x_var .* on cpu .*device meta"),
    (lambda m, v: (m.requires_grad_(), v), ValueError, r"x_stats' x_mean requires grad.*x_mean.detach\(\)"),
])
@pytest.mark.parametrize("which", ["folded", "head"])
def test_bad_statistics_name_the_argument(bad, error, match, which):
    module = MODULES[which]()
    x = features()
    x_mean, x_var = cache_stats(x)
    with pytest.raises(error, match=match):
        module(x, x_stats=bad(x_mean, x_var))


def test_the_implementations_check_what_they_are_given():
    fmap = features()
    x = fmap.flatten(2)
    g, _, _, gamma, beta = _attention_weights()
    x_mean, x_var = cache_stats(fmap)
    with pytest.raises(ValueError, match="x_mean and x_var are given together or not at all, got only x_mean"):
        torch_attention.folded_fwd(x, g, gamma, beta, EPS, x.dtype, 16.0, "tf32", "mean", x_mean)
    pytest.importorskip("triton")
    from c2f.kernels import part_attention as triton_attention
    with pytest.raises(ValueError, match="got only x_var"):
        triton_attention.folded_fwd(x, g, gamma, beta, EPS, x.dtype, 16.0, "tf32", "mean", None, x_var)
    with pytest.raises(TypeError, match=r"x_var must have dtype in \['torch.float32'\]"):
        triton_attention.folded_fwd(x, g, gamma, beta, EPS, x.dtype, 16.0, "tf32", "mean", x_mean, x_var.double())
    with pytest.raises(ValueError, match=r"x_mean must have shape \(3, 25\)"):
        triton_attention.folded_fwd(x, g, gamma, beta, EPS, x.dtype, 16.0, "tf32", "mean", x_mean[:2], x_var)
