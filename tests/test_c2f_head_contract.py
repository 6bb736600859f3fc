"""The fused C2F head's op contract, checked for both implementations: the Triton launchers
(``c2f.kernels.c2f_head``, under the interpreter) and the torch ops (``c2f.torch_ops.c2f_head``),
against float64 autograd.

The reference is the head's math written the obvious way in float64: LayerNorm, the scores through the
folded queries g, softmax, the part features ``F = P_j xhat_j^T`` (formed here, never in the
implementations), the readout ``<F, wrg>``, the part-wise mix ``m F[b] + (1 - m) F[perm b]``, the mean
over parts and the classifier ``wcg``; differentiated by autograd with x, g, wrg and wcg as independent
leaves. Each case checks the outputs, the saved state and every gradient with one shared upstream
gradient.
"""
import contextlib
import inspect

import pytest
import torch

from c2f.kernels import c2f_head as triton_impl
from c2f.kernels import launch, plans, targets
from c2f.torch_ops import c2f_head as torch_impl
from tests.test_part_attention_contract import FP32_TOL, PRECISION_BOUNDS, PRECISION_FLOORS, assert_close
from tests.tf32 import emulating_tf32

EPS = 1e-5
IMPLS = {"triton": triton_impl, "torch": torch_impl}
# The torch-op path also runs with one sample per chunk: the chunk loop is part of its contract.
IMPL_PARAMS = [pytest.param(("triton", 16.0), id="triton"), pytest.param(("torch", 16.0), id="torch"),
               pytest.param(("torch", 1e-6), id="torch-chunk1")]
OUTPUTS = ("attn", "pred", "logits", "probs", "zhat", "mean", "rstd")


def reference(x, g, wrg, wcg, perm, mask, dattn, dpred, dlogits, eps=EPS):
    """float64: ``({output: value}, {gradient: value})`` of the head's plain math."""
    bsz, c, n = x.shape
    h, p, _ = g.shape
    d = c // h
    x64, g64, wrg64, wcg64 = (t.detach().double().requires_grad_(True) for t in (x, g, wrg, wcg))
    mean = x64.mean(1, keepdim=True)
    rstd = torch.rsqrt(x64.var(1, unbiased=False, keepdim=True) + eps)
    xhat = (x64 - mean) * rstd                                                   # [B, C, N]
    probs = torch.einsum("jpc,bcn->bjpn", g64, xhat).softmax(-1)                 # [B, h, P, N]
    zhat = torch.einsum("pjd,bjdn->bjpn", wrg64.view(p, h, d), xhat.view(bsz, h, d, n))
    parts = torch.einsum("bjpn,bjdn->bpjd", probs, xhat.view(bsz, h, d, n)).reshape(bsz, p, c)
    attn = probs.mean(1)
    pred = (parts * wrg64).sum(-1)
    m = mask.double()[..., None]                                                 # [K, B, P, 1]
    pooled = (m * parts + (1 - m) * parts[perm]).mean(-2)                        # [K, B, C]
    logits = pooled @ wcg64.T
    loss = 0
    for out, grad in ((attn, dattn), (pred, dpred), (logits, dlogits)):
        if grad is not None:
            loss = loss + (out * grad.double()).sum()
    leaves = (x64, g64, wrg64, wcg64)
    grads = torch.autograd.grad(loss, leaves, allow_unused=True) if torch.is_tensor(loss) else (None,) * 4
    grads = [torch.zeros_like(t) if gr is None else gr for t, gr in zip(leaves, grads, strict=True)]
    outputs = dict(attn=attn, pred=pred, logits=logits, probs=probs, zhat=zhat, mean=mean[:, 0], rstd=rstd[:, 0])
    return ({k: v.detach() for k, v in outputs.items()},
            dict(zip(("dx", "dg", "dwrg", "dwcg"), grads, strict=True)))


def make_inputs(bsz, c, n, p, h, k, classes=5, dtype=torch.float32, perm=None, layout="nchw"):
    """x (in the requested layout), folded weights scaled so the logits spread over a few units, a
    pairing (the flip by default: an odd batch pairs its middle sample with itself), fractional masks."""
    if layout == "channels_last":
        side = int(round(n ** 0.5))
        x = torch.randn(bsz, c, side, side).contiguous(memory_format=torch.channels_last).flatten(2)
    else:
        x = torch.randn(bsz, c, n)
    x = x.to(dtype)
    g = torch.randn(h, p, c) * (2.0 / c ** 0.5)
    wrg = torch.randn(p, c) / c ** 0.5
    wcg = torch.randn(classes, c) / c ** 0.5
    perm = torch.arange(bsz).flip(0) if perm is None else torch.as_tensor(perm)
    mask = torch.rand(k, bsz, p)
    return x, g, wrg, wcg, perm, mask


def upstream(bsz, p, n, k, classes, which=("attn", "pred", "logits")):
    return (torch.randn(bsz, p, n) if "attn" in which else None, torch.randn(bsz, p) if "pred" in which else None,
            torch.randn(k, bsz, classes) if "logits" in which else None)


def run_and_compare(impl, x, g, wrg, wcg, perm, mask, grads, needs_dx=True, atol=FP32_TOL[0], rtol=FP32_TOL[1],
                    fp32_tol=FP32_TOL):
    """Forward and backward of ``impl`` = (name, chunk_mib) against ``reference``: fp32 outputs and
    gradients at ``fp32_tol``, dx (stored in x's dtype) at (atol, rtol)."""
    name, chunk_mib = impl
    module = IMPLS[name]
    h = g.shape[0]
    out = module.c2f_head_fwd(x, g, wrg, wcg, perm, mask, EPS, chunk_mib)
    assert len(out) == len(OUTPUTS)
    got = dict(zip(OUTPUTS, out, strict=True))
    for key, t in got.items():
        assert t.dtype == torch.float32, (key, t.dtype)
    assert got["probs"].shape == ((x.shape[0], h) + got["attn"].shape[1:] if h > 1 else (0,))
    dg, dwrg, dwcg, dx = module.c2f_head_bwd(x, g, wrg, wcg, perm, mask, got["attn"], got["probs"], got["zhat"],
                                             got["mean"], got["rstd"], *grads, needs_dx, chunk_mib)
    want, want_grads = reference(x, g, wrg, wcg, perm, mask, *grads)
    if h == 1:
        got.pop("probs")
        want.pop("probs")
    for key, actual in got.items():
        assert_close(key, actual, want[key], *fp32_tol)
    for key, actual in (("dg", dg), ("dwrg", dwrg), ("dwcg", dwcg)):
        assert actual.dtype == torch.float32
        assert_close(key, actual, want_grads[key], *fp32_tol)
    if needs_dx:
        assert dx.dtype == x.dtype and dx.stride() == x.stride(), (dx.dtype, dx.stride(), x.stride())
        assert_close("dx", dx, want_grads["dx"], atol, rtol)
    else:
        assert dx is None


@pytest.mark.parametrize("impl", IMPL_PARAMS)
@pytest.mark.parametrize("bsz, c, n, p, h, k", [
    (3, 40, 49, 7, 1, 3),     # odd batch (middle sample paired with itself), C not a power of two
    (3, 48, 81, 7, 3, 1),     # N = 81, three heads of 16 channels
    (1, 80, 9, 7, 16, 3),     # sixteen heads of 5 channels: every channel block ends mid-block
    (1, 24, 49, 312, 1, 1),   # P = 312 (several query blocks), one self-paired sample
    (2, 24, 16, 312, 3, 3),   # P = 312 with three heads
])
def test_odd_shapes(impl, bsz, c, n, p, h, k):
    x, g, wrg, wcg, perm, mask = make_inputs(bsz, c, n, p, h, k)
    run_and_compare(impl, x, g, wrg, wcg, perm, mask, upstream(bsz, p, n, k, 5))


@pytest.mark.parametrize("impl", IMPL_PARAMS)
def test_general_permutation(impl):
    """A permutation that is not an involution (a 3-cycle and a fixed point): the pooled rows of a
    sample go to the views of perm^-1, not perm."""
    x, g, wrg, wcg, perm, mask = make_inputs(4, 40, 9, 7, 2, 3, perm=[1, 2, 0, 3])
    run_and_compare(impl, x, g, wrg, wcg, perm, mask, upstream(4, 7, 9, 3, 5))


@pytest.mark.parametrize("impl", IMPL_PARAMS)
@pytest.mark.parametrize("which, needs_dx", [
    (("pred", "logits"), False),   # training: attention maps unused, frozen backbone
    (("logits",), True),
    (("pred",), True),
    (("attn",), True),
    ((), True),
])
def test_missing_upstream_gradients(impl, which, needs_dx):
    for h in (1, 2):   # one head stacks dZ under dS for one reduction; several run a dWrg kernel
        x, g, wrg, wcg, perm, mask = make_inputs(2, 32, 9, 7, h, 2)
        run_and_compare(impl, x, g, wrg, wcg, perm, mask, upstream(2, 7, 9, 2, 5, which), needs_dx=needs_dx)


@pytest.mark.parametrize("impl", IMPL_PARAMS)
@pytest.mark.parametrize("dtype, atol, rtol", [
    pytest.param(torch.float16, 2e-3, 2e-3, id="fp16"),
    # bf16 stores round toward zero in the interpreter: up to one bf16 ulp (2^-7) on dx.
    pytest.param(torch.bfloat16, 1e-2, 1e-2, id="bf16"),
])
def test_half_precision_x(impl, dtype, atol, rtol):
    """x stored in 16 bits: computed in fp32 (the reference sees the same rounded x); dx in x's dtype."""
    x, g, wrg, wcg, perm, mask = make_inputs(3, 48, 49, 7, 3, 1, dtype=dtype)
    run_and_compare(impl, x, g, wrg, wcg, perm, mask, upstream(3, 7, 49, 1, 5), atol=atol, rtol=rtol)


@pytest.mark.parametrize("impl", IMPL_PARAMS)
def test_large_common_offset(impl):
    """x + 1000: fp32 resolves x only to 6e-5 there; centring on load (not a sum of squares) keeps the
    statistics and everything after them accurate."""
    x, g, wrg, wcg, perm, mask = make_inputs(3, 64, 49, 7, 1, 2)
    run_and_compare(impl, x + 1000.0, g, wrg, wcg, perm, mask, upstream(3, 7, 49, 2, 5), atol=2e-4, rtol=2e-3,
                    fp32_tol=(2e-4, 2e-3))


@pytest.mark.parametrize("impl", IMPL_PARAMS)
def test_strided_x_read_in_place(impl):
    x, g, wrg, wcg, perm, mask = make_inputs(2, 40, 49, 7, 2, 2, layout="channels_last")
    assert not x.is_contiguous()
    run_and_compare(impl, x, g, wrg, wcg, perm, mask, upstream(2, 7, 49, 2, 5))


def test_gpu_block_sizes():
    """The production (GPU) tiles, several chunks per loop and query blocks per head, on small shapes."""
    with launch.plan_for(targets.TARGETS["sm_80"]):
        x, g, wrg, wcg, perm, mask = make_inputs(3, 200, 49, 70, 1, 3)
        run_and_compare(("triton", 16.0), x, g, wrg, wcg, perm, mask, upstream(3, 70, 49, 3, 5))
        x, g, wrg, wcg, perm, mask = make_inputs(2, 96, 36, 40, 3, 1, layout="channels_last")
        run_and_compare(("triton", 16.0), x, g, wrg, wcg, perm, mask, upstream(2, 40, 36, 1, 5))
        # 289 tokens: 512-token rows in the forward, two passes over 256-token chunks in dS / dZ.
        x, g, wrg, wcg, perm, mask = make_inputs(1, 32, 289, 7, 1, 2)
        run_and_compare(("triton", 16.0), x, g, wrg, wcg, perm, mask, upstream(1, 7, 289, 2, 5))


def test_launches_per_step_do_not_depend_on_batch():
    """Triton launches per forward + backward: 3 + 3 with one head, 3 + 4 with several, 2 more for dx;
    the same at every batch size."""
    def count(bsz, h, needs_dx):
        x, g, wrg, wcg, perm, mask = (t.to("meta") for t in make_inputs(bsz, 64, 16, 7, h, 4))
        dattn, dpred, dlogits = (t.to("meta") for t in upstream(bsz, 7, 16, 4, 5))
        with launch.recording(targets.TARGETS["sm_90"]) as launches:
            out = triton_impl.c2f_head_fwd(x, g, wrg, wcg, perm, mask, EPS, 16.0)
            fwd = len(launches)
            triton_impl.c2f_head_bwd(x, g, wrg, wcg, perm, mask, out[0], *out[3:], None, dpred, dlogits,
                                     needs_dx, 16.0)
        return fwd, len(launches) - fwd
    for bsz in (2, 64):
        assert count(bsz, 1, False) == (3, 3)
        assert count(bsz, 4, False) == (3, 4)
        assert count(bsz, 1, True) == (3, 5)


def test_empty_batch():
    x, g, wrg, wcg, perm, mask = make_inputs(0, 32, 9, 7, 2, 2)
    for module in IMPLS.values():
        out = module.c2f_head_fwd(x, g, wrg, wcg, perm, mask, EPS, 16.0)
        assert out[2].shape == (2, 0, 5)
        dg, dwrg, dwcg, dx = module.c2f_head_bwd(x, g, wrg, wcg, perm, mask, out[0], *out[3:],
                                                 *upstream(0, 7, 9, 2, 5), True, 16.0)
        assert dg.abs().sum() == 0 and dwcg.shape == (5, 32) and dx.shape == x.shape


def test_bad_inputs_are_named():
    K = triton_impl
    x, g, wrg, wcg, perm, mask = make_inputs(2, 32, 9, 7, 2, 2)
    with pytest.raises(ValueError, match="x must be a \\[B, C, N\\]"):
        K.c2f_head_fwd(x[0], g, wrg, wcg, perm, mask, EPS, 16.0)
    with pytest.raises(ValueError, match="wrg must have shape"):
        K.c2f_head_fwd(x, g, wrg[:, :16].contiguous(), wcg, perm, mask, EPS, 16.0)
    with pytest.raises(ValueError, match="wcg must have shape"):
        K.c2f_head_fwd(x, g, wrg, wcg[:, :16].contiguous(), perm, mask, EPS, 16.0)
    with pytest.raises(TypeError, match="perm must have dtype"):
        K.c2f_head_fwd(x, g, wrg, wcg, perm.int(), mask, EPS, 16.0)
    with pytest.raises(ValueError, match="mask must have shape"):
        K.c2f_head_fwd(x, g, wrg, wcg, perm, mask[:, :1], EPS, 16.0)
    out = K.c2f_head_fwd(x, g, wrg, wcg, perm, mask, EPS, 16.0)
    dattn, dpred, dlogits = upstream(2, 7, 9, 2, 5)
    with pytest.raises(ValueError, match="zhat must have shape"):
        K.c2f_head_bwd(x, g, wrg, wcg, perm, mask, out[0], out[3], out[4][:, :1], *out[5:], dattn, dpred, dlogits,
                       False, 16.0)
    with pytest.raises(ValueError, match="dlogits must have shape"):
        K.c2f_head_bwd(x, g, wrg, wcg, perm, mask, out[0], *out[3:], dattn, dpred, dlogits[:1], False, 16.0)


def test_implementations_share_signatures():
    """One contract: the Triton launchers and the torch ops have exactly the same functions and signatures."""
    assert triton_impl.__all__ == torch_impl.__all__
    for name in triton_impl.__all__:
        assert inspect.signature(getattr(triton_impl, name)) == inspect.signature(getattr(torch_impl, name)), name


@pytest.mark.parametrize("dot_precision", ["ieee", "tf32", "bf16", "fp16"])
def test_dot_precision_error_within_bounds(dot_precision):
    """The head's kernels multiply through dots.mma: at each dot precision every output and gradient stays
    within the attention's normwise bound (docs/design.md, "Precision"; measured at most 2.8 u, the
    pooled logits and dWrg going through two or three chained products), and the rounding is visible."""
    bsz, c, n, p, h, k = 2, 256, 49, 40, 2, 3
    x, g, wrg, wcg, perm, mask = make_inputs(bsz, c, n, p, h, k)
    grads = upstream(bsz, p, n, k, 5)
    with emulating_tf32():
        out = triton_impl.c2f_head_fwd(x, g, wrg, wcg, perm, mask, EPS, 16.0, dot_precision)
        dg, dwrg, dwcg, dx = triton_impl.c2f_head_bwd(x, g, wrg, wcg, perm, mask, out[0], *out[3:], *grads, True,
                                                      16.0, dot_precision)
    want, want_grads = reference(x, g, wrg, wcg, perm, mask, *grads)
    truth = dict(want, **want_grads)
    got = dict(attn=out[0], pred=out[1], logits=out[2], zhat=out[4], dg=dg, dwrg=dwrg, dwcg=dwcg, dx=dx)
    errors = {key: ((v.double() - truth[key]).abs().max() / truth[key].abs().max()).item() for key, v in got.items()}
    bound = PRECISION_BOUNDS[dot_precision]
    assert max(errors.values()) <= bound, f"{dot_precision}: normwise errors {errors} over {bound:.3g}"
    if dot_precision != "ieee":
        assert max(errors.values()) > PRECISION_FLOORS[dot_precision], f"{dot_precision}: no rounding in {errors}"


# ------------------------------------------------------------------------------ one-pass forward (plan flag)
def forward_kernels(x, g, wrg, wcg, perm, mask, target):
    """Names of the kernels the forward launcher launches for these shapes on ``target`` (meta tensors)."""
    meta = [torch.empty(t.shape, dtype=t.dtype, device="meta") for t in (x, g, wrg, wcg, perm, mask)]
    with launch.recording(target) as launches:
        triton_impl.c2f_head_fwd(*meta, EPS, 16.0)
    return [rec.name for rec in launches]


@pytest.mark.parametrize("tiles, shape", [
    (None, (3, 40, 49, 7, 1, 3)),          # interpreter tiles: one query block per (sample, head)
    (None, (2, 24, 16, 312, 3, 3)),        # three query blocks of 128 per (sample, head), three heads
    ("sm_80", (3, 200, 49, 70, 1, 3)),     # GPU tiles: 3 query blocks, several channel chunks and views
    ("gfx942", (2, 32, 289, 40, 2, 2)),    # 289 tokens on a GPU: the two-pass (online softmax) forward
])
def test_one_pass_forward(tiles, shape):
    """The plan flag ``head_fwd_one_pass``: the last query block of each (sample, head), counted by an atomic,
    sums the coefficient partials and pools the rows itself, so the forward launches no pool kernel; it keeps
    the op contract (against float64) and gives the two-launch forward's outputs to fp32 rounding."""
    bsz, c, n, p, h, k = shape
    target = targets.TARGETS[tiles] if tiles else targets.current(torch.device("cpu"))
    x, g, wrg, wcg, perm, mask = make_inputs(bsz, c, n, p, h, k)
    grads = upstream(bsz, p, n, k, 5)
    with launch.plan_for(target) if tiles else contextlib.nullcontext():
        assert "_c2f_head_pool_kernel" in forward_kernels(x, g, wrg, wcg, perm, mask, target)
        two = triton_impl.c2f_head_fwd(x, g, wrg, wcg, perm, mask, EPS, 16.0)
        with plans.plan_flags(head_fwd_one_pass=True):
            assert "_c2f_head_pool_kernel" not in forward_kernels(x, g, wrg, wcg, perm, mask, target)
            one = triton_impl.c2f_head_fwd(x, g, wrg, wcg, perm, mask, EPS, 16.0)
            run_and_compare(("triton", 16.0), x, g, wrg, wcg, perm, mask, grads)
    for name, a, b in zip(OUTPUTS, one, two, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)


def test_plan_flags_are_named_and_read_from_the_environment(monkeypatch):
    """A flag set in a block wins over its environment variable; "1" turns it on, "0" or unset off; anything
    else, or a flag no plan knows, is refused naming what was expected."""
    monkeypatch.delenv("C2F_HEAD_FWD_ONE_PASS", raising=False)
    assert not plans.plan_flag("head_fwd_one_pass")
    monkeypatch.setenv("C2F_HEAD_FWD_ONE_PASS", "1")
    assert plans.plan_flag("head_fwd_one_pass")
    with plans.plan_flags(head_fwd_one_pass=False):
        assert not plans.plan_flag("head_fwd_one_pass")
    monkeypatch.setenv("C2F_HEAD_FWD_ONE_PASS", "yes")
    with pytest.raises(ValueError, match="C2F_HEAD_FWD_ONE_PASS='yes': expected 1"):
        plans.plan_flag("head_fwd_one_pass")
    with pytest.raises(ValueError, match="unknown plan flag"), plans.plan_flags(one_pass=True):
        pass
