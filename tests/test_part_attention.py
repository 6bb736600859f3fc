"""Parity of the fused part attention (c2f.nn.PartAttention) with the reference, on both paths.

Ground truth is the reference module in float64. The rule (flash-attention's): the fused module's
error against the truth is at most twice the reference module's own error in the same dtype, plus
a small atol relative to the magnitude of the quantity.
"""
import pytest
import torch

from c2f import reference
from c2f.part_attention import PartAttention, part_attention, pick_formulation
from tests.conftest import CUDA
from tests.parity import assert_within_reference_error

# (dtype, relative atol): fp32 runs exact-fp32 arithmetic in a different order; halves round inputs
# and outputs only (everything is computed in fp32). On a GPU the kernels run with "ieee" dots here (TF32
# has its own bounds: tests/test_part_attention_contract.py); the interpreter is exact either way.
DOT_PRECISION = "ieee" if CUDA else "tf32"
DTYPES = [(torch.float32, 1e-5), (torch.float16, 2e-3)]
BACKENDS = ["torch", "triton"]


def make_pair(dim, parts, heads, qkv_bias=True, backend="torch", formulation="auto", head_reduce="mean"):
    ref = reference.PartAttention(dim, parts, heads, qkv_bias=qkv_bias, head_reduce=head_reduce)
    with torch.no_grad():  # non-trivial affine and queries, so every term of the algebra matters
        ref.norm.weight.uniform_(0.5, 1.5)
        ref.norm.bias.normal_(0, 0.5)
        ref.queries.normal_(0, 1.0)
    fused = PartAttention(dim, parts, heads, qkv_bias=qkv_bias, backend=backend, formulation=formulation,
                          dot_precision=DOT_PRECISION, head_reduce=head_reduce)
    fused.load_state_dict(ref.state_dict())
    return ref, fused


def run(module, x, grads, x_grad):
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(x_grad)
    parts, attn = module(x)
    torch.autograd.backward((parts, attn), (grads[0].to(parts.dtype), grads[1].to(attn.dtype)))
    out = {"parts": parts.detach(), "attn": attn.detach()}
    out.update({name: p.grad.detach() for name, p in module.named_parameters()})
    if x_grad:
        out["x"] = x.grad.detach()
    return {name: t.cpu() for name, t in out.items()}


def check_parity(ref, fused, x, dtype, atol, x_grad=False, device="cpu"):
    """Runs truth (reference, float64), reference and fused in ``dtype`` (the fused module on ``device``);
    compares everything."""
    like = dict(qkv_bias=ref.k.bias is not None, head_reduce=ref.head_reduce)
    truth_module = reference.PartAttention(ref.dim, ref.num_parts, ref.num_heads, **like)
    truth_module.load_state_dict(ref.state_dict())
    truth_module.double()
    with torch.no_grad():
        parts, attn = truth_module(x.double())
    gen = torch.Generator().manual_seed(1)
    grads = (torch.randn(parts.shape, generator=gen, dtype=torch.float64),
             torch.randn(attn.shape, generator=gen, dtype=torch.float64))
    truth = run(truth_module, x.double(), grads, x_grad)
    # the reference in the tested dtype: parameters in that dtype too (its LayerNorm needs it)
    ref_lp = reference.PartAttention(ref.dim, ref.num_parts, ref.num_heads, **like)
    ref_lp.load_state_dict(ref.state_dict())
    ref_lp.to(dtype)
    baseline = run(ref_lp, x.to(dtype), grads, x_grad)
    got = run(fused.to(device), x.to(dtype).to(device), [g.to(device) for g in grads], x_grad)
    assert got["parts"].dtype == dtype and got["attn"].dtype == dtype
    assert set(got) == set(truth)
    for name in truth:
        if name == "k.bias":  # exactly zero in exact arithmetic: the softmax cancels the key bias
            assert torch.count_nonzero(got[name]) == 0
            assert truth[name].abs().max() < 1e-10
            continue
        assert_within_reference_error(name, got[name], baseline[name], truth[name], atol)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("heads", [1, 16])
def test_real_shape(backend, heads, device):
    ref, fused = make_pair(2048, 312, heads, backend=backend)
    x = torch.randn(2, 2048, 14, 14)
    check_parity(ref, fused, x, torch.float32, 1e-5, device=device)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,atol", DTYPES)
@pytest.mark.parametrize("dim,parts,heads,hw", [
    (64, 7, 1, (7, 7)),       # N = 49
    (200, 7, 4, (7, 7)),      # C not a power of two (nor a multiple of a block)
    (96, 1, 2, (5, 3)),       # one part, odd token count
    (128, 16, 8, (14, 14)),   # many heads, still folded (h·P = 128 < C + P = 144)
    (64, 16, 16, (5, 5)),     # sixteen heads: unfolded (h·P = 256 >= C + P = 80) on both backends
])
def test_shapes_and_dtypes(backend, dtype, atol, dim, parts, heads, hw, device):
    ref, fused = make_pair(dim, parts, heads, backend=backend)
    x = torch.randn(3, dim, *hw)
    check_parity(ref, fused, x, dtype, atol, x_grad=True, device=device)


class _OpNames(torch.utils._python_dispatch.TorchDispatchMode):
    """Names of the ops dispatched inside the mode (the c2f custom ops appear as themselves)."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dim, heads, expected", [
    (64, 1, {"torch": "folded", "triton": "folded"}),
    (64, 16, {"torch": "unfolded", "triton": "unfolded"}),     # folded would be 2.6x the unfolded FLOPs
    (128, 16, {"torch": "unfolded", "triton": "folded"}),      # 1.6x: Triton keeps its heads in the grid
])
def test_auto_formulation_on_both_backends(backend, dim, heads, expected):
    """The op each backend runs for formulation="auto": the torch path switches to the unfolded formulation at
    the FLOP crossover, the Triton path stays folded up to twice the unfolded FLOPs (pick_formulation)."""
    expected = expected[backend]
    _, fused = make_pair(dim, 16, heads, backend=backend)
    with _OpNames() as seen:
        fused(torch.randn(2, dim, 5, 5))
    assert f"c2f.part_attention_{expected}" in seen.names, seen.names
    other = "unfolded" if expected == "folded" else "folded"
    assert f"c2f.part_attention_{other}" not in seen.names


@pytest.mark.cuda
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["channels_last", "tokens"])
def test_strided_inputs(backend, layout, device):
    ref, fused = make_pair(64, 7, 2, backend=backend)
    x = torch.randn(2, 64, 7, 7)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
        assert not x.is_contiguous()
    else:
        x = x.flatten(2).transpose(1, 2).contiguous()          # tokens [B, N, C]
    check_parity(ref, fused, x, torch.float32, 1e-5, x_grad=True, device=device)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", BACKENDS)
def test_large_offset_and_constant_tokens(backend, device):
    ref, fused = make_pair(128, 7, 1, backend=backend)
    x = torch.randn(2, 128, 7, 7) + 1000.0
    x[1, :, 0, :] = 3.0                                        # constant tokens: zero variance
    check_parity(ref, fused, x, torch.float32, 1e-5, x_grad=True, device=device)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16(backend, device):
    ref, fused = make_pair(64, 7, 1, backend=backend)
    check_parity(ref, fused, torch.randn(2, 64, 7, 7), torch.bfloat16, 1e-2, device=device)


@pytest.mark.parametrize("formulation", ["folded", "unfolded"])
def test_formulations_agree(formulation):
    ref, fused = make_pair(96, 7, 3, formulation=formulation)
    check_parity(ref, fused, torch.randn(2, 96, 5, 5), torch.float32, 1e-5, x_grad=True)


def test_one_head_dparts_are_not_copied():
    """The backwards read dparts split by head (the folded one sample-major, the unfolded one head-major);
    with one head it already is, and a copy of the chunk's dparts cost 17 MiB of peak at B=16 (0.336 ->
    0.429 of the reference's, bench_part_attention h=1)."""
    from c2f.torch_ops.part_attention import _dparts_by_head
    df = torch.randn(3, 7, 12)
    for sample_major in (True, False):
        assert _dparts_by_head(df, 1, df.dtype, sample_major).data_ptr() == df.data_ptr()
    heads = _dparts_by_head(df, 4, df.dtype, sample_major=False)    # [h, b, P, d], head j's channels
    assert torch.equal(heads[2], df[:, :, 6:9])
    samples = _dparts_by_head(df, 4, df.dtype, sample_major=True)   # [b, h, P, d]
    assert torch.equal(samples[:, 2], df[:, :, 6:9])


def test_formulation_choice():
    assert pick_formulation("auto", 1, 2048, 312) == "folded"
    assert pick_formulation("auto", 7, 2048, 312) == "folded"
    assert pick_formulation("auto", 8, 2048, 312) == "unfolded"
    assert pick_formulation("auto", 16, 2048, 312) == "unfolded"
    # Triton: heads are a grid axis of the folded kernels; folded up to twice the unfolded FLOPs.
    assert pick_formulation("auto", 16, 2048, 312, "triton") == "folded"      # 1.9x
    assert pick_formulation("auto", 18, 2048, 312, "triton") == "unfolded"    # 2.1x
    assert pick_formulation("auto", 32, 2048, 312, "triton") == "unfolded"
    assert pick_formulation("unfolded", 1, 2048, 312, "triton") == "unfolded"
    with pytest.raises(ValueError, match="formulation"):
        pick_formulation("bogus", 1, 2048, 312)


def test_frozen_features_get_no_gradient_work():
    ref, fused = make_pair(64, 7, 1)
    x = torch.randn(2, 64, 7, 7)
    parts, attn = fused(x)
    assert parts.requires_grad and not x.requires_grad
    (parts.sum() + attn.sum()).backward()
    assert x.grad is None and fused.queries.grad is not None


def test_state_dict_round_trip():
    ref, fused = make_pair(64, 7, 2)
    assert list(ref.state_dict()) == list(fused.state_dict())
    back = reference.PartAttention(64, 7, 2, qkv_bias=True)
    back.load_state_dict(fused.state_dict())


def test_empty_batch():
    _, fused = make_pair(64, 7, 1)
    parts, attn = fused(torch.randn(0, 64, 7, 7))
    assert parts.shape == (0, 7, 64) and attn.shape == (0, 7, 49)


@pytest.mark.parametrize("bad,match", [
    (torch.randn(2, 64), "feature map"),
    (torch.randn(2, 32, 7, 7), "expected dim=64"),
    (torch.randn(2, 64, 7, 7).long(), "floating"),
    (torch.randn(2, 64, 0, 7), "no tokens"),
])
def test_bad_input_errors(bad, match):
    _, fused = make_pair(64, 7, 1)
    with pytest.raises((ValueError, TypeError), match=match):
        fused(bad)


def test_functional_checks_parameter_shapes():
    x = torch.randn(1, 8, 2, 2)
    q = torch.randn(3, 8)
    with pytest.raises(ValueError, match="k_weight"):
        part_attention(x, q, torch.randn(8, 4), torch.ones(8), torch.zeros(8))
    with pytest.raises(ValueError, match="num_heads"):
        part_attention(x, q, torch.randn(8, 8), torch.ones(8), torch.zeros(8), num_heads=3)
    with pytest.raises(ValueError, match="backend"):
        part_attention(x, q, torch.randn(8, 8), torch.ones(8), torch.zeros(8), backend="cuda")
