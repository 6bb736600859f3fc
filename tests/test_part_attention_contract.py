"""The part-attention op contract (folded formulation), checked for both implementations: the Triton
launchers (``c2f.kernels.part_attention``: compiled on a GPU, under the interpreter on CPU) and the torch
ops (``c2f.torch_ops.part_attention``), against float64 autograd.

The reference is the contract's math written plainly in float64 (LayerNorm, logits through the folded
queries g, softmax, weighted sum of the normalised tokens) and differentiated by autograd, with g,
gamma, beta and x as independent leaves: so dgamma is the gradient through the values only, as the
contract promises. Each case checks parts, attn, probs, mean, rstd and every gradient with one shared
upstream gradient.
"""
import contextlib

import pytest
import torch

from c2f.kernels import part_attention as triton_impl
from c2f.kernels import targets
from c2f.kernels.launch import plan_for
from c2f.torch_ops import part_attention as torch_impl
from tests.tf32 import emulating_tf32

pytestmark = pytest.mark.cuda     # runs compiled on the GPU where there is one (make test-gpu)

EPS = 1e-5
IMPLS = {"triton": triton_impl, "torch": torch_impl}
# The torch-op path also runs with one sample per chunk: the chunk loop is part of its contract.
IMPL_PARAMS = [pytest.param(("triton", 16.0), id="triton"), pytest.param(("torch", 16.0), id="torch"),
               pytest.param(("torch", 1e-6), id="torch-chunk1")]


def reference(x, g, gamma, beta, num_heads, dparts, dattn, eps=EPS):
    """float64: (parts, probs, mean, rstd, dg, dgamma, dbeta, dx) of the contract's math."""
    bsz, c, n = x.shape
    p, d = g.shape[1], c // num_heads
    x64, g64, gamma64, beta64 = (t.detach().cpu().double().requires_grad_(True) for t in (x, g, gamma, beta))
    dparts, dattn = dparts.cpu(), None if dattn is None else dattn.cpu()
    mean = x64.mean(1, keepdim=True)
    rstd = torch.rsqrt(x64.var(1, unbiased=False, keepdim=True) + eps)
    xhat = (x64 - mean) * rstd                                               # [B, C, N]
    probs = torch.einsum("jpc,bcn->bjpn", g64, xhat).softmax(-1)             # [B, h, P, N]
    t = (gamma64[:, None] * xhat + beta64[:, None]).view(bsz, num_heads, d, n)
    parts = torch.einsum("bjpn,bjdn->bpjd", probs, t).reshape(bsz, p, c)
    loss = (parts * dparts.double()).sum()
    if dattn is not None:
        loss = loss + (probs.mean(1) * dattn.double()).sum()
    loss.backward()
    return (parts.detach(), probs.detach(), mean[:, 0].detach(), rstd[:, 0].detach(),
            g64.grad, gamma64.grad, beta64.grad, x64.grad)


def assert_close(name, actual, expected, atol, rtol):
    """|actual - expected| <= atol * scale + rtol * |expected|, scale = max|expected| (at least 1)."""
    actual = actual.detach().double()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual - expected).abs()
    scale = max(1.0, expected.abs().max().item())
    bad = err > atol * scale + rtol * expected.abs()
    assert not bad.any(), (f"{name}: {int(bad.sum())} of {err.numel()} elements out of tolerance "
                           f"(atol={atol} x scale {scale:.3g}, rtol={rtol}); max abs diff {err.max().item():.3g}, "
                           f"mean abs diff {err.mean().item():.3g}")


def make_inputs(bsz, c, n, p, num_heads, dtype=torch.float32, layout="nchw", offset=0.0, with_dattn=True,
                device="cpu"):
    """x [B, C, N] in the requested layout (a view, as the module passes it), folded queries g scaled so
    the logits spread over a few units (a non-trivial softmax), and upstream gradients, on ``device``."""
    if layout == "nchw":
        x = torch.randn(bsz, c, n)
    elif layout == "channels_last":      # x4d.flatten(2) of a channels_last map: channel stride 1
        side = int(round(n ** 0.5))
        assert side * side == n
        x = torch.randn(bsz, c, side, side).contiguous(memory_format=torch.channels_last).flatten(2)
    elif layout == "tokens":             # tokens [B, N, C].transpose(1, 2)
        x = torch.randn(bsz, n, c).transpose(1, 2)
    else:
        raise ValueError(layout)
    x = (x + offset).to(dtype)
    g = torch.randn(num_heads, p, c) * (2.0 / c ** 0.5)
    gamma = 1.0 + 0.2 * torch.randn(c)
    beta = 0.2 * torch.randn(c)
    dparts = torch.randn(bsz, p, c)
    dattn = torch.randn(bsz, p, n) if with_dattn else None
    return tuple(None if t is None else t.to(device) for t in (x, g, gamma, beta, dparts, dattn))


def exact_precision(x: torch.Tensor) -> str:
    """The dot precision the contract tests hold to fp32 tolerances: "tf32" under the interpreter (which
    multiplies exactly whatever it is asked; the default path's constexpr is what runs), "ieee" on a GPU
    (where "tf32" has its own bounds: ``test_tf32_error_within_bounds``)."""
    return "ieee" if x.is_cuda else "tf32"


def run_and_compare(impl, x, g, gamma, beta, dparts, dattn, num_heads, atol, rtol, needs_dx=True, fp32_tol=None,
                    dot_precision=None):
    """Run ``impl`` = (name, chunk_mib) forward and backward, compare with ``reference``: (atol, rtol) for
    the outputs stored in x's dtype (parts, dx), ``fp32_tol`` (default FP32_TOL) for the fp32 ones."""
    name, chunk_mib = impl
    module = IMPLS[name]
    fp32_tol = FP32_TOL if fp32_tol is None else fp32_tol
    prec = exact_precision(x) if dot_precision is None else dot_precision
    parts, attn, probs, mean, rstd = module.folded_fwd(x, g, gamma, beta, EPS, x.dtype, chunk_mib, prec)
    dg, dgamma, dbeta, dx = module.folded_bwd(x, g if needs_dx else None, gamma, attn, probs, mean, rstd, dparts,
                                              dattn, num_heads, needs_dx, chunk_mib, prec)
    assert parts.dtype == x.dtype and attn.dtype == probs.dtype == torch.float32
    assert probs.shape == ((x.shape[0], num_heads) + attn.shape[1:] if num_heads > 1 else (0,))
    assert dg.dtype == dgamma.dtype == dbeta.dtype == torch.float32
    ref = [None if t is None else t.to(x.device) for t in reference(x, g, gamma, beta, num_heads, dparts, dattn)]
    got = {"parts": parts, "attn": attn, "mean": mean, "rstd": rstd, "dg": dg, "dgamma": dgamma, "dbeta": dbeta}
    want = dict(zip(("parts", "probs", "mean", "rstd", "dg", "dgamma", "dbeta"), ref[:7], strict=True))
    want["attn"] = want["probs"].mean(1)
    if num_heads > 1:
        got["probs"] = probs
    for key, actual in got.items():
        # fp32 statistics and gradients: the storage dtype only rounds x (already in the reference) and parts.
        assert_close(key, actual, want[key], *((atol, rtol) if key == "parts" else fp32_tol))
    if needs_dx:
        assert dx.dtype == x.dtype and dx.stride() == x.stride(), (dx.dtype, dx.stride(), x.stride())
        assert_close("dx", dx, ref[7], atol, rtol)
    else:
        assert dx is None


# Interpreter fp32 dots are exact fp32: errors seen are ~1e-6 of scale; fp16 / bf16 only round the
# stored parts and dx (bf16 stores round toward zero in the interpreter: up to one bf16 ulp, 2^-7).
FP32_TOL = (2e-5, 1e-4)
DTYPE_TOLS = [
    pytest.param(torch.float32, *FP32_TOL, id="fp32"),
    pytest.param(torch.float16, 2e-3, 2e-3, id="fp16"),
    pytest.param(torch.bfloat16, 1e-2, 1e-2, id="bf16"),
]


@pytest.mark.parametrize("impl", IMPL_PARAMS)
@pytest.mark.parametrize("bsz, num_heads, needs_dx", [(2, 1, True), (1, 16, False)])
def test_real_shape(impl, bsz, num_heads, needs_dx, device):
    """C=2048, 14x14, P=312: 1 head with dx (B=2), 16 heads without dx (the frozen-backbone case; B=1
    because the interpreter runs 16x the programs; batch handling is covered by every other case)."""
    inputs = make_inputs(bsz, 2048, 196, 312, num_heads, device=device)
    run_and_compare(impl, *inputs, num_heads, *FP32_TOL, needs_dx=needs_dx)


@pytest.mark.parametrize("impl", IMPL_PARAMS)
@pytest.mark.parametrize("bsz, c, n, p, num_heads", [
    (2, 256, 49, 40, 4),     # N = 49, several heads, dx through every head
    (2, 200, 49, 7, 1),      # C not a power of two nor a multiple of any block; P = 7
    (2, 200, 20, 7, 8),      # head width 25: channel blocks end mid-block at every head
    (3, 64, 16, 1, 2),       # P = 1, N = 16
    (1, 48, 5, 3, 1),        # N = 5: a mostly padded token block
])
def test_odd_shapes(impl, bsz, c, n, p, num_heads, device):
    run_and_compare(impl, *make_inputs(bsz, c, n, p, num_heads, device=device), num_heads, *FP32_TOL)


@pytest.mark.parametrize("impl", IMPL_PARAMS)
@pytest.mark.parametrize("layout", ["channels_last", "tokens"])
def test_strided_x_read_in_place(impl, layout, device):
    x, g, gamma, beta, dparts, dattn = make_inputs(2, 256, 49, 40, 2, layout=layout, device=device)
    assert not x.is_contiguous()
    run_and_compare(impl, x, g, gamma, beta, dparts, dattn, 2, *FP32_TOL)


@pytest.mark.parametrize("impl", IMPL_PARAMS)
@pytest.mark.parametrize("dtype, atol, rtol", DTYPE_TOLS)
def test_dtypes(impl, dtype, atol, rtol, device):
    run_and_compare(impl, *make_inputs(2, 256, 49, 40, 2, dtype=dtype, device=device), 2, atol, rtol)


@pytest.mark.parametrize("impl", IMPL_PARAMS)
def test_large_common_offset(impl, device):
    """x + 1000: fp32 itself resolves x only to 6e-5 there, and the mean stored in fp32 is off by up
    to half that; a sum-of-squares variance would lose everything."""
    x, g, gamma, beta, dparts, dattn = make_inputs(2, 512, 49, 40, 1, offset=1000.0, device=device)
    run_and_compare(impl, x, g, gamma, beta, dparts, dattn, 1, 2e-3, 2e-3, fp32_tol=(2e-4, 2e-3))


@pytest.mark.parametrize("impl", IMPL_PARAMS)
def test_constant_tokens(impl, device):
    """Zero-variance tokens: rstd = 1/sqrt(eps), normalised values 0, no NaN anywhere."""
    x, g, gamma, beta, dparts, dattn = make_inputs(2, 256, 49, 40, 2, device=device)
    x[:, :, 3] = 0.5
    x[1, :, 10] = -2.0
    run_and_compare(impl, x, g, gamma, beta, dparts, dattn, 2, *FP32_TOL)


@pytest.mark.parametrize("impl", IMPL_PARAMS)
def test_without_dattn(impl, device):
    x, g, gamma, beta, dparts, _ = make_inputs(2, 128, 49, 7, 1, with_dattn=False, device=device)
    run_and_compare(impl, x, g, gamma, beta, dparts, None, 1, *FP32_TOL)


def test_gpu_block_sizes(device):
    """The production (GPU) tile sizes, several chunks per loop, on a small shape."""
    with plan_for(targets.TARGETS["sm_80"]):
        run_and_compare(("triton", 16.0), *make_inputs(2, 200, 49, 70, 2, device=device), 2, *FP32_TOL)
        run_and_compare(("triton", 16.0), *make_inputs(1, 96, 36, 7, 1, layout="channels_last", device=device), 1,
                        *FP32_TOL)


@pytest.mark.parametrize("impl", IMPL_PARAMS)
def test_non_contiguous_upstream_gradients(impl, device):
    x, g, gamma, beta, dparts, dattn = make_inputs(2, 64, 16, 7, 2, device=device)
    run_and_compare(impl, x, g, gamma, beta, dparts.transpose(0, 1).contiguous().transpose(0, 1),
                    dattn.half()[:, :, :].transpose(1, 2).contiguous().transpose(1, 2), 2, *FP32_TOL)


def test_bad_inputs_are_named(device):
    K = triton_impl
    x, g, gamma, beta, dparts, dattn = make_inputs(1, 64, 16, 7, 2, device=device)
    with pytest.raises(ValueError, match="x must be a \\[B, C, N\\]"):
        K.folded_fwd(x[0], g, gamma, beta, EPS, x.dtype, 16.0)
    with pytest.raises(TypeError, match="x must be float32"):
        K.folded_fwd(x.double(), g, gamma, beta, EPS, x.dtype, 16.0)
    with pytest.raises(ValueError, match="g must have shape"):
        K.folded_fwd(x, g[:, :, :32].contiguous(), gamma, beta, EPS, x.dtype, 16.0)
    with pytest.raises(ValueError, match="num_heads"):
        K.folded_fwd(x, torch.randn(3, 7, 64, device=device), gamma, beta, EPS, x.dtype, 16.0)
    with pytest.raises(TypeError, match="gamma must have dtype"):
        K.folded_fwd(x, g, gamma.half(), beta, EPS, x.dtype, 16.0)
    with pytest.raises(ValueError, match="x has N=2000 tokens"):
        K.folded_fwd(torch.randn(1, 64, 2000, device=device), g, gamma, beta, EPS, x.dtype, 16.0)
    parts, attn, probs, mean, rstd = K.folded_fwd(x, g, gamma, beta, EPS, x.dtype, 16.0)
    with pytest.raises(ValueError, match="dparts must have shape"):
        K.folded_bwd(x, None, gamma, attn, probs, mean, rstd, dparts[:, :3], dattn, 2, False, 16.0)
    with pytest.raises(ValueError, match="dattn must have shape"):
        K.folded_bwd(x, None, gamma, attn, probs, mean, rstd, dparts, dattn[:, :, :4], 2, False, 16.0)
    with pytest.raises(ValueError, match="probs must have shape"):
        K.folded_bwd(x, None, gamma, attn, probs[:, :1], mean, rstd, dparts, dattn, 2, False, 16.0)


def test_implementations_share_signatures():
    """One contract: the Triton launchers and the torch ops have exactly the same functions and signatures."""
    import inspect
    for name in triton_impl.__all__:
        assert name in torch_impl.__all__, name
        assert inspect.signature(getattr(triton_impl, name)) == inspect.signature(getattr(torch_impl, name)), name


# ------------------------------------------------------------------------------------------ precision
# Normwise relative error max|got - truth| / max|truth| of each quantity per dot precision (docs/design.md,
# "Precision"), with u the unit roundoff of the operands' format: TF32 keeps 10 mantissa bits and a
# tensor core truncates fp32 operands to them (u = 2^-10 per operand, not 2^-11: no rounding); bf16 keeps
# 7 (2^-8 rounding to nearest), fp16 10 (2^-11). Measured with the interpreter's TF32 emulation
# (tests/tf32.py), normwise, over B=2 at [C, N, P, h] = [256, 49, 40, 2], [512, 49, 40, 1] (also with
# x + 1000) and the production [2048, 196, 312, 1]: TF32 parts <= 2.1e-3, attn <= 1.2e-3, dG <= 2.6e-3,
# dgamma <= 2.1e-3, dx <= 2.5e-3, i.e. at most 2.7 u; bf16 operands parts <= 7.1e-3, attn <= 4.3e-3,
# dG <= 5.9e-3, dgamma <= 5.0e-3, dx <= 4.9e-3, at most 1.9 u. Bounds: 4 u for every quantity (dbeta has
# no product: fp32). The error of each quantity is that of one or two chained products of u-rounded
# operands (scores, then probs x tokens), so it scales with u, not with C or N.
PRECISION_BOUNDS = {"ieee": 2e-5, "tf32": 4 * 2 ** -10, "bf16": 4 * 2 ** -8, "fp16": 4 * 2 ** -11}
PRECISION_FLOORS = {"tf32": 2 ** -14, "bf16": 2 ** -12, "fp16": 2 ** -15}   # rounding must be visible


def precision_errors(dot_precision, device, shape=(2, 256, 49, 40, 2)):
    """Normwise relative errors of the Triton path at ``dot_precision``: compiled on a GPU (real TF32),
    under the interpreter on CPU with TF32 emulated."""
    bsz, c, n, p, h = shape
    x, g, gamma, beta, dparts, dattn = make_inputs(bsz, c, n, p, h, device=device)
    emulate = emulating_tf32() if device == "cpu" else contextlib.nullcontext()
    with emulate:
        parts, attn, probs, mean, rstd = triton_impl.folded_fwd(x, g, gamma, beta, EPS, x.dtype, 16.0, dot_precision)
        dg, dgamma, dbeta, dx = triton_impl.folded_bwd(x, g, gamma, attn, probs, mean, rstd, dparts, dattn, h, True,
                                                       16.0, dot_precision)
    ref = dict(zip(("parts", "probs", "mean", "rstd", "dg", "dgamma", "dbeta", "dx"),
                   reference(x, g, gamma, beta, h, dparts, dattn), strict=True))
    ref["attn"] = ref["probs"].mean(1)
    got = dict(parts=parts, attn=attn, probs=probs, dg=dg, dgamma=dgamma, dbeta=dbeta, dx=dx)
    return {k: ((v.detach().cpu().double() - ref[k]).abs().max() / ref[k].abs().max()).item() for k, v in got.items()}


@pytest.mark.parametrize("dot_precision", ["tf32", "bf16", "fp16"])
def test_reduced_precision_error_within_bounds(dot_precision, device):
    """TF32 (the default on a GPU) and the autocast operand precisions: every quantity within its bound,
    and the rounding visible (so the emulation, or the hardware, is really at work)."""
    errors = precision_errors(dot_precision, device)
    bound = PRECISION_BOUNDS[dot_precision]
    for key in ("parts", "attn", "probs", "dg", "dgamma", "dx"):
        assert errors[key] <= bound, f"{dot_precision} {key}: normwise error {errors[key]:.3g} > bound {bound:.3g}"
    assert errors["dbeta"] <= PRECISION_BOUNDS["ieee"], errors
    assert max(errors["parts"], errors["dg"]) > PRECISION_FLOORS[dot_precision], (
        f"{dot_precision}: errors {errors} show no operand rounding")


def test_ieee_is_exact_fp32_even_with_tf32_emulated(device):
    """"ieee" dots are fp32 products: the TF32 emulation (or hardware) leaves them alone."""
    errors = precision_errors("ieee", device)
    assert max(errors.values()) <= PRECISION_BOUNDS["ieee"], errors


# ------------------------------------------------------------------------------ short rows and tiles
# Where a whole row of scores fits (N <= ROW_TOKENS and the target's limits), one forward and one backward
# kernel keep the rows on chip (plans_part_attention.short_rows); longer rows take the tiled kernels.
ROWS_KERNELS = {"_part_attention_fwd_rows_kernel", "_part_attention_bwd_rows_kernel"}
TILED_KERNELS = {"_part_attention_stats_kernel", "_part_attention_fwd_scores_kernel",
                 "_part_attention_fwd_softmax_kernel", "_part_attention_fwd_parts_kernel",
                 "_part_attention_bwd_dp_kernel", "_part_attention_bwd_softmax_kernel"}


def launched_kernels(x, g, num_heads, needs_dx, target, with_dattn=True, with_dparts=True):
    """Names of the kernels the launchers launch for these shapes on ``target`` (recorded on meta tensors)."""
    return set(launch_sequence(x, g, num_heads, needs_dx, target, with_dattn, with_dparts))


def launch_sequence(x, g, num_heads, needs_dx, target, with_dattn=True, with_dparts=True):
    """``launched_kernels`` in launch order, one name a launch (forward, then backward)."""
    from c2f.kernels.launch import recording
    bsz, c, n = x.shape
    p = g.shape[1]
    meta = dict(device="meta")
    xm, gm = torch.empty(x.shape, dtype=x.dtype, **meta), torch.empty(g.shape, **meta)
    with recording(target) as launches:
        parts, attn, probs, mean, rstd = triton_impl.folded_fwd(xm, gm, torch.empty(c, **meta), torch.empty(c, **meta),
                                                                EPS, x.dtype, 16.0)
        triton_impl.folded_bwd(xm, gm, torch.empty(c, **meta), attn, probs, mean, rstd,
                               torch.empty(bsz, p, c, **meta) if with_dparts else None,
                               torch.empty(bsz, p, n, **meta) if with_dattn else None, num_heads, needs_dx, 16.0)
    return [launch.name for launch in launches]


SHORT_ROW_TILES = [pytest.param(None, id="interpreter-tiles"), pytest.param("sm_86", id="sm_86-tiles"),
                   pytest.param("gfx942", id="gfx942-tiles")]


@pytest.mark.parametrize("tiles", SHORT_ROW_TILES)
@pytest.mark.parametrize("bsz, c, n, p, num_heads, dtype, atol, rtol, needs_dx", [
    (2, 200, 49, 7, 1, torch.float32, *FP32_TOL, True),        # N = 49, P = 7, C = 200 (no block divides it)
    (1, 72, 196, 312, 1, torch.float16, 2e-3, 2e-3, False),    # the production N and P (P over several blocks)
    (2, 40, 256, 1, 1, torch.bfloat16, 1e-2, 1e-2, True),      # N = 256, the longest short row; P = 1
    (1, 100, 196, 7, 4, torch.float32, *FP32_TOL, True),       # heads of 25 channels
    (2, 48, 257, 7, 2, torch.float32, *FP32_TOL, False),       # N = 257: the tiled kernels
])
def test_short_rows_and_the_tiled_path_past_them(tiles, bsz, c, n, p, num_heads, dtype, atol, rtol, needs_dx, device):
    """The short-row kernels where N <= 256, the tiled ones past it: the same contract, at odd shapes, on the
    interpreter's tiles and on the GPU tiles of a 99 KiB and a 64 KiB target."""
    target = targets.TARGETS[tiles] if tiles else targets.current(torch.device(device))
    inputs = make_inputs(bsz, c, n, p, num_heads, dtype=dtype, device=device)
    names = launched_kernels(inputs[0], inputs[1], num_heads, needs_dx, target)
    short = n <= 256
    assert (ROWS_KERNELS <= names) == short and (not TILED_KERNELS & names) == short, names
    with plan_for(target) if tiles else contextlib.nullcontext():
        run_and_compare(("triton", 16.0), *inputs, num_heads, atol, rtol, needs_dx=needs_dx)


@pytest.mark.parametrize("with_dparts, with_dattn", [(False, True), (True, False)])
@pytest.mark.parametrize("needs_dx", [True, False])
def test_short_rows_without_one_upstream_gradient(with_dparts, with_dattn, needs_dx, device):
    """Only dattn (the parts unused: no pass over x in the row kernel, zero dgamma / dbeta) or only dparts."""
    x, g, gamma, beta, dparts, dattn = make_inputs(2, 64, 49, 7, 2, device=device)
    names = launched_kernels(x, g, 2, needs_dx, targets.current(torch.device(device)), with_dattn, with_dparts)
    assert ROWS_KERNELS <= names and not TILED_KERNELS & names, names
    if with_dparts:
        run_and_compare(("triton", 16.0), x, g, gamma, beta, dparts, None, 2, *FP32_TOL, needs_dx=needs_dx)
        return
    # The contract with zero dparts (checked against float64), then dparts=None must give the same.
    run_and_compare(("triton", 16.0), x, g, gamma, beta, torch.zeros_like(dparts), dattn, 2, *FP32_TOL,
                    needs_dx=needs_dx)
    state = triton_impl.folded_fwd(x, g, gamma, beta, EPS, x.dtype, 16.0)[1:]
    want = triton_impl.folded_bwd(x, g, gamma, *state, torch.zeros_like(dparts), dattn, 2, needs_dx, 16.0)
    got = triton_impl.folded_bwd(x, g, gamma, *state, None, dattn, 2, needs_dx, 16.0)
    assert not got[1].any() and not got[2].any()
    for name, a, b in zip(("dg", "dgamma", "dbeta", "dx"), got, want, strict=True):
        if needs_dx or name != "dx":
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)


@pytest.fixture
def tiled_only(monkeypatch):
    """The tiled kernels at every N (no row fits), as on a target too small for the short-row kernels."""
    from c2f.kernels import plans_part_attention
    monkeypatch.setattr(plans_part_attention, "ROW_TOKENS", 0)


@pytest.mark.parametrize("bsz, c, n, p, num_heads, dtype, atol, rtol", [
    (2, 200, 49, 7, 1, torch.float32, *FP32_TOL),
    (2, 256, 49, 40, 2, torch.bfloat16, 1e-2, 1e-2),
    (1, 48, 5, 3, 1, torch.float16, 2e-3, 2e-3),
])
def test_tiled_path_at_short_rows(tiled_only, bsz, c, n, p, num_heads, dtype, atol, rtol, device):
    """The tiled kernels keep their contract at the N where the short-row kernels normally run."""
    inputs = make_inputs(bsz, c, n, p, num_heads, dtype=dtype, device=device)
    names = launched_kernels(inputs[0], inputs[1], num_heads, True, targets.current(torch.device(device)))
    assert TILED_KERNELS <= names and not ROWS_KERNELS & names, names
    run_and_compare(("triton", 16.0), *inputs, num_heads, atol, rtol)


def test_launches_per_step_depend_on_neither_heads_nor_batch():
    """Triton launches per forward + backward (short rows, x frozen, N = 196, sm_90's plans): 1 + 2 at 1 head
    and at 16, at B = 2 and 64; the heads are a grid axis, never a loop of launches."""
    def names(bsz, h):
        x, g = torch.empty(bsz, 2048, 196, device="meta"), torch.empty(h, 312, 2048, device="meta")
        return launch_sequence(x, g, h, False, targets.TARGETS["sm_90"])
    one = names(2, 1)
    assert len(one) == 3, one
    for bsz, h in ((64, 1), (2, 16), (64, 16)):
        assert names(bsz, h) == one
